"""``producer`` as it is, plus two facts the benchmark needs, written as JSON at exit to the
file named by ``BENCH_PRODUCER_STATS``: when the walk of the directory started, its first
file listed (``time.time()``; in ``--send bytes`` the first file is read right after), and the
process's peak resident memory (``VmHWM``, MiB).

Usage: ``python -m bench.run_producer submit DIR --wait ...`` (any producer arguments).
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections.abc import Iterator

import core.files as files

_walk_start: float | None = None
_walk = files.DirectoryWalk.__iter__


def _timed_walk(self: files.DirectoryWalk) -> Iterator[tuple[str, str]]:
    global _walk_start
    if _walk_start is None:  # only the first walk is timed
        _walk_start = time.time()
    yield from _walk(self)


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
            json.dump({"walk_start": _walk_start, "peak_rss_mib": _peak_mib()}, f)


if __name__ == "__main__":
    files.DirectoryWalk.__iter__ = _timed_walk  # type: ignore[method-assign]
    from producer.cli import main

    main()
