"""Lost batches are found and sent again while ``--wait`` waits, with no ``resume`` typed: a
worker on another database drops a run's batches, a worker's Celery main process is killed
holding one (real Redis, real worker processes, SQLite and PostgreSQL). The visibility
timeout stays at its default (600 s): healing, not Redis, brings these batches back."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
from sqlalchemy import text

from db.session import get_engine
from tests.support import (
    FAULTS,
    assert_exactly_once,
    created,
    drop_queue,
    queued_messages,
    save_model,
    start_producer,
    submit_and_watch,
    wait_for_log,
)

pytestmark = pytest.mark.integration

#: Sweeps every second: a batch is suspected after 2 s, re-sent on the next sweep.
HEAL = {"DIGITSCORE_HEAL_EVERY": "1"}


def done_within_a_minute_of(worker, submit: Submit) -> str:
    """Once ``worker`` is ready, the submit ends well within 60 s (the issue's goal); its
    output."""
    wait_for_log(worker, "ready.")
    ready = time.monotonic()
    status, output = submit.outcome()
    assert status == 0, output
    print(f"run done {submit.ended - ready:.1f} s after the new worker was ready")
    assert submit.ended - ready < 60, output
    return output


def assert_resent_said(output: str, why: str) -> None:
    """The sweep's line names the re-sent batches with the noun agreeing with their count."""
    said = re.search(rf"re-sent ([\d,]+) lost (batch|batches) \({re.escape(why)}", output)
    assert said, output
    assert (said.group(1) == "1") == (said.group(2) == "batch"), said.group(0)


class Submit(threading.Thread):
    """``producer submit SOURCE --wait`` in the background (test_wait_hints.submit_and_watch)."""

    def __init__(self, *args) -> None:
        super().__init__(daemon=True)
        self.args = args
        self.result: tuple | None = None
        self.ended = 0.0

    def run(self) -> None:
        self.result = submit_and_watch(*self.args)
        self.ended = time.monotonic()

    def outcome(self, timeout: float = 150) -> tuple[int, str]:
        self.join(timeout)
        assert self.result is not None, "submit --wait did not end"
        status, out, err = self.result
        return status, "\n".join(line for _, line in out + err)


def resends(db_url: str) -> int:
    with get_engine(db_url).connect() as conn:
        return int(conn.execute(text("SELECT SUM(resends) FROM batches")).scalar() or 0)


def test_batches_dropped_by_a_worker_on_another_database_are_re_sent(
    sample_dir, model_db, tmp_path, broker_env, start_worker
):
    other = created(f"sqlite:///{tmp_path / 'other.db'}")  # a worker refuses a missing one
    wrong = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": other}, "--device", "cpu",
                         name="wrong")
    wait_for_log(wrong, "ready.")
    env = {**broker_env, **HEAL, "DIGITSCORE_STALL_HINT_AFTER": "3"}
    submit = Submit(sample_dir / "valid", model_db, env, "--batch-size", "50",
                    "--timeout", "150")
    submit.start()
    wait_for_log(wrong, "is not in this database", count=8)  # each batch dropped, re-sent
    os.killpg(wrong.pid, signal.SIGKILL)  # the user stops it (a warm stop can take long)
    wrong.wait(30)
    right = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu",
                         name="right")
    output = done_within_a_minute_of(right, submit)
    assert "Traceback" not in output
    assert_exactly_once(model_db, 200)
    assert resends(model_db) >= 4
    # the hint names the cause, the healing and the settings the workers need; a worker too
    # busy to answer the control API within its second counts as none consuming the queue
    hint = next(line for line in output.splitlines()
                if line.startswith("no batch of run 1 stored for"))
    if "to another database than this one" in hint:
        assert ("its batches were dropped by a worker on another database: they are being "
                "re-sent") in hint, hint
    else:
        assert "no worker consumes queue" in hint, hint
    assert f"DIGITSCORE_QUEUE={broker_env['DIGITSCORE_QUEUE']}" in output
    assert f"DIGITSCORE_DATABASE_URL={model_db}" in output
    assert_resent_said(output, "no message for it on the broker")


def test_a_batch_held_by_a_killed_celery_main_process_is_re_sent(
    sample_dir, postgres_url, classifier, broker_env, start_worker
):
    save_model(postgres_url, classifier)
    slow = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": postgres_url,
                         "DIGITSCORE_TEST_TASK_DELAY": "20"}, "--device", "cpu", *FAULTS,
                        name="slow")
    wait_for_log(slow, "ready.")
    submit = Submit(sample_dir / "valid", postgres_url, {**broker_env, **HEAL},
                    "--batch-size", "50", "--timeout", "150")
    submit.start()
    wait_for_log(slow, "received")  # a batch in its hands
    with get_engine(postgres_url).connect() as conn:
        main_pid = conn.execute(text("SELECT pid FROM workers")).scalar_one()
    os.kill(main_pid, signal.SIGKILL)
    fresh = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": postgres_url},
                         "--device", "cpu", name="fresh")
    output = done_within_a_minute_of(fresh, submit)
    assert_exactly_once(postgres_url, 200)
    assert resends(postgres_url) >= 1, output
    assert_resent_said(output, "its message held by no live worker")


def test_producer_heal_re_sends_lost_batches_once_however_many_heal_at_once(
    run_cli, sample_dir, model_db, broker_env
):
    import redis

    from core.queued import read_broker_batches

    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "50",
                "--database-url", model_db)
    assert r.exit_code == 0 and "4 batches" in r.stdout, r.output
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    queue = broker_env["DIGITSCORE_QUEUE"]
    assert read_broker_batches(client, queue).waiting == {(1, s) for s in range(4)}
    drop_queue(client, queue)  # Redis lost the messages
    client.delete(next(client.scan_iter("digitscore:payload:1:*:2")))  # and one payload
    r = run_cli("heal", "1", "--database-url", model_db, env=HEAL)
    assert r.stdout.strip() == "no lost batch found"  # sent 1 s ago: not suspected yet
    time.sleep(2)
    healers = [start_producer("heal", "--database-url", model_db, env={**broker_env, **HEAL})
               for _ in range(2)]
    outs = [h.communicate(timeout=60)[0] for h in healers]
    assert [h.returncode for h in healers] == [0, 0], outs
    counts = [int(n) for out in outs for n in re.findall(r"re-sent (\d+) lost batch", out)]
    assert sum(counts) == 4, outs
    assert all("(no message for it on the broker)" in out or "no lost batch found" in out
               for out in outs), outs
    assert read_broker_batches(client, queue).waiting == {(1, s) for s in range(4)}
    assert queued_messages(client, queue) == 4  # each sent once between the two healers
    assert resends(model_db) == 4
    assert client.exists(next(client.scan_iter("digitscore:payload:1:*:2")))  # read again
