"""Count the project's modules and functions one image walks through, from
`producer submit DIR` to its `predictions` row (docs/architecture.md, "Counting the walk").

Usage: python -m bench.walk_count REDIS_URL   (a Redis database this run may fill and empty)

Two traces with ``sys.setprofile``, counting every distinct function of core/, db/, worker/
and producer/ that runs (module and class bodies, lambdas and comprehensions left out):

1. the producer: ``producer submit DIR --batch-size 1`` on a directory of one PNG, with a
   broker, in this process (CliRunner), which records the run, writes the payload and sends
   the message;
2. the worker's part for that message, called in order as the worker calls them: the
   transport's envelope check, the consumer's check of the delivery, then the task's body
   (``handle_batch``) with a stand-in for Celery's task object, on the real Redis and SQLite.

Celery's and kombu's own code is not counted; the three one-line overrides through which the
worker's Redis transport and consumer reach the checks are, by hand (+3 functions).
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "db", "worker", "producer")
#: CheckedChannel._brpop_read, CheckedTransport._deliver, CheckedConsumer's on_task_received
OVERRIDES = 3


def traced(work, seen: set[tuple[str, str]]):
    def profile(frame, event, _arg):
        if event != "call":
            return
        code = frame.f_code
        path = Path(code.co_filename)
        # module and class bodies (no CO_OPTIMIZED), lambdas and comprehensions are no functions
        if not code.co_flags & inspect.CO_OPTIMIZED or code.co_name.startswith("<"):
            return
        if ROOT not in path.parents:
            return
        rel = path.relative_to(ROOT)
        if rel.parts[0] in PACKAGES:
            seen.add((str(rel), code.co_qualname))

    sys.setprofile(profile)
    try:
        return work()
    finally:
        sys.setprofile(None)


def main(redis_url: str) -> None:
    work = Path(tempfile.mkdtemp())
    queue = f"walk-{uuid.uuid4().hex[:8]}"
    os.environ.update({"DIGITSCORE_BROKER_URL": redis_url, "DIGITSCORE_QUEUE": queue,
                       "DIGITSCORE_DATABASE_URL": f"sqlite:///{work / 'walk.db'}"})
    from click.testing import CliRunner

    from producer.cli import cli

    runner = CliRunner()
    sample = work / "sample"
    assert runner.invoke(cli, ["sample-data", str(sample)]).exit_code == 0
    assert runner.invoke(cli, ["train", str(sample / "train"), "--epochs", "1"]).exit_code == 0
    one = work / "one" / "3"
    one.mkdir(parents=True)
    shutil.copy(next((sample / "valid" / "3").glob("*.png")), one)
    producer: set[tuple[str, str]] = set()
    r = traced(lambda: runner.invoke(cli, ["submit", str(one.parent), "--batch-size", "1"]),
               producer)
    assert r.exit_code == 0, r.output

    import msgpack
    import redis

    client = redis.Redis.from_url(redis_url)
    from core import wire

    # the message sits on one of the queue's priority lists (since issue 26), or on the queue
    lists = wire.queue_lists(queue) if hasattr(wire, "queue_lists") else [queue]
    entry = next(e for e in (client.rpop(name) for name in lists) if e is not None)
    envelope = json.loads(entry)
    body = base64.b64decode(envelope["body"])

    try:
        from worker.intake import envelope_problem
    except ImportError:  # before worker/intake.py
        from worker.transport import envelope_problem
    from worker import tasks

    class Task:
        class request:  # noqa: N801 - Celery's attribute name
            retries = 0
            hostname = None
            headers: dict = {}
            delivery_info: dict = {}

    def worker_part() -> int:
        assert envelope_problem(envelope) is None
        message = wire.check_delivery(
            envelope["headers"], len(body),
            lambda: msgpack.unpackb(body, raw=False))
        return tasks.handle_batch(Task, message)

    worker: set[tuple[str, str]] = set()
    assert traced(worker_part, worker) == 1
    both = producer | worker
    modules = {m for m, _ in both}
    print(f"producer: {len({m for m, _ in producer})} modules, {len(producer)} functions")
    print(f"worker: {len({m for m, _ in worker})} modules, {len(worker) + OVERRIDES} functions")
    print(f"the walk: {len(modules)} modules, {len(both) + OVERRIDES} functions")
    if "-v" in sys.argv:
        for m, f in sorted(both):
            print(f"  {m}: {f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1])
