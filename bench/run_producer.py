"""``producer`` as it is, plus two facts the benchmark needs, written as JSON at exit to the
file named by ``BENCH_PRODUCER_STATS``: when the first file was read (``time.time()``) and
the process's peak resident memory (``VmHWM``, MiB).

Usage: ``python -m bench.run_producer submit DIR --wait ...`` (any producer arguments).
"""

from __future__ import annotations

import atexit
import json
import os
import time
from typing import Any

import core.files as files

_first_read: float | None = None
_read_file = files.read_file


def _timed_read_file(*args: Any, **kwargs: Any) -> Any:
    global _first_read
    _first_read = time.time()
    files.read_file = _read_file  # only the first read is timed
    return _read_file(*args, **kwargs)


def _peak_mib() -> float | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


@atexit.register
def _write_stats() -> None:
    target = os.environ.get("BENCH_PRODUCER_STATS")
    if target:
        with open(target, "w") as f:
            json.dump({"first_read": _first_read, "peak_rss_mib": _peak_mib()}, f)


if __name__ == "__main__":
    files.read_file = _timed_read_file
    from producer.cli import cli

    cli(prog_name="producer")
