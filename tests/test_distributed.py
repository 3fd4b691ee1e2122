"""Distributed scoring on the real Redis and PostgreSQL with two real worker processes."""

from __future__ import annotations

import time

import pytest
from kombu import Connection, Exchange, Producer, Queue
from sqlalchemy import text

from db.model_store import load_classifier
from db.session import get_engine
from producer.submit import EmbeddedSender, submit_directory
from tests.support import save_model, wait_for_log

pytestmark = pytest.mark.integration


def test_two_workers_score_every_image_exactly_once(
    run_cli, classifier, sample_dir, postgres_url, broker_env, start_worker
):
    save_model(postgres_url, classifier)
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": postgres_url}
    workers = [start_worker(env, "--device", "cpu", name=f"w{i}") for i in range(2)]
    for w in workers:
        wait_for_log(w, "ready.")
    r = run_cli("submit", str(sample_dir), "--batch-size", "40", "--wait",
                "--database-url", postgres_url)
    assert r.exit_code == 0, r.output
    assert "run 1: 1,000 images in 25 batches" in r.stdout
    engine = get_engine(postgres_url)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT COUNT(*), COUNT(DISTINCT path) FROM predictions WHERE run_id = 1"
        )).one()
        run = conn.execute(text("SELECT * FROM runs WHERE id = 1")).mappings().one()
        batches = conn.execute(text("SELECT status, COUNT(*) FROM batches GROUP BY status")).all()
    assert tuple(rows) == (1000, 1000)
    assert run["status"] == "done" and run["n_scored"] == 1000 and run["backend"] == "celery"
    assert batches == [("done", 25)]
    # both processes took work, each logging the device it scores on
    for w in workers:
        log = wait_for_log(w, "succeeded")
        assert "scores on cpu" in log

    # the same directory scored in this process gives the same predictions and accuracies
    with engine.connect() as conn:
        clf = load_classifier(conn, 1)
    sub = submit_directory(engine, sample_dir, 1, EmbeddedSender(engine, clf))
    with engine.connect() as conn:
        embedded = conn.execute(text("SELECT * FROM runs WHERE id = :r"),
                                {"r": sub.run_id}).mappings().one()
        differ = conn.execute(text(
            "SELECT COUNT(*) FROM predictions a JOIN predictions b ON a.path = b.path "
            "WHERE a.run_id = 1 AND b.run_id = :r AND (a.pred_l1 <> b.pred_l1 OR "
            "a.pred_l2 <> b.pred_l2 OR a.pred_sgd <> b.pred_sgd)"), {"r": sub.run_id}).scalar()
    assert differ == 0
    for p in ("l1", "l2", "sgd"):
        assert run[f"accuracy_{p}"] == embedded[f"accuracy_{p}"]


def test_unreachable_broker_fails_fast_masks_password_and_creates_no_run(
    run_cli, classifier, sample_dir, sqlite_url
):
    save_model(sqlite_url, classifier)
    url = "redis://:s3cret-pw@127.0.0.1:1/0"  # nothing listens on port 1
    start = time.monotonic()
    r = run_cli("submit", str(sample_dir / "valid"), "--database-url", sqlite_url,
                env={"DIGITSCORE_BROKER_URL": url})
    elapsed = time.monotonic() - start
    assert r.exit_code != 0
    assert "127.0.0.1:1" in r.output and "s3cret-pw" not in r.output
    assert elapsed < 10
    with get_engine(sqlite_url).connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM runs")).scalar() == 0


def test_pickled_message_is_refused_and_the_worker_keeps_going(
    run_cli, classifier, sample_dir, sqlite_url, broker_env, start_worker
):
    save_model(sqlite_url, classifier)
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url},
                          "--device", "cpu")
    wait_for_log(worker, "ready.")
    queue_name = broker_env["DIGITSCORE_QUEUE"]
    with Connection(broker_env["DIGITSCORE_BROKER_URL"]) as conn:
        queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
        Producer(conn).publish(
            {"task": "digitscore.score_batch", "id": "evil", "args": [], "kwargs": {}},
            serializer="pickle", exchange=queue.exchange, routing_key=queue_name,
            declare=[queue], headers={"task": "digitscore.score_batch", "id": "evil"},
        )
    log = wait_for_log(worker, "Refusing to deserialize untrusted content", timeout=30)
    assert "of type pickle" in log
    r = run_cli("submit", str(sample_dir / "valid"), "--wait", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    assert worker.poll() is None
    with get_engine(sqlite_url).connect() as conn:
        assert conn.execute(text("SELECT n_scored FROM runs")).scalar() == 200


def test_sqlite_holds_up_under_several_writing_workers(
    run_cli, classifier, sample_dir, sqlite_url, broker_env, start_worker
):
    save_model(sqlite_url, classifier)
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url}
    # two workers with two processes each: four processes writing to one SQLite file
    workers = [start_worker(env, "--device", "cpu", "--concurrency", "2", name=f"w{i}")
               for i in range(2)]
    for w in workers:
        wait_for_log(w, "ready.")
    r = run_cli("submit", str(sample_dir), "--batch-size", "10", "--wait",
                "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    with get_engine(sqlite_url).connect() as conn:
        rows = conn.execute(text("SELECT COUNT(*), COUNT(DISTINCT path) FROM predictions")).one()
        run = conn.execute(text("SELECT status, n_scored FROM runs")).one()
        done = conn.execute(text("SELECT COUNT(*) FROM batches WHERE status = 'done'")).scalar()
    assert tuple(rows) == (1000, 1000)
    assert tuple(run) == ("done", 1000)
    assert done == 100
    logs = "".join(open(w.log_path).read() for w in workers)
    assert "database is locked" not in logs and "Traceback" not in logs
