"""Nothing lost, nothing duplicated: real workers killed, stopped and starved of their
broker and database mid-run, on the real Redis and PostgreSQL of this machine."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from db.session import get_engine
from tests.support import (
    FAULTS,
    assert_exactly_once,
    created,
    pool_children,
    run_row,
    save_model,
    submit_in_background,
    wait_done,
    wait_for_log,
    wait_scored,
)

pytestmark = pytest.mark.integration


def test_killed_workers_lose_no_image(
    run_cli, classifier, sample_dir, postgres_url, broker_env, start_worker
):
    save_model(postgres_url, classifier)
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": postgres_url,
           "DIGITSCORE_VISIBILITY_TIMEOUT": "5", "DIGITSCORE_TEST_TASK_DELAY": "0.3"}
    workers = [start_worker(env, "--device", "cpu", *FAULTS, name=f"w{i}") for i in range(2)]
    for w in workers:
        wait_for_log(w, "ready.")
    producer = submit_in_background(postgres_url, sample_dir, env, "--batch-size", "25")
    start = time.monotonic()
    # SIGKILL the processes scoring, mid-batch, three times (each delivery takes >= 0.3 s)
    kills = 0
    while kills < 3 and time.monotonic() - start < 60:
        time.sleep(0.7)
        victims = pool_children(workers[kills % 2])
        if victims:
            os.kill(victims[0], signal.SIGKILL)
            kills += 1
    # and once a whole worker (launcher, Celery main process and pool) with its batch in hand
    wait_for_log(workers[0], "received", count=4)
    os.killpg(workers[0].pid, signal.SIGKILL)
    assert producer.wait(60) == 0, producer.stdout.read()
    run = wait_done(postgres_url, timeout=5 + 60)
    assert kills == 3
    assert_exactly_once(postgres_url, 1000)
    assert run["n_failed"] == 0
    log = Path(workers[1].log_path).read_text()
    assert "WorkerLostError" in log or "exited with" in log or "signal 9" in log


def test_poison_batch_is_failed_after_bounded_deliveries(
    run_cli, classifier, sample_dir, tmp_path, sqlite_url, broker_env, start_worker
):
    save_model(sqlite_url, classifier)
    src = tmp_path / "images"
    shutil.copytree(sample_dir / "valid", src)
    shutil.copy(next((src / "3").glob("*.png")), src / "3" / "poison.png")
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url}
    worker = start_worker(env, "--device", "cpu", *FAULTS)
    wait_for_log(worker, "ready.")
    r = run_cli("submit", str(src), "--batch-size", "20", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    run = wait_done(sqlite_url, timeout=120)
    assert_exactly_once(sqlite_url, 201)
    with get_engine(sqlite_url).connect() as conn:
        failed = conn.execute(text(
            "SELECT seq, n_images, deliveries FROM batches WHERE status = 'failed'")).all()
        errors = conn.execute(text(
            "SELECT COUNT(*) FROM predictions WHERE error LIKE '%poison batch%'")).scalar()
    assert len(failed) == 1
    seq, n_images, deliveries = failed[0]
    assert deliveries == 4  # three deaths, then given up on
    assert errors == n_images == run["n_failed"]
    assert run["n_scored"] == 201 - n_images
    assert worker.poll() is None  # the worker survived: Celery replaced each dead process


def test_a_model_that_cannot_be_loaded_fails_its_batches_within_the_delivery_limit(
    run_cli, classifier, sample_dir, tmp_path, sqlite_url, broker_env, start_worker
):
    """Damaged weights: each delivery fails to load the model and counts a failed delivery;
    the claim after the third gives the batch up before loading anything, so every batch ends
    failed (never cycling), its rows naming the model's problem."""
    save_model(sqlite_url, classifier)
    with get_engine(sqlite_url).begin() as conn:
        conn.execute(text("UPDATE models SET sgd_weights = :b"), {"b": b"\x00" * 12})
    src = tmp_path / "images" / "3"
    src.mkdir(parents=True)
    for f in sorted((sample_dir / "valid" / "3").glob("*.png"))[:12]:
        shutil.copy(f, src / f.name)
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    r = run_cli("submit", str(src.parent), "--batch-size", "6", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    run = wait_done(sqlite_url, timeout=60)
    with get_engine(sqlite_url).connect() as conn:
        batches = conn.execute(text("SELECT status, deliveries FROM batches")).all()
        errors = conn.execute(text("SELECT DISTINCT error FROM predictions")).scalars().all()
    assert [tuple(b) for b in batches] == [("failed", 4), ("failed", 4)]
    assert run["n_failed"] == 12 and run["n_scored"] == 0
    assert len(errors) == 1 and "after 3 failed deliveries" in errors[0]
    assert "model 1 could not be loaded" in errors[0], errors[0]


def test_redis_restart_mid_run_then_resume_completes(
    run_cli, classifier, sample_dir, postgres_url, own_redis, start_worker
):
    save_model(postgres_url, classifier)
    env = {"DIGITSCORE_BROKER_URL": own_redis.url, "DIGITSCORE_DATABASE_URL": postgres_url,
           "DIGITSCORE_TEST_TASK_DELAY": "0.2"}
    workers = [start_worker(env, "--device", "cpu", *FAULTS, name=f"w{i}") for i in range(2)]
    for w in workers:
        wait_for_log(w, "ready.")
    r = run_cli("submit", str(sample_dir), "--batch-size", "25", "--database-url", postgres_url,
                env={"DIGITSCORE_BROKER_URL": own_redis.url})
    assert r.exit_code == 0, r.output
    wait_scored(postgres_url, 100)
    own_redis.kill()  # every queued batch is gone: Redis keeps nothing on disk
    own_redis.start()
    time.sleep(1)
    assert run_row(postgres_url)["status"] == "running"
    r = run_cli("resume", "1", "--wait", "--database-url", postgres_url,
                env={"DIGITSCORE_BROKER_URL": own_redis.url})
    assert r.exit_code == 0, r.output
    assert "re-sent" in r.stdout
    assert_exactly_once(postgres_url, 1000)
    assert run_row(postgres_url)["status"] == "done"


def score_through_a_database_outage(
    run_cli, classifier, sample_dir: Path, postgres_url: str, broker_env: dict, start_worker,
    seconds: float, extra_env: dict | None = None, submit_env: dict | None = None,
) -> tuple[dict, list]:
    """Two workers reach PostgreSQL through a TCP proxy; 1,000 images are submitted, the
    proxy is cut for ``seconds`` once 100 are stored, then opened again. Returns the finished
    run's row and the workers."""
    from tests.tcp_proxy import TcpProxy

    extra = extra_env or {}
    save_model(postgres_url, classifier)
    proxy = TcpProxy("127.0.0.1", 5432)
    _base, _, name = postgres_url.rpartition("/")
    via_proxy = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{name}"
    env = {**broker_env, **extra, "DIGITSCORE_DATABASE_URL": via_proxy,
           "DIGITSCORE_TEST_TASK_DELAY": "0.1"}
    try:
        workers = [start_worker(env, "--device", "cpu", *FAULTS, name=f"w{i}") for i in range(2)]
        for w in workers:
            wait_for_log(w, "ready.")
        r = run_cli("submit", str(sample_dir), "--batch-size", "25", "--database-url",
                    postgres_url, env=submit_env)
        assert r.exit_code == 0, r.output
        wait_scored(postgres_url, 100)
        proxy.cut()
        time.sleep(seconds)
        proxy.open()
        run = wait_done(postgres_url, timeout=120)
    finally:
        proxy.close()
    return run, workers


def test_database_away_for_a_while_tasks_retry_and_run_completes(
    run_cli, classifier, sample_dir, postgres_url, broker_env, start_worker
):
    run, workers = score_through_a_database_outage(
        run_cli, classifier, sample_dir, postgres_url, broker_env, start_worker, seconds=6
    )
    assert_exactly_once(postgres_url, 1000)
    assert run["n_failed"] == 0
    logs = "".join(Path(w.log_path).read_text() for w in workers)
    assert "Retry in" in logs  # the outage was seen, and ridden out with backoff


def test_database_away_longer_than_the_visibility_timeout_marks_nothing_poison(
    run_cli, classifier, sample_dir, postgres_url, broker_env, start_worker
):
    """An outage four times the visibility timeout: the retries wait less than the timeout
    (the longest retry wait follows from it), and copies Redis hands out again are no deaths, so
    every batch is scored and none is failed as poison. Messages are signed
    (DIGITSCORE_SECRET): a retry keeps its message's signature."""
    secret = {"DIGITSCORE_SECRET": "faults-test-secret-0c9a71e2"}
    run, workers = score_through_a_database_outage(
        run_cli, classifier, sample_dir, postgres_url, broker_env, start_worker, seconds=20,
        extra_env={**secret, "DIGITSCORE_VISIBILITY_TIMEOUT": "5"}, submit_env=secret,
    )
    for w in workers:
        assert "database retries at most 2 s apart" in Path(w.log_path).read_text()
    assert_exactly_once(postgres_url, 1000)
    assert run["n_failed"] == 0
    with get_engine(postgres_url).connect() as conn:
        undone = conn.execute(text("SELECT COUNT(*) FROM batches WHERE status <> 'done'"))
        assert undone.scalar() == 0
    logs = "".join(Path(w.log_path).read_text() for w in workers)
    assert "Retry in" in logs and "killed" not in logs and "dropped" not in logs


def test_producer_killed_mid_submit_then_resume_completes(
    run_cli, classifier, sample_dir, tmp_path, postgres_url, broker_env, start_worker
):
    save_model(postgres_url, classifier)
    src = tmp_path / "images"
    for i in range(3):
        shutil.copytree(sample_dir / "valid", src / f"part{i}")
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": postgres_url}
    worker = start_worker(env, "--device", "cpu")
    wait_for_log(worker, "ready.")
    producer = submit_in_background(postgres_url, src, broker_env, "--batch-size", "1")
    engine = get_engine(postgres_url)
    deadline = time.monotonic() + 60
    while True:
        with engine.connect() as conn:
            sent = conn.execute(text("SELECT COUNT(*) FROM batches")).scalar()
        if sent >= 50 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    producer.kill()
    producer.wait()
    run = run_row(postgres_url)
    assert run["submitted_at"] is None and run["n_images"] is None  # killed mid-walk
    r = run_cli("resume", "1", "--wait", "--database-url", postgres_url, env=broker_env)
    assert r.exit_code == 0, r.output
    assert_exactly_once(postgres_url, 600)


def test_sigterm_finishes_the_batch_in_hand(
    run_cli, classifier, sample_dir, sqlite_url, broker_env, start_worker
):
    save_model(sqlite_url, classifier)
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url,
           "DIGITSCORE_TEST_TASK_DELAY": "2"}
    worker = start_worker(env, "--device", "cpu", *FAULTS)
    wait_for_log(worker, "ready.")
    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "50",
                "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    # scoring it (a batch received while the pool process still times its sample at start
    # is only reserved, and a warm shutdown puts it back)
    wait_for_log(worker, "loaded model")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    log = Path(worker.log_path).read_text()
    assert log.count("succeeded") == 1  # the batch in hand was finished, no other taken
    assert run_row(sqlite_url)["n_scored"] == 50
    replacement = start_worker(env | {"DIGITSCORE_TEST_TASK_DELAY": "0"}, "--device", "cpu")
    wait_for_log(replacement, "ready.")
    wait_done(sqlite_url, timeout=60)
    assert_exactly_once(sqlite_url, 200)


def _images_with(sample_dir: Path, tmp_path: Path, name: str) -> Path:
    """The 200 validation images and one more, named ``name``: 201 files."""
    src = tmp_path / "images"
    shutil.copytree(sample_dir / "valid", src)
    shutil.copy(next((src / "7").glob("*.png")), src / "7" / name)
    return src


def test_a_scoring_error_requeues_the_batch_and_the_run_completes(
    run_cli, classifier, sample_dir, tmp_path, sqlite_url, broker_env, start_worker
):
    save_model(sqlite_url, classifier)
    src = _images_with(sample_dir, tmp_path, "flaky-bug.png")
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url,
           "DIGITSCORE_TEST_FAULT_DIR": str(tmp_path)}
    worker = start_worker(env, "--device", "cpu", *FAULTS)
    wait_for_log(worker, "ready.")
    r = run_cli("submit", str(src), "--batch-size", "20", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    # back in the queue after 1 s: far sooner than the visibility timeout (600 s) would bring it
    run = wait_done(sqlite_url, timeout=60)
    assert (tmp_path / "flaky-bug").exists()  # the fault did fire
    assert_exactly_once(sqlite_url, 201)
    assert run["n_failed"] == 0
    log = wait_for_log(worker, "failed delivery 1 of 3: the batch goes back to the queue in 1 s")
    assert "scoring failed: " in log
    assert "injected scoring bug" in log
    assert worker.poll() is None  # not a device error: the worker goes on


def test_a_device_error_requeues_the_batch_and_stops_the_worker(
    run_cli, classifier, sample_dir, tmp_path, postgres_url, broker_env, start_worker
):
    save_model(postgres_url, classifier)
    src = _images_with(sample_dir, tmp_path, "flaky-cuda.png")
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": postgres_url,
           "DIGITSCORE_TEST_FAULT_DIR": str(tmp_path)}
    first = start_worker(env, "--device", "cpu", *FAULTS, name="first")
    wait_for_log(first, "ready.")
    r = run_cli("submit", str(src), "--batch-size", "20", "--database-url", postgres_url)
    assert r.exit_code == 0, r.output
    assert first.wait(60) == 75  # the device's status, passed on by the launcher
    log = Path(first.log_path).read_text()
    assert "device error on cpu: CUDA error: an illegal memory access" in log
    assert "the worker on cpu" in log and "status 75" in log
    assert run_row(postgres_url)["status"] == "running"
    # what a supervisor does: start it again; the batch is in the queue, not lost
    second = start_worker(env, "--device", "cpu", *FAULTS, name="second")
    run = wait_done(postgres_url, timeout=60)
    assert_exactly_once(postgres_url, 201)
    assert run["n_failed"] == 0
    assert second.poll() is None


def test_a_device_that_fails_at_start_stops_the_worker_naming_it(
    sqlite_url, broker_env, start_worker
):
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": created(sqlite_url),
           "DIGITSCORE_TEST_DEVICE_START_FAULT": "1"}
    worker = start_worker(env, "--device", "cpu", *FAULTS)
    assert worker.wait(60) == 75
    log = Path(worker.log_path).read_text()
    assert "cannot score on cpu: injected: CUDA does not start" in log
    assert "scores on cpu" not in log  # no pool process went on to take batches
