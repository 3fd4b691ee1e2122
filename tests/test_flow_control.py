"""Flow control (producer/queue.py): a producer keeps a bounded amount of image bytes waiting
in Redis, waits for workers past it, and never dies with a traceback when Redis is full.
Against a redis-server of the test's own with a small ``maxmemory`` and ``noeviction``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from PIL import Image, PngImagePlugin

from core import defaults, wire
from core.files import FileBatch
from core.settings import Settings
from producer.queue import CelerySender, default_bound, is_out_of_memory
from tests.support import (
    ROOT,
    RedisServer,
    assert_exactly_once,
    queued_messages,
    run_row,
    save_model,
    service_missing,
    wait_done,
    wait_for_log,
)

MAXMEMORY = 8 * 1024 * 1024


def fat_digits(sample_dir: Path, target: Path, copies: int) -> int:
    """The validation digits, each written ``copies`` times with 16 KB of text in the PNG
    (a chunk Pillow skips), so that a few hundred files fill megabytes of payload."""
    n = 0
    for src in sorted((sample_dir / "valid").rglob("*.png")):
        info = PngImagePlugin.PngInfo()
        info.add_text("padding", os.urandom(8192).hex())
        with Image.open(src) as img:
            for c in range(copies):
                out = target / src.parent.name / f"{c}-{src.name}"
                out.parent.mkdir(parents=True, exist_ok=True)
                img.save(out, pnginfo=info)
                n += 1
    return n


@pytest.fixture
def small_redis(tmp_path: Path, redis_server: str):
    if shutil.which("redis-server") is None:
        service_missing("redis-server binary")
    server = RedisServer(
        tmp_path, "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction"
    )
    yield server
    server.kill()


class PeakMemory:
    """Samples Redis's ``used_memory`` every few milliseconds in a thread; keeps the peak."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self.client.info("memory")["used_memory"]))
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class FakeConfig:
    def __init__(self, maxmemory: int | None) -> None:
        self.maxmemory = maxmemory

    def config_get(self, _name: str) -> dict[str, str]:
        if self.maxmemory is None:
            raise redis.exceptions.ResponseError("unknown command 'CONFIG'")
        return {"maxmemory": str(self.maxmemory)}


def test_the_default_bound_is_half_of_maxmemory_up_to_256_mib():
    mib = 1024 * 1024
    assert default_bound(FakeConfig(8 * mib)) == 4 * mib
    assert default_bound(FakeConfig(0)) == 256 * mib  # no maxmemory set
    assert default_bound(FakeConfig(4096 * mib)) == 256 * mib
    assert default_bound(FakeConfig(None)) == 256 * mib  # CONFIG not permitted


def test_a_batch_takes_at_most_a_quarter_of_the_bound():
    settings = Settings(broker_url="redis://127.0.0.1:1/0", max_queued_bytes=4 * 1024 * 1024)
    sender = CelerySender(settings)  # never connected
    assert sender.batch_bytes(defaults.BATCH_BYTES) == 1024 * 1024
    assert sender.batch_bytes(1000) == 1000


def test_out_of_memory_is_told_from_other_redis_errors():
    oom = redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
    assert is_out_of_memory(oom) and is_out_of_memory(redis.exceptions.OutOfMemoryError("x"))
    try:
        try:
            raise oom
        except redis.exceptions.ResponseError as e:
            raise RuntimeError("kombu's wrapper") from e
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(redis.exceptions.ResponseError("WRONGTYPE"))


@pytest.mark.integration
def test_producer_waits_for_workers_and_redis_stays_under_its_cap(
    run_cli, classifier, sample_dir, sqlite_url, small_redis, start_worker, tmp_path
):
    save_model(sqlite_url, classifier)
    source = tmp_path / "fat"
    n_files = fat_digits(sample_dir, source, copies=2)  # 400 files, about 6.6 MB
    env = {"DIGITSCORE_BROKER_URL": small_redis.url, "DIGITSCORE_QUEUE": "flow"}
    peak = PeakMemory(small_redis.url)
    out = tmp_path / "producer.out"
    with open(out, "wb") as log:
        producer = subprocess.Popen(
            [sys.executable, "-c", "from producer.cli import cli; cli()", "submit",
             str(source), "--batch-size", "20", "--database-url", sqlite_url],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while b"waiting for workers" not in out.read_bytes():
            assert producer.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        assert "at most 4.0 MiB" in out.read_text()  # half of the 8 MiB maxmemory
        time.sleep(1)
        assert producer.poll() is None  # still waiting: no worker yet
        assert run_row(sqlite_url)["n_images"] is None
        worker = start_worker({**env, "DIGITSCORE_DATABASE_URL": sqlite_url}, "--device", "cpu")
        wait_for_log(worker, "ready.")
        assert producer.wait(timeout=120) == 0, out.read_text()
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
    assert wait_done(sqlite_url, timeout=60)["status"] == "done"
    used = peak.stop()
    assert_exactly_once(sqlite_url, n_files)
    assert run_row(sqlite_url)["n_failed"] == 0
    assert "Traceback" not in out.read_text()
    assert 4 * 1024 * 1024 < used <= MAXMEMORY, used  # it filled up to the bound, not past


@pytest.mark.integration
def test_a_full_redis_stops_the_producer_with_resume_advice_and_resume_completes(
    run_cli, classifier, sample_dir, sqlite_url, small_redis, start_worker, tmp_path
):
    save_model(sqlite_url, classifier)
    source = tmp_path / "fat"
    n_files = fat_digits(sample_dir, source, copies=3)  # about 10 MB: more than Redis holds
    env = {"DIGITSCORE_BROKER_URL": small_redis.url, "DIGITSCORE_QUEUE": "flow",
           defaults.MAX_QUEUED_BYTES_ENV: str(64 * 1024 * 1024)}  # a bound Redis cannot hold
    r = run_cli("submit", str(source), "--batch-size", "20", "--database-url", sqlite_url,
                env=env)
    assert r.exit_code == 1, r.output
    assert "out of memory" in r.output and "`producer resume 1`" in r.output
    assert "Traceback" not in r.output
    assert run_row(sqlite_url)["submitted_at"] is None  # left resumable
    worker = start_worker({**env, "DIGITSCORE_DATABASE_URL": sqlite_url}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    client = redis.Redis.from_url(small_redis.url)
    deadline = time.monotonic() + 60
    while list(client.scan_iter("digitscore:payload:*")):  # the workers drain what was sent
        assert time.monotonic() < deadline, (
            sorted(client.scan_iter("digitscore:payload:*")), queued_messages(client, "flow"),
            Path(worker.log_path).read_text()[-3000:],  # type: ignore[attr-defined]
        )
        time.sleep(0.1)
    r = run_cli("resume", "1", "--wait", "--batch-size", "20", "--database-url", sqlite_url,
                env={**env, defaults.MAX_QUEUED_BYTES_ENV: ""})  # the default bound
    assert r.exit_code == 0, r.output
    assert_exactly_once(sqlite_url, n_files)
    assert run_row(sqlite_url)["n_failed"] == 0


def _batch(n_bytes: int) -> FileBatch:
    batch = FileBatch()
    batch.add("3/a.png", os.urandom(n_bytes), None)
    return batch


def _send_in_thread(sender: CelerySender, seq: int) -> threading.Thread:
    thread = threading.Thread(
        target=sender.send, args=(wire.BatchMessage(1, seq, "ab" * 16), _batch(1000)),
        daemon=True)
    thread.start()
    return thread


@pytest.mark.integration
@pytest.mark.parametrize("bound", ["bytes", "batches"])
def test_the_sender_waits_past_its_bound_until_a_payload_is_taken(
    broker_env, monkeypatch, bound
):
    """Past the byte bound, or past the number of batches it remembers, ``send`` waits and
    says so; once a worker has taken a payload (deleted its key), it goes on."""
    per_batch = 1000 + 20 + defaults.QUEUED_MESSAGE_BYTES  # payload, its framing, message
    settings = Settings.from_env()  # broker_env sets the env vars
    if bound == "bytes":
        settings = replace(settings, max_queued_bytes=3 * per_batch)
    else:
        monkeypatch.setattr(defaults, "MAX_TRACKED_BATCHES", 3)
    waits: list[tuple[int, int]] = []
    sender = CelerySender(settings, on_wait=lambda q, b: waits.append((q, b)))
    for seq in range(3):
        sender.send(wire.BatchMessage(1, seq, "ab" * 16), _batch(1000))
    fourth = _send_in_thread(sender, 3)
    time.sleep(0.5)
    assert fourth.is_alive() and waits  # waiting for workers, and saying so
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    client.delete(wire.payload_key(wire.BatchMessage(1, 0, "ab" * 16)))  # a worker took it
    fourth.join(5)
    assert not fourth.is_alive()
    assert len(sender._sent) == 3 and sender.queued_bytes <= 3 * per_batch
