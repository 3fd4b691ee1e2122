"""Faults for tests, loaded into real worker processes with ``worker -- --include
tests.fault_injection``. Production code knows nothing of it.

- ``DIGITSCORE_TEST_TASK_DELAY=S``: every batch takes S seconds longer (so that a test can
  kill or stop a worker mid-batch);
- a batch holding a path with ``poison`` in its name kills the process scoring it (SIGKILL).
"""

from __future__ import annotations

import os
import signal
import time

import worker.tasks

_real_score_images = worker.tasks.score_images


def _faulty_score_images(classifier, paths, *args, **kwargs):
    if any("poison" in p for p in paths):
        os.kill(os.getpid(), signal.SIGKILL)
    delay = float(os.environ.get("DIGITSCORE_TEST_TASK_DELAY", "0") or 0)
    if delay:
        time.sleep(delay)
    return _real_score_images(classifier, paths, *args, **kwargs)


worker.tasks.score_images = _faulty_score_images
