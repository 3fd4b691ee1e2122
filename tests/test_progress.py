"""How ``--wait`` paces its polls of the database."""

from __future__ import annotations

import pytest

from core import defaults
from producer.progress import bar, next_poll


def test_the_next_poll_comes_when_the_run_should_end_if_that_is_sooner():
    # 4,000 images left at 10,000 a second: the end is due in 0.4 s, after a 0.25 s delay
    assert next_poll(0.25, 6_000, 10_000, 10_000.0) == 0.25
    # 1,000 left: due in 0.1 s, sooner than the delay
    assert next_poll(0.25, 9_000, 10_000, 10_000.0) == pytest.approx(0.1)
    # overdue (the rate so far promised the end already): as soon as the first poll's delay
    assert next_poll(0.25, 9_999, 10_000, 1e9) == defaults.POLL_FIRST
    assert next_poll(0.25, 10_000, 10_000, 10_000.0) == defaults.POLL_FIRST


def test_with_no_rate_or_no_total_the_delay_stands():
    assert next_poll(0.25, 0, 10_000, 0.0) == 0.25
    assert next_poll(0.25, 5_000, None, 10_000.0) == 0.25


def test_the_bar_fills_with_the_images_done():
    assert bar(0, 10, width=10) == "[----------]"
    assert bar(5, 10, width=10) == "[#####-----]"
    assert bar(10, 10, width=10) == "[##########]"
    assert bar(0, 0, width=4) == "[####]"


def test_the_rate_is_over_the_last_seconds_not_since_the_start():
    from producer.progress import RecentRate

    rates = RecentRate(window=20)
    for t in range(0, 60):  # 1,000 images a second for a minute
        rates.add(float(t), 1000 * t)
    assert rates.add(60.0, 60_000) == pytest.approx(1000)
    for t in range(61, 90):  # then nothing
        rate = rates.add(float(t), 60_000)
    assert rate == 0  # since the start it would still be 667 a second


def test_a_run_is_stalled_after_a_few_gaps_and_shows_no_eta():
    from producer.progress import STALL_MAX, STALL_MIN, StallClock, progress_line

    clock = StallClock(0.0)
    for t in range(10):  # a batch stored every 0.5 s
        clock.see(t * 0.5, t * 100)
    assert clock.stalled(4.5 + STALL_MIN - 0.1) is None
    assert clock.stalled(4.5 + STALL_MIN) == pytest.approx(STALL_MIN)
    # nothing ever stored: stalled after STALL_MAX
    assert StallClock(0.0).stalled(STALL_MAX - 0.1) is None
    assert StallClock(0.0).stalled(STALL_MAX) == STALL_MAX
    line = progress_line(900, 1000, 0.0, 12.0, "no worker consumes queue q")
    assert line.endswith("900/1,000 images  stalled for 12 s: no worker consumes queue q")
    assert "ETA" not in line


def test_the_workers_database_url_is_absolute_and_masked(tmp_path, monkeypatch):
    from db.session import url_for_workers

    monkeypatch.chdir(tmp_path)
    assert url_for_workers("sqlite:///digitscore.db") == f"sqlite:///{tmp_path}/digitscore.db"
    assert url_for_workers("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"


def test_the_progress_line_shows_a_hints_first_clause():
    from producer.progress import short_cause

    assert short_cause("no worker consumes queue q on broker b: start one: X=1 worker") == (
        "no worker consumes queue q on broker b")
    assert short_cause("no worker consumes queue q (w@h stopped: killed? 40 s ago): start") == (
        "no worker consumes queue q (w@h stopped: killed? 40 s ago)")
