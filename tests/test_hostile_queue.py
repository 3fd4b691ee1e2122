"""The queue as an attacker with write access to Redis would use it, against real worker
processes: malformed messages, messages for runs and batches they do not own, forged
redelivered flags, and passwords in the settings. The worker lives on, no row of any run
changes, no other run's payload is touched and no secret is printed (docs/faults.md,
"Hostile queue")."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from sqlalchemy import text

from core import wire
from db.session import get_engine
from tests.conftest import wait_for_log

pytestmark = pytest.mark.integration

TABLES = ("models", "runs", "batches", "predictions")


def envelope(
    body: Any,
    queue: str,
    *,
    headers: dict[str, Any] | None = None,
    raw: bytes | None = None,
    redelivered: bool = False,
) -> tuple[str, bytes]:
    """A message as kombu keeps it in Redis (its id, its JSON), with a Celery protocol-2
    header set that ``headers`` overrides (a value of ``None`` drops that header)."""
    msg_id = uuid.uuid4().hex
    base: dict[str, Any] = {
        "lang": "py", "task": wire.TASK_NAME, "id": msg_id, "root_id": msg_id,
        "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
        "timelimit": [None, None], "origin": "attacker",
    }
    for key, value in (headers or {}).items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    delivery_info: dict[str, Any] = {"exchange": queue, "routing_key": queue}
    if redelivered:
        base["redelivered"] = True
        delivery_info["redelivered"] = True
    data = raw if raw is not None else msgpack.packb(body, use_bin_type=True)
    message = {
        "body": base64.b64encode(data).decode("ascii"),
        "content-encoding": "binary",
        "content-type": "application/x-msgpack",
        "headers": base,
        "properties": {
            "correlation_id": msg_id, "delivery_mode": 2, "delivery_info": delivery_info,
            "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    return msg_id, json.dumps(message).encode()


def push(broker_env: dict[str, str], *messages: tuple[str, bytes]) -> list[str]:
    """LPUSH crafted messages onto the workers' queue, in order; their ids."""
    queue = broker_env["DIGITSCORE_QUEUE"]
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    for _, data in messages:
        client.lpush(queue, data)
    return [msg_id for msg_id, _ in messages]


def dump(db_url: str) -> dict[str, list[tuple]]:
    """Every row of every table, in id order."""
    with get_engine(db_url).connect() as conn:
        return {t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY id"))]
                for t in TABLES}


def payloads(broker_env: dict[str, str]) -> dict[bytes, bytes]:
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    return {k: client.get(k) for k in client.scan_iter(f"{wire.PAYLOAD_PREFIX}*")}


def run_token(db_url: str, run_id: int) -> str:
    with get_engine(db_url).connect() as conn:
        return conn.execute(text("SELECT token FROM runs WHERE id = :r"), {"r": run_id}).scalar()


def done_by_worker(worker, msg_id: str) -> None:
    """Wait until the worker has finished the task of message ``msg_id``."""
    wait_for_log(worker, f"[{msg_id}] succeeded", timeout=60)


def assert_scores_a_real_submit(run_cli, sample_dir: Path, db_url: str, run_id: int) -> None:
    r = run_cli("submit", str(sample_dir / "valid"), "--wait", "--database-url", db_url)
    assert r.exit_code == 0, r.output
    with get_engine(db_url).connect() as conn:
        scored, failed, status = conn.execute(text(
            "SELECT n_scored, n_failed, status FROM runs WHERE id = :r"), {"r": run_id}).one()
        rows = conn.execute(text(
            "SELECT COUNT(*) FROM predictions WHERE run_id = :r AND error IS NULL "
            "AND pred_l1 IS NOT NULL"), {"r": run_id}).scalar()
    assert (scored, failed, status, rows) == (200, 0, "done", 200)


@pytest.fixture
def worker(model_db, broker_env, start_worker):
    proc = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu")
    wait_for_log(proc, "ready.")
    return proc


def test_malformed_messages_are_dropped_and_the_worker_scores_on(
    worker, broker_env, model_db, run_cli, sample_dir
):
    queue = broker_env["DIGITSCORE_QUEUE"]
    token = "0" * 32
    bad = [
        envelope({"not": "a list"}, queue),
        envelope(5, queue),
        envelope([1, 2], queue),
        envelope([[1, 2], {}, {}], queue),  # two arguments
        envelope([["1", 0, token], {}, {}], queue),  # a run id that is text
        envelope([[1, 0, 7], {}, {}], queue),  # a token that is a number
        envelope([[1, 0, token], {"paths": ["/etc/passwd"]}, {}], queue),
        envelope([[1, 0, token], {}, {"callbacks": [{"task": "x"}]}], queue),
        envelope([[1, 0, "x" * 200_000], {}, {}], queue),  # a huge body
        envelope(None, queue, raw=b"\xc1\xc1 not msgpack"),
        envelope([[1, 0, token], {}, {}], queue, headers={"retries": "many"}),
        envelope([[1, 0, token], {}, {}], queue, headers={"eta": "tomorrow"}),
        envelope([[1, 0, token], {}, {}], queue, headers={"timelimit": "forever"}),
        envelope([[1, 0, token], {}, {}], queue, headers={"id": 12}),
    ]
    unknown = [
        envelope([[1, 0, token], {}, {}], queue, headers={"task": "os.system"}),
        envelope(5, queue, headers={"task": "os.system", "id": None}),
        envelope({"task": wire.TASK_NAME, "args": [1, 0, token]}, queue,
                 headers={"task": None}),  # protocol 1
    ]
    ids = push(broker_env, *bad, *unknown)
    log = wait_for_log(worker, "dropped: ", count=len(ids), timeout=60)
    for msg_id in ids[:-4]:  # the last four are dropped under their delivery tags
        assert f"message {msg_id!r} dropped: " in log
    for reason in ("body is not [args, kwargs, embed]", "body of 200", "unknown task 'os.system'",
                   "body cannot be decoded", "header 'task' is not a string"):
        assert reason in log
    assert worker.poll() is None
    assert "Unrecoverable error" not in log
    assert_scores_a_real_submit(run_cli, sample_dir, model_db, run_id=1)
    assert worker.poll() is None
