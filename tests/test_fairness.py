"""Runs share the workers (docs/fairness.md), the queue can be seen (`producer queue`,
`status`), and the workers' Prometheus metrics count what the database holds
(docs/metrics.md): real Redis, real worker processes, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from core import wire
from tests.support import (
    FAULTS,
    drop_queue,
    query,
    save_model,
    submit,
    wait_done,
    wait_for_log,
    wait_scored,
)
from tests.tcp_proxy import free_port

pytestmark = pytest.mark.integration

#: Seconds every batch of a slow worker takes longer, so that a big run lasts many seconds.
SLOW_BATCH = "0.15"


@pytest.fixture
def slow_worker(model_db, broker_env, start_worker):
    """One pool process on the CPU whose every batch takes SLOW_BATCH s longer."""
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": model_db,
           "DIGITSCORE_TEST_TASK_DELAY": SLOW_BATCH}
    worker = start_worker(env, "--device", "cpu", *FAULTS)
    wait_for_log(worker, "ready.")
    return worker


def big_run_going(run_cli, sample_dir: Path, db_url: str) -> None:
    """Run 1: the 800 training digits in 40 batches (6 s or more on the slow worker), sent
    and being scored."""
    r = submit(run_cli, sample_dir / "train", db_url, "--batch-size", "20")
    assert r.exit_code == 0 and "40 batches" in r.stdout, r.output
    wait_scored(db_url, 20, timeout=60, run_id=1)


def batches_after(db_url: str, run_id: int, other: int) -> int:
    """How many batches of run ``run_id`` were stored after run ``other`` was done."""
    (row,) = query(db_url, "SELECT COUNT(*) AS n FROM batches WHERE run_id = :r AND "
                   "finished_at > (SELECT finished_at FROM runs WHERE id = :o)", r=run_id,
                   o=other)
    return int(row["n"])


def test_a_small_run_finishes_before_a_big_run_submitted_earlier(
    slow_worker, run_cli, sample_dir, model_db
):
    big_run_going(run_cli, sample_dir, model_db)
    r = submit(run_cli, sample_dir / "valid" / "3", model_db)  # one batch, a normal run
    assert r.exit_code == 0 and "run 2:" in r.stdout, r.output
    small = wait_done(model_db, timeout=60, run_id=2)
    big = wait_done(model_db, timeout=120, run_id=1)
    assert small["finished_at"] < big["finished_at"]
    # served within the batches in flight, not after the big run's backlog
    assert batches_after(model_db, 1, 2) >= 25


def test_a_high_priority_run_overtakes_a_normal_one(slow_worker, run_cli, sample_dir, model_db):
    big_run_going(run_cli, sample_dir, model_db)
    # eight batches: its last four are past the boosted first ones, and still go first
    r = submit(run_cli, sample_dir / "valid", model_db, "--batch-size", "25",
               "--priority", "high")
    assert r.exit_code == 0 and "8 batches" in r.stdout, r.output
    high = wait_done(model_db, timeout=60, run_id=2)
    big = wait_done(model_db, timeout=120, run_id=1)
    assert high["priority"] == "high" and big["priority"] == "normal"
    assert batches_after(model_db, 1, 2) >= 20


def test_queue_and_status_show_what_waits_and_what_is_ahead(
    run_cli, sample_dir, any_model_db, broker_env
):
    """No worker: both runs wait whole; the high run's next batch is first, the normal
    run's behind all eight of it."""
    db = any_model_db
    assert submit(run_cli, sample_dir / "valid" / "3", db, "--batch-size", "10").exit_code == 0
    r = submit(run_cli, sample_dir / "valid", db, "--batch-size", "25", "--priority", "high")
    assert r.exit_code == 0, r.output
    r = run_cli("queue", "--json", "--database-url", db)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    counted = {row["run_id"]: (row["n"], row["images"]) for row in query(
        db, "SELECT run_id, COUNT(*) AS n, SUM(n_images) AS images FROM batches "
        "WHERE status = 'queued' GROUP BY run_id")}
    shown = {run["run"]: (run["batches_waiting"], run["images_waiting"]) for run in doc["runs"]}
    assert shown == counted == {1: (10, 100), 2: (8, 200)}
    assert [(run["run"], run["priority"], run["batches_ahead"]) for run in doc["runs"]] == [
        (2, "high", 0), (1, "normal", 8)]
    steps = doc["broker"]["by_priority_step"]
    assert steps == {"0": 4, "1": 4, "2": 4, "3": 6, "4": 0, "5": 0}
    assert doc["broker"]["messages_waiting"] == 18
    r = run_cli("status", "1", "--database-url", db)
    assert r.exit_code == 0, r.output
    first, second = r.stdout.splitlines()
    assert first.startswith("run 1 queued, priority normal: 0/100 done"), first
    assert second.startswith(
        "run 1: 10 batches of 100 images waiting, 8 batches ahead of it on the broker; "
        "0 images/s over the last 20 s; estimated end in ?"), second
    r = run_cli("runs", "--database-url", db)
    assert [line.split()[4] for line in r.stdout.splitlines()[1:]] == ["high", "normal"]
    # the broker lost everything: resume sends the high run again at its stored priority
    drop_queue(redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"]),
               broker_env["DIGITSCORE_QUEUE"])
    assert run_cli("resume", "2", "--database-url", db).exit_code == 0
    doc = json.loads(run_cli("queue", "--json", "--database-url", db).stdout)
    assert doc["broker"]["by_priority_step"] == {"0": 4, "1": 4, "2": 0, "3": 0, "4": 0, "5": 0}


def scrape(port: int) -> dict[str, float]:
    """The metrics the worker serves, by name and labels as written."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_the_metrics_endpoint_serves_the_counts_of_the_rows_stored(
    run_cli, classifier, sample_dir, sqlite_url, tmp_path, broker_env, start_worker
):
    """Scored rows, failed rows (a file that is no image, and a poison batch's rows, from
    pool processes that died: their counts survive them), batches and the queue's depth:
    each equal to SQL over the rows."""
    save_model(sqlite_url, classifier)
    src = tmp_path / "images"
    shutil.copytree(sample_dir / "valid" / "3", src / "3")
    shutil.copy(next((src / "3").glob("*.png")), src / "3" / "poison.png")
    (src / "3" / "broken.png").write_bytes(b"not a png")
    port = free_port()
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url}
    worker = start_worker(env, "--device", "cpu", "--metrics-port", str(port), *FAULTS)
    wait_for_log(worker, "ready.")
    assert scrape(port)["digitscore_images_scored_total"] == 0
    r = submit(run_cli, src, sqlite_url, "--batch-size", "20")
    assert r.exit_code == 0, r.output
    wait_done(sqlite_url, timeout=120)
    (sql,) = query(sqlite_url, """
        SELECT SUM(CASE WHEN error IS NULL THEN 1 ELSE 0 END) AS scored,
               SUM(CASE WHEN error IS NULL THEN 0 ELSE 1 END) AS failed,
               (SELECT COUNT(*) FROM batches WHERE status = 'done') AS done,
               (SELECT COUNT(*) FROM batches WHERE status = 'failed') AS poisoned
        FROM predictions""")
    assert sql["poisoned"] == 1 and sql["failed"] > 20 and sql["scored"] > 60, sql
    deadline = time.monotonic() + 10  # the last batch's counts are written after its commit
    while True:
        seen = scrape(port)
        counts = {name: seen[f"digitscore_{metric}_total"] for name, metric in (
            ("scored", "images_scored"), ("failed", "failed_rows"), ("done", "batches_scored"),
            ("poisoned", "batches_poisoned"))}
        if counts == sql or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert counts == sql
    assert seen["digitscore_scoring_seconds_count"] == sql["done"]
    depth = [seen[f'digitscore_queue_messages{{priority_step="{step}",queue="'
                  f'{broker_env["DIGITSCORE_QUEUE"]}"}}'] for step in wire.PRIORITY_STEPS]
    assert depth == [0] * len(wire.PRIORITY_STEPS)
