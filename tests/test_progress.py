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
