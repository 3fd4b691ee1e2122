"""A read-only view of a directory whose every open waits ``LATENCY`` seconds first, as an
open on a network file system waits for a round trip to its server (NFS checks a file's
attributes with the server at each open, for close-to-open consistency): the file system a
fleet shares, on which shards are meant to beat loose files (issue 27). Reads, listings and
attributes pass straight through, with FUSE's own costs.

    python -m bench.slow_fs SOURCE MOUNTPOINT LATENCY   (in the foreground, until unmounted)

Needs FUSE: ``/dev/fuse``, ``fusermount`` (Debian: ``apt-get install fuse libfuse2``) and
``pip install fusepy``, which the project does not otherwise depend on. :func:`mounted` mounts
one for the length of a ``with`` block. Requests are served on threads of their own, so the
opens of several readers overlap, as they do on a network file system.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAT_FIELDS = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size",
               "st_uid")


def serve(source: str, mountpoint: str, latency: float) -> None:
    from fuse import FUSE, FuseOSError, Operations  # type: ignore[import-not-found, unused-ignore]

    class SlowOpens(Operations):  # type: ignore[misc, unused-ignore]
        def _real(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            try:
                st = os.lstat(self._real(path))
            except OSError as e:
                raise FuseOSError(e.errno) from e
            return {k: getattr(st, k) for k in STAT_FIELDS}

        def readdir(self, path: str, fh: Any) -> list[str]:
            return [".", "..", *os.listdir(self._real(path))]

        def open(self, path: str, flags: int) -> int:
            time.sleep(latency)
            return os.open(self._real(path), flags)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

    FUSE(SlowOpens(), mountpoint, foreground=True, ro=True, nothreads=False)


@contextmanager
def mounted(source: Path, mountpoint: Path, latency: float) -> Iterator[Path]:
    """``source`` seen through :mod:`bench.slow_fs` at ``mountpoint`` (made if need be)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.slow_fs", str(source.resolve()), str(mountpoint),
         str(latency)], cwd=Path(__file__).resolve().parent.parent)
    try:
        for _ in range(100):
            if os.path.ismount(mountpoint):
                break
            if server.poll() is not None:
                raise RuntimeError(f"bench.slow_fs exited with {server.returncode}: is FUSE "
                                   "there (fusermount, fusepy)?")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"bench.slow_fs did not mount {mountpoint} within 10 s")
        yield mountpoint
    finally:
        subprocess.run(["fusermount", "-u", str(mountpoint)], check=False)
        server.wait(timeout=30)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], float(sys.argv[3]))
