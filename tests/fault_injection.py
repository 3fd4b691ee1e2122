"""Faults for tests, loaded into real worker processes with ``worker -- --include
tests.fault_injection``. Production code knows nothing of it.

- ``DIGITSCORE_TEST_TASK_DELAY=S``: every batch takes S seconds longer (so that a test can
  kill or stop a worker mid-batch); ``DIGITSCORE_TEST_IMAGE_DELAY=S``: S seconds longer per
  image (a device too slow for the time limit);
- a batch holding a path with ``poison`` in its name kills the process scoring it (SIGKILL);
  with ``DIGITSCORE_TEST_POISON_WHILE=FILE``, only while FILE exists (the cause "fixed");
- a batch holding a path with ``flaky-cuda`` (or ``flaky-bug``) in its name raises a CUDA
  error (or a plain bug) while scoring, once per run of the test: the first process to create
  ``<DIGITSCORE_TEST_FAULT_DIR>/flaky-cuda`` (or ``flaky-bug``) raises, later ones score;
- ``DIGITSCORE_TEST_DEVICE_START_FAULT=1``: every pool process's device fails as it starts;
- ``DIGITSCORE_TEST_STORE_FAULT=1``: no batch can be stored (a ``ValueError`` from the store,
  as a value the database refuses every time gives).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import worker.device_health
import worker.tasks

_real_score_images = worker.tasks.score_images
_real_store_batch = worker.tasks.store_batch
_real_prepare_device = worker.device_health.prepare_device

_FLAKY = {
    "flaky-cuda": lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
    "flaky-bug": lambda: ValueError("injected scoring bug"),
}


def _first_time(kind: str) -> bool:
    """True for the first process in this test to ask about ``kind``."""
    try:
        fd = os.open(Path(os.environ["DIGITSCORE_TEST_FAULT_DIR"]) / kind, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _faulty_score_images(classifier, paths, *args, **kwargs):
    while_file = os.environ.get("DIGITSCORE_TEST_POISON_WHILE")
    if any("poison" in p for p in paths) and (not while_file or os.path.exists(while_file)):
        os.kill(os.getpid(), signal.SIGKILL)
    for kind, error in _FLAKY.items():
        if any(kind in p for p in paths) and _first_time(kind):
            raise error()
    per_image = float(os.environ.get("DIGITSCORE_TEST_IMAGE_DELAY", "0") or 0)
    delay = float(os.environ.get("DIGITSCORE_TEST_TASK_DELAY", "0") or 0) + per_image * len(paths)
    if delay:
        time.sleep(delay)
    return _real_score_images(classifier, paths, *args, **kwargs)


def _faulty_prepare_device(device: str) -> None:
    if os.environ.get("DIGITSCORE_TEST_DEVICE_START_FAULT") == "1":
        raise worker.device_health.DeviceStartError("injected: CUDA does not start")
    _real_prepare_device(device)


def _faulty_store_batch(*args, **kwargs):
    if os.environ.get("DIGITSCORE_TEST_STORE_FAULT") == "1":
        raise ValueError("injected: a value the database refuses")
    return _real_store_batch(*args, **kwargs)


worker.tasks.score_images = _faulty_score_images
worker.tasks.store_batch = _faulty_store_batch
worker.device_health.prepare_device = _faulty_prepare_device
