"""Waiting for a run while showing its progress, read from the database."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from core import defaults
from db.queries import progress


def progress_line(done: int, total: int | None, rate: float) -> str:
    if total is None:
        return f"{done:,}/? images  {rate:,.0f} images/s"
    eta = (total - done) / rate if rate > 0 else float("inf")
    eta_text = f"ETA {eta:,.0f} s" if eta != float("inf") else "ETA ?"
    width = 30
    filled = int(width * done / total) if total else width
    bar = "#" * filled + "-" * (width - filled)
    return f"[{bar}] {done:,}/{total:,} images  {rate:,.0f} images/s  {eta_text}"


def wait_for_run(engine: Any, run_id: int, interval: float = defaults.POLL_INTERVAL) -> str:
    """Poll until the run is done or failed, at most ``interval`` seconds apart (sooner at
    first, see :data:`defaults.POLL_FIRST`); show progress on stderr; return the status.

    Ctrl-C raises KeyboardInterrupt to the caller and leaves the run going.
    """
    delay = min(defaults.POLL_FIRST, interval)
    tty = sys.stderr.isatty()
    start = time.monotonic()
    with engine.connect() as conn:
        first = progress(conn, run_id).done
    while True:
        with engine.connect() as conn:
            p = progress(conn, run_id)
        rate = (p.done - first) / max(time.monotonic() - start, 1e-9)
        if tty:
            click.echo("\r" + progress_line(p.done, p.n_images, rate), err=True, nl=False)
        if p.status in ("done", "failed"):
            if tty:
                click.echo("", err=True)
            return p.status
        time.sleep(delay)
        delay = min(delay * 1.5, interval)
