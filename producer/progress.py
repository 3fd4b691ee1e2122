"""Waiting for a run while showing its progress, read from the database; saying why when it
does not move."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import click

from core import defaults
from core.errors import WaitTimeout
from db.queries import progress


def bar(done: int, total: int, width: int = 30) -> str:
    """``[####------]``: ``done`` of ``total`` as a bar of ``width`` characters."""
    filled = min(width, int(width * done / total)) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(done: int, total: int | None, rate: float) -> str:
    if total is None:
        return f"{done:,}/? images  {rate:,.0f} images/s"
    eta = (total - done) / rate if rate > 0 else float("inf")
    eta_text = f"ETA {eta:,.0f} s" if eta != float("inf") else "ETA ?"
    return f"{bar(done, total)} {done:,}/{total:,} images  {rate:,.0f} images/s  {eta_text}"


def wait_for_run(
    engine: Any,
    run_id: int,
    interval: float = defaults.PROGRESS_POLL_INTERVAL,
    *,
    timeout: float | None = None,
    explain: Callable[[], str] | None = None,
    stall_after: float = defaults.STALL_HINT_AFTER,
    report_every: float = defaults.PROGRESS_EVERY,
) -> str:
    """Poll until the run is done, every ``interval`` seconds (one query on the run's row), so
    that its end is seen within that; show progress on stderr; return the status.

    On a terminal the progress line is redrawn at every poll; otherwise one line is printed
    every ``report_every`` seconds. When no batch of the run has been stored for
    ``stall_after`` seconds (``Settings.stall_hint_after``, 30 by default), ``explain()``
    says why it may be stuck, once per stall. After ``timeout`` seconds :class:`WaitTimeout`
    is raised; the run goes on. Ctrl-C raises KeyboardInterrupt to the caller.
    """
    tty = sys.stderr.isatty()
    start = time.monotonic()
    first: int | None = None
    last_done, last_change, hinted = -1, start, False
    next_report = start + report_every
    while True:
        with engine.connect() as conn:
            p = progress(conn, run_id)
        now = time.monotonic()
        first = p.done if first is None else first
        if p.done != last_done:
            last_done, last_change, hinted = p.done, now, False
        rate = (p.done - first) / max(now - start, 1e-9)
        line = progress_line(p.done, p.n_images, rate)
        if tty:
            click.echo("\r" + line, err=True, nl=False)
        elif now >= next_report:
            click.echo(f"run {run_id}: {line}", err=True)
            while next_report <= now:  # on a fixed grid: every report_every s from the start
                next_report += report_every
        if p.status == "done":
            if tty:
                click.echo("", err=True)
            return p.status
        if explain is not None and not hinted and now - last_change >= stall_after:
            hinted = True
            hint = explain()
            if tty:
                click.echo("", err=True)  # keep the progress line
            stalled = now - last_change
            click.echo(f"no batch of run {run_id} stored for {stalled:.0f} s: {hint}", err=True)
        if timeout is not None and now - start >= timeout:
            if tty:
                click.echo("", err=True)
            total = "?" if p.n_images is None else f"{p.n_images:,}"
            raise WaitTimeout(
                f"run {run_id} not done after --timeout {timeout:g} s ({p.done:,}/{total} "
                f"images); it goes on: see `producer status {run_id}`"
            )
        time.sleep(interval)
