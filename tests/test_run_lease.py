"""A live submitter is known: ``submit`` and ``resume`` hold a lease on their run, so
``status`` and ``runs`` tell "still being sent" from "interrupted", ``resume`` refuses while a
live process sends, and ``resume`` of a done run changes nothing (real ``producer``
processes, SQLite files)."""

from __future__ import annotations

import signal
import socket

import pytest
from sqlalchemy import text

from db.session import get_engine
from tests.test_faults import assert_exactly_once
from tests.test_submit_faults import pause_mid_submit, resume_producer, start_producer

pytestmark = pytest.mark.integration

FILES = 200  # the sample's validation digits


def dump(db_url: str) -> dict[str, list[tuple]]:
    with get_engine(db_url).connect() as conn:
        return {t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY id"))]
                for t in ("runs", "batches")}


def paused_submit(source, db_url: str):
    """A real ``producer submit`` of ``source`` in batches of 2, paused once it has recorded
    10 of them (holding its lease)."""
    producer = start_producer(
        "submit", str(source), "--batch-size", "2", "--database-url", db_url
    )
    pause_mid_submit(db_url, 10, producer)
    return producer


def test_resume_during_a_live_submit_is_refused_and_the_submit_completes(
    run_cli, sample_dir, model_db
):
    sqlite_url = model_db
    producer = paused_submit(sample_dir / "valid", sqlite_url)
    try:
        where = f"pid {producer.pid} on {socket.gethostname()}"
        r = run_cli("status", "1", "--database-url", sqlite_url)
        assert f"still being sent ({where})" in r.stdout, r.output
        assert "resume" not in r.stdout
        r = run_cli("runs", "--database-url", sqlite_url)
        assert f"run 1 still being sent ({where})" in r.stdout, r.output
        before = dump(sqlite_url)
        r = run_cli("resume", "1", "--database-url", sqlite_url)
        assert r.exit_code == 1, r.output
        assert r.stderr.strip() == (
            f"Error: run 1 is still being sent by {where} (its `producer submit` or `resume` "
            "is alive): nothing was changed; follow it with `producer wait 1`, or stop that "
            "process first"
        )
        assert dump(sqlite_url) == before
    finally:
        resume_producer(producer)
    out, err = producer.communicate(timeout=120)
    assert producer.returncode == 0, (out, err)
    assert "Traceback" not in out + err and "IntegrityError" not in out + err
    assert f"run 1: {FILES} images in {FILES // 2} batches" in out
    assert_exactly_once(sqlite_url, FILES)
    runs = dump(sqlite_url)["runs"]
    with get_engine(sqlite_url).connect() as conn:
        lease = conn.execute(text("SELECT lease_holder, lease_until FROM runs")).one()
    assert tuple(lease) == (None, None) and len(runs) == 1  # released at the end


def test_resume_retry_failed_during_a_live_submit_requeues_nothing(run_cli, sample_dir, model_db):
    """The lease is checked before any failed batch is made queued again (before: they were
    requeued, then the resume refused, leaving them owed to no sender). The live sender is
    this test's parent process, holding the run's lease."""
    import os

    from db.leases import take_lease

    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "50",
                "--database-url", model_db)
    assert r.exit_code == 0, r.output
    engine = get_engine(model_db)
    with engine.begin() as conn:
        conn.execute(text("UPDATE batches SET status = 'failed', deliveries = 3, "
                          "time_limited = 1 WHERE seq = 0"))
        conn.execute(text("UPDATE runs SET status = 'running'"))
    assert take_lease(engine, 1, f"{os.getppid()}@{socket.gethostname()}", 60) is None
    before = dump(model_db)
    r = run_cli("resume", "1", "--retry-failed", "--database-url", model_db)
    assert r.exit_code == 1, r.output
    assert "run 1 is still being sent by" in r.stderr and "nothing was changed" in r.stderr
    assert "to score again" not in r.stderr
    assert dump(model_db) == before


def test_resume_is_refused_at_once_while_the_live_sender_holds_the_write_lock(
    run_cli, sample_dir, model_db
):
    """A live sender stopped inside a transaction (Ctrl-Z, or the SIGSTOP of the test above)
    holds SQLite's write lock: the refusal reads the lease and waits on no writer (before:
    the lease's UPDATE waited out the 30 s busy timeout, then "database is locked")."""
    import os
    import sqlite3
    import time

    from db.leases import take_lease

    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "100",
                "--database-url", model_db)
    assert r.exit_code == 0, r.output
    engine = get_engine(model_db)
    with engine.begin() as conn:
        conn.execute(text("UPDATE runs SET status = 'running'"))
    assert take_lease(engine, 1, f"{os.getppid()}@{socket.gethostname()}", 60) is None
    writer = sqlite3.connect(model_db.removeprefix("sqlite:///"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        start = time.monotonic()
        r = run_cli("resume", "1", "--database-url", model_db)
        took = time.monotonic() - start
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert r.exit_code == 1, r.output
    assert "run 1 is still being sent by" in r.stderr and "nothing was changed" in r.stderr
    assert took < 10, took


def test_a_killed_submit_is_interrupted_at_once_and_resume_takes_over(
    run_cli, sample_dir, model_db
):
    sqlite_url = model_db
    producer = paused_submit(sample_dir / "valid", sqlite_url)
    producer.send_signal(signal.SIGKILL)
    producer.wait(30)
    r = run_cli("status", "1", "--database-url", sqlite_url)
    assert (f"interrupted before all was sent (pid {producer.pid} on {socket.gethostname()} "
            "stopped): run `producer resume 1` to send the rest") in r.stdout, r.output
    r = run_cli("wait", "1", "--timeout", "2", "--database-url", sqlite_url,
                env={"DIGITSCORE_STALL_HINT_AFTER": "1"})
    assert r.exit_code == 1, r.output
    assert ("no batch of run 1 stored for 1 s: interrupted before all was sent (pid "
            f"{producer.pid} on {socket.gethostname()} stopped)") in r.stderr, r.output
    r = run_cli("resume", "1", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    assert_exactly_once(sqlite_url, FILES)


def test_resume_of_a_done_run_changes_no_column(run_cli, sample_dir, model_db):
    sqlite_url = model_db
    r = run_cli("submit", str(sample_dir / "valid"), "--database-url", sqlite_url)
    assert r.exit_code == 0 and "status done" in r.stdout, r.output
    before = dump(sqlite_url)
    r = run_cli("resume", "1", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "run 1 is done: nothing to re-send, nothing changed"
    assert dump(sqlite_url) == before
