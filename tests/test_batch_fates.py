"""Every failure leaves a batch stored, owed (left for a re-send) or failed for a stated reason
a user can retry; nothing is acknowledged without one of them. Real Redis servers, real
``worker`` and ``producer`` processes (issue 24)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from datetime import datetime

import pytest

from core import defaults
from tests.count_checks import assert_counts_agree
from tests.support import (
    FAULTS,
    ROOT,
    RedisServer,
    assert_exactly_once,
    cli_command,
    query,
    save_model,
    service_missing,
    submit_and_watch,
    wait_done,
    wait_for_log,
)

pytestmark = pytest.mark.integration


def redis_server_of_our_own(tmp_path, *options: str) -> RedisServer:
    if shutil.which("redis-server") is None:
        service_missing("redis-server binary")
    return RedisServer(tmp_path, *options)


def producer(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args), env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("options", "problem", "fix"),
    [
        (("--maxmemory-policy", "allkeys-lru"), "its maxmemory-policy is allkeys-lru",
         "CONFIG SET maxmemory-policy noeviction"),
        (("--rename-command", "CONFIG", '""'), "its maxmemory-policy cannot be read",
         f"set {defaults.ALLOW_EVICTION_ENV}=1"),
    ],
)
def test_a_redis_that_may_evict_batches_is_refused_unless_allowed(
    tmp_path, sample_dir, model_db, start_worker, options, problem, fix
):
    """An evicting Redis under memory pressure drops queued batches and the queue itself
    without a trace: producer and worker refuse it (exit 2) saying why and how to set it;
    DIGITSCORE_ALLOW_EVICTION=1 (a managed Redis that hides CONFIG) lets both run, warned."""
    server = redis_server_of_our_own(tmp_path, *options)
    try:
        env = {"DIGITSCORE_BROKER_URL": server.url, "DIGITSCORE_QUEUE": "evicting"}
        images = str(sample_dir / "valid" / "3")
        done = producer("submit", images, "--database-url", model_db, env=env)
        assert done.returncode == 2, done.stderr
        assert problem in done.stderr and fix in done.stderr
        assert query(model_db, "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0
        worker = start_worker({**env, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu")
        assert worker.wait(60) == 2
        log = open(worker.log_path).read()
        assert problem in log and fix in log

        allowed = {**env, defaults.ALLOW_EVICTION_ENV: "1"}
        done = producer("submit", images, "--database-url", model_db, env=allowed)
        assert done.returncode == 0, done.stderr
        assert f"warning: the broker {server.url}: {problem}" in done.stderr
        worker = start_worker({**allowed, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu")
        wait_for_log(worker, f"warning: the broker {server.url}: {problem}")
        os.killpg(worker.pid, signal.SIGTERM)
    finally:
        server.kill()


def test_a_broker_down_at_start_has_its_eviction_policy_checked_once_it_comes_up(
    tmp_path, model_db, start_worker
):
    """The launcher cannot ask a broker that is down; the worker asks as it connects, before
    it consumes anything, and stops (status 2) on an evicting Redis; a producer's sender made
    while the broker was down asks before it first sends (before: neither asked again)."""
    import redis

    from core.errors import BrokerUnavailable, RedisPolicyError
    from core.settings import Settings
    from core.wire import BatchMessage
    from producer.queue import CelerySender

    server = redis_server_of_our_own(tmp_path, "--maxmemory-policy", "allkeys-lru")
    server.kill()  # its port is known: it comes up later
    env = {"DIGITSCORE_BROKER_URL": server.url, "DIGITSCORE_QUEUE": "evicting-later"}
    try:
        worker = start_worker({**env, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu")
        wait_for_log(worker, "does not answer yet")
        sender = CelerySender(Settings.from_env(env))
        with pytest.raises(BrokerUnavailable):
            sender.send(BatchMessage(1, 0, "token"), None)
        server.start()
        with pytest.raises(RedisPolicyError, match="its maxmemory-policy is allkeys-lru"):
            sender.send(BatchMessage(1, 0, "token"), None)
        assert redis.Redis.from_url(server.url).llen("evicting-later") == 0
        assert worker.wait(90) == 2
        log = open(worker.log_path).read()
        assert "its maxmemory-policy is allkeys-lru" in log and "Stopping this worker" in log
        assert " ready." not in log
    finally:
        server.kill()


SECRET_A, SECRET_B = "a-secret-of-the-producer-0123", "b-secret-of-the-workers-4567"


def test_workers_signing_with_another_secret_are_named_and_their_batches_stay_owed(
    run_cli, sample_dir, model_db, broker_env, start_worker
):
    """Workers whose DIGITSCORE_SECRET is not the producer's drop its messages: --wait and
    `producer workers` name the mismatch (the workers register a fingerprint, never the
    secret), no batch is marked failed, and once the secrets match `resume` scores the run."""
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db,
                           "DIGITSCORE_SECRET": SECRET_B}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    env = {**broker_env, "DIGITSCORE_SECRET": SECRET_A, "DIGITSCORE_STALL_HINT_AFTER": "2"}
    status, _out, err = submit_and_watch(
        sample_dir / "valid", model_db, env, "--batch-size", "50", "--timeout", "6"
    )
    text = "\n".join(line for _, line in err)
    queue = broker_env["DIGITSCORE_QUEUE"]
    assert status == 1 and f"the workers on queue {queue} (digitscore-cpu-" in text, text
    assert "sign with another secret than this producer's DIGITSCORE_SECRET" in text, text
    wait_for_log(worker, "bad signature", count=4)
    r = run_cli("workers", "--database-url", model_db, env={"DIGITSCORE_SECRET": SECRET_A})
    assert f"the workers on queue {queue} (digitscore-cpu-" in r.output, r.output
    r = run_cli("workers", "--database-url", model_db, env={"DIGITSCORE_SECRET": SECRET_B})
    assert "another secret" not in r.output, r.output
    (signing,) = {row["signing"] for row in query(model_db, "SELECT signing FROM workers")}
    assert len(signing) == 16 and SECRET_B not in signing and signing != "none"
    batches = query(model_db, "SELECT status, COUNT(*) AS n FROM batches GROUP BY status")
    assert batches == [{"status": "queued", "n": 4}]  # owed: none failed, none stored
    assert query(model_db, "SELECT COUNT(*) AS n FROM predictions")[0]["n"] == 0

    r = run_cli("resume", "1", "--wait", "--database-url", model_db,
                env={"DIGITSCORE_SECRET": SECRET_B})
    assert r.exit_code == 0, r.output
    rows = query(model_db, "SELECT COUNT(*) AS n, COUNT(DISTINCT path) AS d FROM predictions")
    assert rows == [{"n": 200, "d": 200}]


def test_a_short_secret_is_one_line_and_exit_2(sample_dir, model_db, broker_env):
    done = producer("submit", str(sample_dir / "valid"), "--database-url", model_db,
                    env={**broker_env, "DIGITSCORE_SECRET": "short"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: DIGITSCORE_SECRET is shorter than 16 characters: use a random one, e.g. "
        "`openssl rand -hex 32`"
    ]


def test_a_database_refusing_connections_at_start_keeps_every_batch_queued(
    run_cli, sample_dir, postgres_url, classifier, broker_env, start_worker
):
    """A worker started while PostgreSQL refuses every connection retries its batches (they
    stay on the queue) and its registration, and scores the run once the database is back;
    before, it acknowledged every batch at once ("raised unexpected: DatabaseUnavailable")."""
    from tests.tcp_proxy import TcpProxy

    save_model(postgres_url, classifier)
    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "50",
                "--database-url", postgres_url)
    assert r.exit_code == 0, r.output
    proxy = TcpProxy("127.0.0.1", 5432)
    proxy.cut()
    _base, _, name = postgres_url.rpartition("/")
    via_proxy = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{name}"
    try:
        worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": via_proxy,
                               "DIGITSCORE_VISIBILITY_TIMEOUT": "10"}, "--device", "cpu")
        wait_for_log(worker, "does not answer yet")
        wait_for_log(worker, "Retry in", count=3)  # batches taken, none acknowledged
        wait_for_log(worker, "registration failed (tried again in")
        assert query(postgres_url, "SELECT COUNT(*) AS n FROM workers")[0]["n"] == 0
        assert query(postgres_url, "SELECT COUNT(*) AS n FROM predictions")[0]["n"] == 0
        proxy.open()
        run = wait_done(postgres_url, timeout=90)
        wait_for_log(worker, "registered as digitscore-cpu-", timeout=30)
    finally:
        proxy.close()
    assert_exactly_once(postgres_url, 200)
    assert run["n_failed"] == 0
    assert query(postgres_url, "SELECT COUNT(*) AS n FROM workers")[0]["n"] == 1
    assert "raised unexpected" not in open(worker.log_path).read()


def test_a_worker_whose_database_is_missing_or_not_digitscore_exits_2_naming_it(
    postgres_url, tmp_path, broker_env, start_worker
):
    from sqlalchemy import text

    from db.session import dispose_engines, make_engine

    engine = make_engine(postgres_url)
    with engine.begin() as conn:  # another application's database
        conn.execute(text("CREATE TABLE inventory (id integer)"))
    engine.dispose()
    dispose_engines()
    base, _, _name = postgres_url.rpartition("/")
    cases = [
        (f"sqlite:///{tmp_path / 'missing.db'}", "does not exist (no file"),
        (f"{base}/digitscore_no_such_database", "does not exist: create it"),
        (postgres_url, "is not a digitscore database (tables inventory but no digitscore"),
    ]
    workers = [start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": url}, "--device", "cpu",
                            name=f"db{i}") for i, (url, _) in enumerate(cases)]
    for worker, (_url, says) in zip(workers, cases, strict=True):
        assert worker.wait(60) == 2
        log = open(worker.log_path).read()
        assert says in log and "set DIGITSCORE_DATABASE_URL to the database the producer" in log
    assert not (tmp_path / "missing.db").exists()


def damage_model(db_url: str) -> None:
    """What was found: ``sgd_weights`` cut to a length no float32 array has."""
    from sqlalchemy import text

    from db.session import dispose_engines, get_engine

    with get_engine(db_url).begin() as conn:
        conn.execute(text("UPDATE models SET sgd_weights = :w"), {"w": b"\x00\x01\x02"})
    dispose_engines()


def delete_models(sqlite_url: str) -> None:
    """A model row deleted behind digitscore's back (the sqlite3 shell: foreign keys off)."""
    import sqlite3

    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
        conn.execute("DELETE FROM models")


def test_show_model_and_report_name_a_damaged_or_deleted_model_in_one_line(
    run_cli, sample_dir, model_db
):
    r = run_cli("submit", str(sample_dir / "valid" / "3"), "--database-url", model_db)
    assert r.exit_code == 0, r.output  # scored in this process: no broker
    damage_model(model_db)
    r = run_cli("show-model", "1", "--database-url", model_db)
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        "Error: model 1 is damaged: its sgd_weights cannot be read (buffer size must be a "
        "multiple of element size); it cannot score: train a model again (`producer train "
        "DIR`) and submit with its id"
    )
    delete_models(model_db)
    r = run_cli("report", "1", "--database-url", model_db)
    assert r.exit_code == 0, r.output
    assert "model      model 1 is gone from this database (deleted)" in r.output
    assert "NoResultFound" not in r.output and "100" in r.output  # the run's rows still report
    r = run_cli("report", "1", "--json", "--database-url", model_db)
    assert '"model_problem": "model 1 is gone from this database (deleted)"' in r.output


def test_resume_retry_failed_scores_a_poison_batch_again_once_its_cause_is_gone(
    run_cli, sample_dir, model_db, broker_env, start_worker, tmp_path
):
    """A batch that killed its worker three times is failed with the reason in its rows;
    once the cause is gone, `resume --retry-failed` scores it, each error row replaced by a
    scored one in one transaction, and the run's counts are those of its rows."""
    from db.session import get_engine

    src = tmp_path / "images"
    shutil.copytree(sample_dir / "valid", src)
    digit = next((src / "3").glob("*.png"))
    shutil.copy(digit, src / "3" / "poison.png")
    cause = tmp_path / "the-cause"
    cause.touch()
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db,
                           "DIGITSCORE_TEST_POISON_WHILE": str(cause)}, "--device", "cpu", *FAULTS)
    wait_for_log(worker, "ready.")
    r = run_cli("submit", str(src), "--batch-size", "40", "--database-url", model_db)
    assert r.exit_code == 0, r.output
    run = wait_done(model_db, timeout=120)
    (failed,) = query(model_db, "SELECT seq, n_images FROM batches WHERE status = 'failed'")
    assert run["n_failed"] == failed["n_images"] > 1
    assert_counts_agree(get_engine(model_db), 1)

    cause.unlink()
    r = run_cli("resume", "1", "--retry-failed", "--wait", "--database-url", model_db)
    assert r.exit_code == 0, r.output
    assert "run 1: 1 failed batch to score again" in r.stderr
    assert_exactly_once(model_db, 201)
    run = query(model_db, "SELECT * FROM runs")[0]
    assert (run["status"], run["n_failed"], run["n_scored"]) == ("done", 0, 201)
    assert query(model_db, "SELECT status FROM batches WHERE seq = :s", s=failed["seq"]) == [
        {"status": "done"}]
    assert_counts_agree(get_engine(model_db), 1)


def test_a_batch_stopped_by_the_time_limit_is_split_until_its_halves_fit(
    run_cli, sample_dir, model_db, broker_env, start_worker, tmp_path
):
    """A device too slow for the time limit (20 ms an image, a limit of 1 s): the worker
    warns at start, measuring a sample; a batch of 100 is stopped, then split into halves
    of 50 (each stopped again, or not: the machine's load decides) and of 25, and so on
    until they fit: every image once, none failed (before: three stops made the batch
    poison, 100 error rows)."""

    src = tmp_path / "images"
    shutil.copytree(sample_dir / "valid", src)
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": model_db, "DIGITSCORE_TEST_IMAGE_DELAY":
           "0.02", "DIGITSCORE_VISIBILITY_TIMEOUT": "2"}  # a task time limit of 1 s
    worker = start_worker(env, "--device", "cpu", *FAULTS)
    wait_for_log(worker, "ready.")  # each pool process times its sample as it starts
    wait_for_log(worker, "more than half the task time limit of 1 s")
    r = run_cli("submit", str(src / "3"), "--batch-size", "100", "--database-url", model_db)
    assert r.exit_code == 0, r.output
    wait_done(model_db, timeout=120)
    assert_exactly_once(model_db, 100)
    assert query(model_db, "SELECT n_failed FROM runs") == [{"n_failed": 0}]
    sizes = query(model_db, "SELECT status, n_images FROM batches ORDER BY seq")
    assert sizes[0] == {"status": "split", "n_images": 100}
    # halves are split again while they outlast the limit (the machine's load decides how
    # often): every batch ends split or done, and the done ones hold every image once
    assert {b["status"] for b in sizes} == {"split", "done"}
    assert sum(b["n_images"] for b in sizes if b["status"] == "done") == 100
    assert "split into batches 1 (50 images) and 2 (50 images)" in open(worker.log_path).read()


def test_a_damaged_model_fails_its_batches_with_its_problem_then_retry_failed_scores_them(
    run_cli, sample_dir, model_db, broker_env, start_worker
):
    """A model whose weights are damaged in the database: each batch is tried
    MAX_DELIVERIES times (before: 3,182 deliveries a minute and 39 MB of log), then failed
    with the model's problem, in one line, as the reason of its rows; once the weights are
    back, `resume --retry-failed` scores every image."""
    from sqlalchemy import text

    from db.session import dispose_engines, get_engine

    (weights,) = query(model_db, "SELECT sgd_weights FROM models")
    damage_model(model_db)
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "100",
                "--database-url", model_db)
    assert r.exit_code == 0, r.output
    run = wait_done(model_db, timeout=120)
    assert (run["n_failed"], run["n_scored"]) == (200, 0)
    (reason,) = {row["error"] for row in query(model_db, "SELECT error FROM predictions")}
    assert reason.startswith(
        "batch abandoned after 3 failed deliveries (poison batch): model 1 could not be "
        "loaded: ModelDamaged: model 1 is damaged: its sgd_weights cannot be read (buffer "
        "size must be a multiple of element size); it cannot score"), reason
    log = open(worker.log_path).read()
    assert len(log) < 200_000
    # each failed delivery holds its batch 1, 2, then 4 s before it goes back (before: at
    # once), and the load's traceback is logged once by the one pool process (Celery adds
    # the rejection's own few lines to each)
    for seq in (0, 1):
        held = re.findall(rf"^\[([\d:, -]+):.*run 1 batch {seq}: model 1 could not be loaded: "
                          r".*failed delivery (\d) of 3: the batch goes back to the queue in "
                          r"(\d+) s$", log, re.MULTILINE)
        assert [(n, s) for _, n, s in held] == [("1", "1"), ("2", "2"), ("3", "4")], log
        at = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t, _, _ in held]
        assert (at[2] - at[0]).total_seconds() >= 1 + 2, at
    assert log.count("in cached_classifier") == 1, log

    with get_engine(model_db).begin() as conn:
        conn.execute(text("UPDATE models SET sgd_weights = :w"), {"w": weights["sgd_weights"]})
    dispose_engines()
    r = run_cli("resume", "1", "--retry-failed", "--wait", "--database-url", model_db)
    assert r.exit_code == 0, r.output
    assert_exactly_once(model_db, 200)
    assert query(model_db, "SELECT n_failed, n_scored FROM runs") == [
        {"n_failed": 0, "n_scored": 200}]


def test_a_batch_the_database_will_not_store_fails_at_the_delivery_limit(
    run_cli, sample_dir, model_db, broker_env, start_worker
):
    """A store that fails every time with an error that is not an outage (a value the
    database refuses) counts a failed delivery each time, so the batch is failed with the
    reason after MAX_DELIVERIES instead of going round for ever."""
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db,
                           "DIGITSCORE_TEST_STORE_FAULT": "1"}, "--device", "cpu", *FAULTS)
    wait_for_log(worker, "ready.")
    r = run_cli("submit", str(sample_dir / "valid" / "3"), "--batch-size", "1000",
                "--database-url", model_db)
    assert r.exit_code == 0, r.output
    run = wait_done(model_db, timeout=120)
    assert run["n_scored"] == 0 and run["n_failed"] > 0
    (reason,) = {row["error"] for row in query(model_db, "SELECT error FROM predictions")}
    assert reason.startswith(
        f"batch abandoned after {defaults.MAX_DELIVERIES} failed deliveries (poison batch): "
        "storing failed: ValueError: injected: a value the database refuses"), reason
    assert query(model_db, "SELECT status, deliveries FROM batches") == [
        {"status": "failed", "deliveries": defaults.MAX_DELIVERIES + 1}]
