"""``producer cancel`` of a run being scored by real workers (real Redis, SQLite and
PostgreSQL): no row is added after the command returns, the run is ``cancelled`` with the
counts of what it stored, and none of its payloads is left in Redis; also when the worker is
down during the cancel and started afterwards. A live ``submit`` stops sending at its lease
renewal. ``delete`` and ``prune`` remove everything of a run and nothing of another."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import redis

from core.columns import batch_columns
from db import batch_life, queries
from db.session import get_engine
from tests.support import (
    FAULTS,
    REDIS_DB,
    payload_keys,
    query,
    rows_by_table,
    run_row,
    start_producer,
    submit,
    wait_for_log,
    wait_scored,
)

pytestmark = pytest.mark.integration

#: Each batch of one image takes 50 ms longer: the run lasts seconds, not a blink.
SLOW = {"DIGITSCORE_TEST_TASK_DELAY": "0.05"}


def stored_rows(db_url: str, run_id: int = 1) -> int:
    return query(db_url, "SELECT COUNT(*) AS n FROM predictions WHERE run_id = :r",
                 r=run_id)[0]["n"]


def queue_drained(broker_url: str, queue: str, timeout: float = 60) -> None:
    """Wait until no message waits in ``queue``: each was taken (and, of a cancelled run,
    dropped)."""
    import redis

    client = redis.Redis.from_url(broker_url)
    deadline = time.monotonic() + timeout
    while client.llen(queue):
        assert time.monotonic() < deadline, f"{client.llen(queue)} messages still queued"
        time.sleep(0.1)


def submitted(run_cli, sample_dir, db_url: str) -> None:
    r = submit(run_cli, sample_dir / "valid", db_url, "--batch-size", "1")
    assert r.exit_code == 0, r.output
    assert "200 batches" in r.output


def cancelled_for_good(run_cli, db_url: str, broker_env: dict[str, str]) -> int:
    """Cancel run 1; check the run then and once its queue is drained: the rows it had when
    the command returned, no more; its status and counts; no payload left."""
    r = run_cli("cancel", "1", "--database-url", db_url)
    assert r.exit_code == 0, r.output
    at_cancel = stored_rows(db_url)
    assert f"run 1 cancelled: {at_cancel}/200 images stored" in r.output, r.output
    assert re.search(r"\b(1 payload|[\d,]+ payloads) deleted from Redis", r.output), r.output
    queue_drained(broker_env["DIGITSCORE_BROKER_URL"], broker_env["DIGITSCORE_QUEUE"])
    time.sleep(0.5)  # not a wait for an event: the span in which a late row would show
    assert stored_rows(db_url) == at_cancel < 200
    run = run_row(db_url)
    assert (run["status"], run["n_scored"] + run["n_failed"]) == ("cancelled", at_cancel)
    assert query(db_url, "SELECT COUNT(*) AS n FROM batches WHERE status = 'queued'")[0]["n"] == 0
    assert payload_keys(broker_env["DIGITSCORE_BROKER_URL"], 1) == []
    return at_cancel


def test_cancel_mid_run_stores_nothing_after_it(
    run_cli, sample_dir, any_model_db, broker_env, start_worker
):
    submitted(run_cli, sample_dir, any_model_db)
    worker = start_worker({**broker_env, **SLOW, "DIGITSCORE_DATABASE_URL": any_model_db},
                          "--device", "cpu", *FAULTS)
    wait_scored(any_model_db, 3)
    cancelled_for_good(run_cli, any_model_db, broker_env)
    wait_for_log(worker, "its run was cancelled: dropped unscored")
    r = run_cli("status", "1", "--database-url", any_model_db)
    assert r.output.startswith("run 1 cancelled, priority normal: "), r.output
    r = run_cli("wait", "1", "--database-url", any_model_db)  # the report, and exit 1
    assert r.exit_code == 1 and "status cancelled" in r.output, r.output
    assert "Error: run 1 was cancelled (`producer cancel`): the report above" in r.output
    r = run_cli("resume", "1", "--database-url", any_model_db)
    assert r.exit_code == 1
    assert "run 1 was cancelled: it is not sent again" in r.output
    assert f"`producer submit {sample_dir / 'valid'}`" in r.output


def test_a_worker_down_during_the_cancel_scores_nothing_of_the_run_afterwards(
    run_cli, sample_dir, any_model_db, broker_env, start_worker
):
    submitted(run_cli, sample_dir, any_model_db)
    env = {**broker_env, **SLOW, "DIGITSCORE_DATABASE_URL": any_model_db}
    first = start_worker(env, "--device", "cpu", *FAULTS, name="first")
    wait_scored(any_model_db, 3)
    os.killpg(first.pid, signal.SIGKILL)  # down: its in-memory state gone with it
    first.wait(30)
    r = run_cli("cancel", "1", "--database-url", any_model_db)
    assert r.exit_code == 0, r.output
    at_cancel = stored_rows(any_model_db)
    later = start_worker(env, "--device", "cpu", *FAULTS, name="later")  # after the cancel
    queue_drained(broker_env["DIGITSCORE_BROKER_URL"], broker_env["DIGITSCORE_QUEUE"])
    wait_for_log(later, "its run was cancelled: dropped unscored")
    assert stored_rows(any_model_db) == at_cancel
    assert run_row(any_model_db)["status"] == "cancelled"
    assert payload_keys(broker_env["DIGITSCORE_BROKER_URL"], 1) == []


def test_a_live_submit_stops_sending_once_its_run_is_cancelled(
    run_cli, sample_dir, model_db, broker_env
):
    # no worker, and room in Redis for a few batches: the submit waits for workers
    env = {**broker_env, "DIGITSCORE_MAX_QUEUED_BYTES": "8000"}
    producer = start_producer("submit", str(sample_dir / "valid"), "--batch-size", "1",
                              "--database-url", model_db, env=env)
    deadline = time.monotonic() + 60
    while not query(model_db, "SELECT COUNT(*) AS n FROM batches")[0]["n"]:
        assert producer.poll() is None and time.monotonic() < deadline, producer.communicate()
        time.sleep(0.05)
    r = run_cli("cancel", "1", "--database-url", model_db)
    assert r.exit_code == 0, r.output
    out, err = producer.communicate(timeout=30)  # within a lease renewal or two
    assert producer.returncode == 1, (out, err)
    assert "Error: run 1 was cancelled (`producer cancel`): stopped sending" in err
    assert query(model_db, "SELECT COUNT(*) AS n FROM batches WHERE status = 'queued'")[0]["n"] == 0
    assert payload_keys(broker_env["DIGITSCORE_BROKER_URL"], 1) == []


def test_delete_and_prune_remove_everything_of_a_run_and_nothing_else(
    run_cli, sample_dir, any_model_db, redis_server
):
    db, broker = any_model_db, f"{redis_server}/{REDIS_DB}"
    for _ in range(2):  # scored in this process
        assert submit(run_cli, sample_dir / "valid", db, "--batch-size", "64").exit_code == 0
    engine = get_engine(db)
    with engine.begin() as conn:  # run 3: one batch stored, one not: running
        running, _ = queries.create_run(conn, 1, "/elsewhere", "celery")
        for seq in (0, 1):
            batch_life.record_batch(conn, running, seq, [f"3/{seq}.png"], 1)
    poisoned = batch_columns(batch_life.poison_rows(["3/0.png"], ["3"], 0))
    batch_life.store_batch(engine, running, 0, poisoned)
    token = run_row(db, 1)["token"]
    redis.Redis.from_url(broker).set(f"digitscore:payload:1:{token}:0", b"left over")
    before = {run_id: rows_by_table(db, run_id) for run_id in (1, 2, running)}

    r = run_cli("delete", "3", "--yes", "--database-url", db)
    assert r.exit_code == 2
    assert "run 3 is running: nothing was deleted; cancel it first (`producer cancel 3`)" in (
        r.output)
    r = run_cli("delete", "1", "--database-url", db)  # asked, and no answer
    assert r.exit_code == 1 and "delete 1 run?" in r.output, r.output
    r = run_cli("prune", "--older-than", "0s", "--dry-run", "--database-url", db)
    assert r.exit_code == 0, r.output
    assert [line.split(" (")[0] for line in r.output.splitlines()] == [
        "would delete run 1", "would delete run 2", "2 runs would be deleted"]
    assert {run_id: rows_by_table(db, run_id) for run_id in (1, 2, running)} == before

    r = run_cli("delete", "1", "--yes", "--broker-url", broker, "--database-url", db)
    assert r.exit_code == 0, r.output
    assert "deleted run 1: 200 rows, 4 batches; 1 payload deleted from Redis" in r.output
    assert set(rows_by_table(db, 1).values()) == {0}
    assert payload_keys(broker, 1) == []
    assert rows_by_table(db, 2) == before[2] and rows_by_table(db, running) == before[running]
    r = run_cli("prune", "--older-than", "30d", "--yes", "--database-url", db)
    assert r.output.startswith("no done or cancelled run ended before"), r.output
    r = run_cli("prune", "--older-than", "0s", "--yes", "--database-url", db)
    assert "deleted run 2: 200 rows, 4 batches" in r.output, r.output
    assert rows_by_table(db, running) == before[running]  # prune leaves a running run
    assert run_cli("cancel", "3", "--database-url", db).exit_code == 0
    r = run_cli("delete", "3", "--yes", "--vacuum", "--database-url", db)
    assert "deleted run 3: 1 rows, 2 batches" in r.output, r.output
    assert ("VACUUM: " in r.output) == db.startswith("sqlite"), r.output
    assert query(db, "SELECT COUNT(*) AS n FROM models")[0]["n"] == 1  # models stay
    # the ids of deleted runs, the newest among them, are never handed out again
    assert submit(run_cli, sample_dir / "valid", db, "--batch-size", "64").exit_code == 0
    assert [r["id"] for r in query(db, "SELECT id FROM runs")] == [4]
