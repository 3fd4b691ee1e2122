"""Waiting for a run while showing its progress, read from the database; saying why when it
does not move, and healing it (producer/heal.py) while it waits.

The rate shown is over the last :data:`RATE_WINDOW` seconds, not since the start, so a run
that stops shows it. Once nothing has been stored for longer than a few batches took
(:func:`stall_threshold`), the line says ``stalled for N s`` and why, instead of an ETA.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import click

from core import defaults
from core.errors import WaitTimeout
from db.cancellation import FINISHED
from db.queries import progress

#: Seconds of progress the rate is measured over (at least; up to a poll more).
RATE_WINDOW = 20.0
#: A run is shown stalled once nothing was stored for three times the usual gap between
#: stores, but never before STALL_MIN nor later than STALL_MAX seconds (seconds).
STALL_MIN, STALL_MAX = 5.0, 8.0

#: Called now and then while waiting: re-sends lost batches, returns a line to show or None.
Heal = Callable[[], str | None]


def bar(done: int, total: int, width: int = 30) -> str:
    """``[####------]``: ``done`` of ``total`` as a bar of ``width`` characters."""
    filled = min(width, int(width * done / total)) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(
    done: int, total: int | None, rate: float, stalled: float | None = None,
    cause: str | None = None,
) -> str:
    """The progress of a run: done of total, the recent rate and the ETA; or, when it is
    ``stalled`` (seconds), that and its ``cause``, with no ETA."""
    counts = (f"{done:,}/? images" if total is None
              else f"{bar(done, total)} {done:,}/{total:,} images")
    if stalled is not None:
        return f"{counts}  stalled for {stalled:,.0f} s" + (f": {cause}" if cause else "")
    if total is None:
        return f"{counts}  {rate:,.0f} images/s"
    eta = (total - done) / rate if rate > 0 else float("inf")
    eta_text = f"ETA {eta:,.0f} s" if eta != float("inf") else "ETA ?"
    return f"{counts}  {rate:,.0f} images/s  {eta_text}"


class RecentRate:
    """Images per second over the last ``window`` seconds of samples."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        then, before = self.samples[0]
        return (done - before) / (now - then) if now > then else 0.0


class StallClock:
    """How long nothing has been stored, and after how long that is a stall: three times
    the mean gap between the last stores seen, within [STALL_MIN, STALL_MAX]."""

    def __init__(self, start: float) -> None:
        self.last_change = start
        self.gaps: deque[float] = deque(maxlen=8)
        self.last_done: int | None = None

    def see(self, now: float, done: int) -> None:
        if done != self.last_done:
            if self.last_done is not None:
                self.gaps.append(now - self.last_change)
            self.last_done, self.last_change = done, now

    def idle(self, now: float) -> float:
        return now - self.last_change

    def stalled(self, now: float) -> float | None:
        """Seconds stalled, or ``None`` while the run moves as it did."""
        idle = self.idle(now)
        return idle if idle >= stall_threshold(list(self.gaps)) else None


def stall_threshold(gaps: list[float]) -> float:
    """Seconds without a store after which a run is stalled, given the gaps seen between
    its last stores (none yet: :data:`STALL_MAX`)."""
    if not gaps:
        return STALL_MAX
    return min(STALL_MAX, max(STALL_MIN, 3 * sum(gaps) / len(gaps)))


def short_cause(hint: str) -> str:
    """The first clause of a hint (up to its first ``: `` outside brackets), for the progress
    line."""
    depth = 0
    for i, char in enumerate(hint):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and hint.startswith(": ", i):
            return hint[:i]
    return hint


def wait_for_run(
    engine: Any,
    run_id: int,
    interval: float = defaults.PROGRESS_POLL_INTERVAL,
    *,
    timeout: float | None = None,
    explain: Callable[[], str] | None = None,
    stall_after: float = defaults.STALL_HINT_AFTER,
    report_every: float = defaults.PROGRESS_EVERY,
    heal: Heal | None = None,
    heal_every: float = defaults.HEAL_EVERY,
) -> str:
    """Poll until the run is done (or cancelled), every ``interval`` seconds (one query on
    the run's row), so that its end is seen within that; show progress on stderr; return the status.

    On a terminal the progress line is redrawn at every poll; otherwise one line is printed
    every ``report_every`` seconds. Once the run is stalled (:class:`StallClock`),
    ``explain()`` says why, shown in the progress line; when no batch of the run has been
    stored for ``stall_after`` seconds (``Settings.stall_hint_after``, 30 by default), it
    is asked again and its whole answer printed, once per stall. Every ``heal_every``
    seconds ``heal()`` re-sends lost batches; what it says is printed. After ``timeout``
    seconds :class:`WaitTimeout` is raised; the run goes on. Ctrl-C raises
    KeyboardInterrupt to the caller.
    """
    tty = sys.stderr.isatty()
    start = time.monotonic()
    rates, clock = RecentRate(), StallClock(start)
    hinted, cause = False, None
    next_report, next_heal = start + report_every, start + heal_every

    def say(text: str) -> None:
        if tty:
            click.echo("", err=True)  # keep the progress line
        click.echo(text, err=True)

    while True:
        with engine.connect() as conn:
            p = progress(conn, run_id)
        now = time.monotonic()
        before = clock.last_done
        clock.see(now, p.done)
        if p.done != before:
            hinted, cause = False, None
        rate = rates.add(now, p.done)
        stalled = clock.stalled(now) if p.status not in FINISHED else None
        if stalled is not None and cause is None and explain is not None:
            cause = short_cause(explain())
        line = progress_line(p.done, p.n_images, rate, stalled, cause)
        if tty:
            click.echo("\r\x1b[K" + line, err=True, nl=False)
        elif now >= next_report:
            click.echo(f"run {run_id}: {line}", err=True)
            while next_report <= now:  # on a fixed grid: every report_every s from the start
                next_report += report_every
        if p.status in FINISHED:  # done, or cancelled
            if tty:
                click.echo("", err=True)
            return p.status
        if explain is not None and not hinted and clock.idle(now) >= stall_after:
            hinted = True
            hint = explain()
            cause = short_cause(hint)
            say(f"no batch of run {run_id} stored for {clock.idle(now):.0f} s: {hint}")
        if heal is not None and heal_every > 0 and now >= next_heal:
            next_heal = now + heal_every
            said = heal()
            if said:
                say(f"run {run_id}: {said}")
        if timeout is not None and now - start >= timeout:
            if tty:
                click.echo("", err=True)
            total = "?" if p.n_images is None else f"{p.n_images:,}"
            raise WaitTimeout(
                f"run {run_id} not done after --timeout {timeout:g} s ({p.done:,}/{total} "
                f"images); it goes on: see `producer status {run_id}`"
            )
        time.sleep(interval)
