"""A failure in the middle of a submit ends in one clear line, and the run stays resumable:
the database's disk filled, PostgreSQL cut off and Redis stopped, for real, under a real
``producer submit`` process; then ``producer resume`` completes the run, every image once."""

from __future__ import annotations

import resource
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import (
    RedisServer,
    assert_exactly_once,
    batches_recorded,
    pause_mid_submit,
    resume_producer,
    save_model,
    start_producer,
    wait_for_log,
)

pytestmark = pytest.mark.integration

FILES = 1000  # the sample's train and valid digits
NO_BROKER = "no broker set (DIGITSCORE_BROKER_URL): scoring in this process"


def assert_one_clear_line(producer: subprocess.Popen, cause: str, *before: str) -> str:
    """Exit 1; on stderr the informational lines ``before``, then one ``Error:`` line naming
    the cause and `producer resume 1`; no traceback anywhere."""
    out, err = producer.communicate(timeout=120)
    assert producer.returncode == 1, (out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert lines[:-1] == ["run 1 created", *before] or lines[:-1] == [*before, "run 1 created"]
    last = lines[-1]
    assert last.startswith("Error: run 1 stopped part way through submit: "), last
    assert cause in last, last
    assert last.endswith("the run is kept: once that is fixed, run `producer resume 1`"), last
    return last


# ---------------------------------------------------------------- the database's disk fills


class SmallDisk:
    """A directory whose files stop growing at 1 MiB: a tmpfs of that size where this process
    may mount one (root with CAP_SYS_ADMIN), otherwise RLIMIT_FSIZE on the producer process
    (each of its files then stops at 1 MiB, the WAL first)."""

    SIZE = 1 << 20
    #: SQLite's words: a full tmpfs is SQLITE_FULL; a write the rlimit refuses (EFBIG) is
    #: SQLITE_IOERR.
    CAUSE = {"tmpfs": "database or disk is full", "rlimit": "disk I/O error"}

    def __init__(self, path: Path, mode: str) -> None:
        path.mkdir()
        self.path = path
        self.mode = mode
        if mode == "tmpfs":
            mount = ["mount", "-t", "tmpfs", "-o", f"size={self.SIZE}", "tmpfs", str(path)]
            if subprocess.run(mount, capture_output=True).returncode != 0:
                pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")

    def limit_producer(self) -> None:
        """Runs in the producer's child process before it starts."""
        # a write past the limit then fails with EFBIG (SQLite: "database or disk is full")
        # instead of killing the process with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if self.mode == "rlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.SIZE, self.SIZE))

    def enlarge(self) -> None:
        """Room again: a larger tmpfs (the rlimit held only the producer that hit it)."""
        if self.mode == "tmpfs":
            remount = ["mount", "-o", "remount,size=256m", str(self.path)]
            subprocess.run(remount, check=True)

    def remove(self) -> None:
        if self.mode == "tmpfs":
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture(params=["tmpfs", "rlimit"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path):
    disk = SmallDisk(tmp_path / "disk", request.param)
    yield disk
    disk.remove()


def test_sqlite_disk_full_mid_submit_one_line_then_resume_completes(
    run_cli, classifier, sample_dir, small_disk
):
    db_url = f"sqlite:///{small_disk.path / 'digitscore.db'}"
    save_model(db_url, classifier)
    producer = start_producer(
        "submit", str(sample_dir), "--batch-size", "10", "--database-url", db_url,
        preexec_fn=small_disk.limit_producer,
    )
    line = assert_one_clear_line(producer, SmallDisk.CAUSE[small_disk.mode], NO_BROKER)
    assert f"the database {db_url} failed (OperationalError)" in line
    assert 0 < batches_recorded(db_url) < FILES // 10  # it stopped part way
    small_disk.enlarge()
    r = run_cli("status", "1", "--database-url", db_url)
    assert "interrupted before all was sent" in r.stdout and "run `producer resume 1`" in r.stdout
    r = run_cli("resume", "1", "--database-url", db_url)
    assert r.exit_code == 0, r.output
    assert "status done" in r.stdout
    assert_exactly_once(db_url, FILES)
    r = run_cli("status", "1", "--database-url", db_url)
    assert r.stdout.startswith("run 1 done") and "resume" not in r.stdout


# ---------------------------------------------------------------- PostgreSQL cut off


def test_postgres_cut_off_mid_submit_one_line_then_resume_completes(
    run_cli, classifier, sample_dir, postgres_url
):
    from tests.tcp_proxy import TcpProxy

    save_model(postgres_url, classifier)
    proxy = TcpProxy("127.0.0.1", 5432)
    name = postgres_url.rpartition("/")[2]
    via_proxy = f"postgresql://postgres:s3cret-pw@127.0.0.1:{proxy.port}/{name}"
    try:
        producer = start_producer(
            "submit", str(sample_dir), "--batch-size", "2", "--database-url", via_proxy
        )
        pause_mid_submit(postgres_url, 20, producer)
        proxy.cut()
        resume_producer(producer)
        line = assert_one_clear_line(producer, "(OperationalError)", NO_BROKER)
    finally:
        proxy.close()
    assert "postgres:***@127.0.0.1" in line and "s3cret-pw" not in line
    assert batches_recorded(postgres_url) < FILES // 2
    r = run_cli("resume", "1", "--database-url", postgres_url)
    assert r.exit_code == 0, r.output
    assert_exactly_once(postgres_url, FILES)


# ---------------------------------------------------------------- Redis stopped


@pytest.fixture
def private_redis(tmp_path: Path, redis_server: str):
    import shutil

    if shutil.which("redis-server") is None:
        from tests.support import service_missing

        service_missing("redis-server binary")
    server = RedisServer(tmp_path)
    yield server
    server.kill()


def test_redis_stopped_mid_submit_one_line_then_resume_completes(
    run_cli, classifier, sample_dir, sqlite_url, private_redis, start_worker
):
    save_model(sqlite_url, classifier)
    broker = {"DIGITSCORE_BROKER_URL": private_redis.url}
    producer = start_producer(
        "submit", str(sample_dir), "--batch-size", "1", "--database-url", sqlite_url, env=broker
    )
    pause_mid_submit(sqlite_url, 50, producer)
    private_redis.kill()
    resume_producer(producer)
    line = assert_one_clear_line(producer, f"the broker {private_redis.url} failed")
    assert "Connection refused" in line or "Connection reset" in line or "closed" in line, line
    private_redis.start()  # empty: every batch sent before is gone with the old server
    worker = start_worker({**broker, "DIGITSCORE_DATABASE_URL": sqlite_url}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    r = run_cli("resume", "1", "--wait", "--database-url", sqlite_url, env=broker)
    assert r.exit_code == 0, r.output
    assert "re-sent" in r.stdout
    assert_exactly_once(sqlite_url, FILES)


def test_redis_out_of_memory_mid_submit_one_line_then_resume_completes(
    run_cli, classifier, sample_dir, sqlite_url, private_redis, start_worker
):
    import redis

    save_model(sqlite_url, classifier)
    client = redis.Redis.from_url(private_redis.url)
    # room for about a third of the sample's bytes, then every write is refused
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 150_000)
    broker = {"DIGITSCORE_BROKER_URL": private_redis.url}
    producer = start_producer(
        "submit", str(sample_dir), "--batch-size", "10", "--database-url", sqlite_url, env=broker
    )
    # Redis's own words, through redis-py (the payload) or kombu (the message), whichever fails
    line = assert_one_clear_line(producer, "command not allowed when used memory > 'maxmemory'")
    assert f"the broker {private_redis.url} failed (" in line
    assert batches_recorded(sqlite_url) < FILES // 10
    client.config_set("maxmemory", 0)
    client.flushdb()  # the queued batches too: resume sends every batch without results
    worker = start_worker({**broker, "DIGITSCORE_DATABASE_URL": sqlite_url}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    r = run_cli("resume", "1", "--wait", "--database-url", sqlite_url, env=broker)
    assert r.exit_code == 0, r.output
    assert_exactly_once(sqlite_url, FILES)


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_mid_submit_exits_130_naming_resume_then_resume_completes(
    run_cli, classifier, sample_dir, sqlite_url
):
    save_model(sqlite_url, classifier)
    producer = start_producer(
        "submit", str(sample_dir), "--batch-size", "1", "--database-url", sqlite_url,
        # SIGINT as a terminal's Ctrl-C delivers it, even if this test runs with it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    pause_mid_submit(sqlite_url, 20, producer)
    producer.send_signal(signal.SIGINT)
    resume_producer(producer)
    out, err = producer.communicate(timeout=60)
    assert producer.returncode == 130, (out, err)
    assert "Traceback" not in out + err
    assert err.splitlines()[-1] == "stopped; run 1 is kept: `producer resume 1` sends the rest"
    r = run_cli("resume", "1", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    assert_exactly_once(sqlite_url, FILES)
