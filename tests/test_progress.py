"""How ``--wait`` paces its polls of the database, and draws its bar."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from core import defaults
from db import queries
from producer import progress
from producer.progress import bar, wait_for_run
from tests.support import save_model


def test_wait_polls_every_interval_and_sees_the_end_at_the_next_poll(
    memory_engine, classifier, monkeypatch
):
    model_id = save_model(memory_engine, classifier)
    with memory_engine.begin() as conn:
        run_id, _token = queries.create_run(conn, model_id, "/images", "embedded")
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:  # the run ends while --wait sleeps for the third time
            with memory_engine.begin() as conn:
                conn.execute(text("UPDATE runs SET status = 'done' WHERE id = :r"), {"r": run_id})

    monkeypatch.setattr(progress.time, "sleep", sleep)
    assert wait_for_run(memory_engine, run_id, explain=None) == "done"
    assert sleeps == [defaults.PROGRESS_POLL_INTERVAL] * 3  # one rule, and the end seen at once


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
