"""How ``--wait`` paces its polls of the database, and draws its bar."""

from __future__ import annotations

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
