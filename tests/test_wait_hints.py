"""``--wait`` says why a run does not move, prints progress when piped, and ``--timeout`` ends
it with exit 1: a real ``producer submit`` process, real Redis, with and without a worker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, wait_for_log
from tests.test_faults import train

pytestmark = pytest.mark.integration


def submit_and_watch(source, db_url: str, env: dict[str, str], *args: str):
    """Run ``producer submit SOURCE --wait ARGS`` with stderr piped (not a terminal); return
    its exit status, stdout, and each stderr line with the seconds since the start."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import cli; cli()", "submit", str(source),
         "--wait", "--database-url", db_url, *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.monotonic() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read)
    reader.start()
    out = proc.communicate(timeout=120)[0]
    reader.join()
    return proc.returncode, out, lines


def test_no_worker_hint_within_30_s_progress_every_10_s_and_timeout_exits_1(
    run_cli, sample_dir, sqlite_url, broker_env
):
    train(run_cli, sample_dir, sqlite_url)
    status, out, lines = submit_and_watch(
        sample_dir / "valid", sqlite_url, broker_env, "--timeout", "34"
    )
    text = "\n".join(line for _, line in lines)
    assert status == 1, (out, text)
    assert "Traceback" not in out + text
    created = next(t for t, line in lines if line == "run 1 created")
    hints = [(t, line) for t, line in lines if line.startswith("no batch of run 1 stored for")]
    assert len(hints) == 1, text
    at, hint = hints[0]
    # the default: 30 s without a stored batch, then one second to ask the workers
    assert 30 <= at - created <= 33, text
    queue, broker = broker_env["DIGITSCORE_QUEUE"], broker_env["DIGITSCORE_BROKER_URL"]
    assert f"no worker consumes queue {queue} on broker {broker}" in hint
    assert f"DIGITSCORE_DATABASE_URL to {sqlite_url}" in hint
    progress = [t for t, line in lines if line.startswith("run 1: [")]
    assert len(progress) >= 3, text  # every 10 s: at about 10, 20 and 30 s
    assert lines[-1][1] == (
        "Error: run 1 not done after --timeout 34 s (0/200 images); it goes on: see "
        "`producer status 1`"
    )
    assert "status queued" in out and "report" not in out.lower()


def test_workers_on_the_queue_but_none_storing_are_named(
    run_cli, sample_dir, sqlite_url, tmp_path, broker_env, start_worker
):
    train(run_cli, sample_dir, sqlite_url)
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": elsewhere}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    env = {**broker_env, "DIGITSCORE_STALL_HINT_AFTER": "3"}
    status, out, lines = submit_and_watch(
        sample_dir / "valid", sqlite_url, env, "--timeout", "8"
    )
    text = "\n".join(line for _, line in lines)
    assert status == 1, (out, text)
    hint = next(line for _, line in lines if line.startswith("no batch of run 1 stored for"))
    queue = broker_env["DIGITSCORE_QUEUE"]
    assert f"1 worker(s) consume queue {queue} on broker" in hint, hint
    assert f"(digitscore-cpu-{worker.pid}@" in hint, hint
    assert f"write to another database than {sqlite_url}" in hint, hint
    assert "--timeout 8 s" in lines[-1][1]
