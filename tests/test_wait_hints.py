"""``--wait`` says why a run does not move, prints progress when piped, and ``--timeout`` ends
it with exit 1: a real ``producer submit`` process, real Redis, with and without a worker."""

from __future__ import annotations

import pytest

from tests.support import created, save_model, submit_and_watch, wait_for_log

pytestmark = pytest.mark.integration


def test_no_worker_hint_within_30_s_progress_every_10_s_and_timeout_exits_1(
    run_cli, classifier, sample_dir, sqlite_url, broker_env
):
    save_model(sqlite_url, classifier)
    status, out, lines = submit_and_watch(
        sample_dir / "valid", sqlite_url, broker_env, "--timeout", "36"
    )
    text = "\n".join(line for _, line in out + lines)
    assert status == 1, text
    assert "Traceback" not in text
    # waiting starts once every batch is sent, which the stdout line says
    waiting = next(t for t, line in out if line.startswith("run 1: 200 images"))
    assert "status queued" in out[0][1] and len(out) == 1  # no report: the run is not done
    hints = [(t, line) for t, line in lines if line.startswith("no batch of run 1 stored for")]
    assert len(hints) == 1, text
    at, hint = hints[0]
    # the default: 30 s without a stored batch, then a second to ask the workers
    assert 30 <= at - waiting <= 35, text
    queue, broker = broker_env["DIGITSCORE_QUEUE"], broker_env["DIGITSCORE_BROKER_URL"]
    assert hint.endswith(
        f"no worker consumes queue {queue} on broker {broker}: start one: "
        f"DIGITSCORE_BROKER_URL={broker} DIGITSCORE_QUEUE={queue} "
        f"DIGITSCORE_DATABASE_URL={sqlite_url} worker"), hint
    progress = [(t - waiting, line) for t, line in lines if line.startswith("run 1: [")]
    assert len(progress) == 3, text  # every 10 s: at 10, 20 and 30 s
    assert all(10 * (i + 1) <= t <= 10 * (i + 1) + 4 for i, (t, _) in enumerate(progress)), text
    # nothing stored since the wait began: stalled, with the cause, and no ETA, from 10 s on
    for _, line in progress:
        assert "0/200 images  stalled for " in line and "ETA" not in line, line
        assert f"no worker consumes queue {queue}" in line, line
    assert lines[-1][1] == (
        "Error: run 1 not done after --timeout 36 s (0/200 images); it goes on: see "
        "`producer status 1`"
    )


def test_workers_on_the_queue_but_none_storing_are_named(
    run_cli, classifier, sample_dir, sqlite_url, tmp_path, broker_env, start_worker
):
    save_model(sqlite_url, classifier)
    elsewhere = created(f"sqlite:///{tmp_path / 'other.db'}")
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": elsewhere}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    env = {**broker_env, "DIGITSCORE_STALL_HINT_AFTER": "3"}
    status, out, lines = submit_and_watch(
        sample_dir / "valid", sqlite_url, env, "--timeout", "8"
    )
    text = "\n".join(line for _, line in out + lines)
    assert status == 1, text
    hint = next(line for _, line in lines if line.startswith("no batch of run 1 stored for"))
    queue = broker_env["DIGITSCORE_QUEUE"]
    assert f"worker digitscore-cpu-{worker.pid}@" in hint, hint
    assert f"consumes queue {queue} on broker" in hint, hint
    assert f"writes to another database than this one, {sqlite_url}" in hint, hint
    assert "its batches were dropped by a worker on another database" in hint, hint
    assert "--timeout 8 s" in lines[-1][1]
