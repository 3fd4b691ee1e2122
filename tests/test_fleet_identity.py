"""A misconfigured fleet says so: run identity across databases, and the worker registry, on
real Redis, real databases and real worker processes."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import text

from db.session import get_engine
from tests.support import save_model, wait_for_log

pytestmark = pytest.mark.integration


def dump(url: str, table: str) -> list[tuple]:
    with get_engine(url).connect() as conn:
        return [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY 1, 2, 3"))]


def test_a_worker_on_another_database_changes_nothing_in_it(
    run_cli, classifier, sample_dir, tmp_path, broker_env, start_worker
):
    """The producer on database A, the worker on database B, which has a run with the same id:
    B's runs and batches stay byte for byte as they were, the worker says why, names its own
    database (no password), and the batch's payload is deleted."""
    import redis

    producer_db = f"sqlite:///{tmp_path / 'producer.db'}"
    worker_db = f"sqlite:///{tmp_path / 'worker.db'}"
    for url in (producer_db, worker_db):
        save_model(url, classifier)
    # database B already holds a run 1 of its own
    r = run_cli("submit", str(sample_dir / "valid" / "3"), "--database-url", worker_db,
                env={"DIGITSCORE_BROKER_URL": None})  # scored in this process
    assert r.exit_code == 0, r.output
    before = {t: dump(worker_db, t) for t in ("runs", "batches")}

    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": worker_db},
                          "--device", "cpu")
    wait_for_log(worker, "ready.")
    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "50",
                "--database-url", producer_db)
    assert r.exit_code == 0, r.output
    log = wait_for_log(worker, "has another token", count=4)
    assert "This worker's database is sqlite:///" in log and "worker.db" in log
    assert {t: dump(worker_db, t) for t in ("runs", "batches")} == before
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    deadline = time.monotonic() + 10
    while list(client.scan_iter("digitscore:payload:1:*")):
        assert time.monotonic() < deadline, "the mismatched batches' payloads are still there"
        time.sleep(0.2)


def test_live_workers_are_listed_with_their_device_and_counts(
    run_cli, classifier, sample_dir, sqlite_url, broker_env, start_worker
):
    save_model(sqlite_url, classifier)
    r = run_cli("workers", "--database-url", sqlite_url)
    assert r.exit_code == 0 and "no live worker writes to this database" in r.output
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url},
                          "--device", "cpu")
    wait_for_log(worker, "ready.")
    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "50", "--wait",
                "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    r = run_cli("workers", "--json", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert row["device"] == "cpu" and row["queue"] == broker_env["DIGITSCORE_QUEUE"]
    assert (row["batches"], row["images"]) == (4, 200)
    assert row["name"].startswith("digitscore-cpu") and row["stopped_at"] is None
    worker.terminate()
    worker.wait(30)
    r = run_cli("workers", "--database-url", sqlite_url)
    assert "no live worker" in r.output  # a warm shutdown marks it stopped
