"""One Settings: read from flags and env vars once, checked once, described without secrets, and
the README's settings table is the list of its fields."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core import defaults
from core.settings import SettingError, Settings, env_names

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_settings(text: str) -> dict[str, str]:
    """The settings table of a README: each ``DIGITSCORE_*`` env var of the table's first
    column, with the first ``--flag`` its second column names (``""`` when none). The table is
    the one whose header row starts ``| env var |``."""
    rows: dict[str, str] = {}
    in_table = False
    for line in text.splitlines():
        if line.startswith("| env var |"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        if not in_table or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        env = re.fullmatch(r"`(DIGITSCORE_[A-Z_]+)`", cells[0])
        if env is None:
            raise AssertionError(f"a settings row whose first cell is not an env var: {line}")
        flag = re.search(r"--[a-z-]+", cells[1]) if len(cells) > 1 else None
        rows[env.group(1)] = flag.group(0) if flag else ""
    return rows


def test_the_readme_settings_table_lists_every_setting_and_its_flag():
    assert readme_settings(README.read_text()) == env_names()


def test_readme_settings_reads_a_table():
    text = "x\n| env var | flag | default |\n|---|---|---|\n| `DIGITSCORE_A` | `w --b` | 1 |\n"
    assert readme_settings(text + "| `DIGITSCORE_C` | | 2 |\n\nafter") == {
        "DIGITSCORE_A": "--b", "DIGITSCORE_C": ""}


def test_defaults_and_env_vars():
    assert Settings.from_env({}) == Settings()
    s = Settings.from_env({
        "DIGITSCORE_QUEUE": " fleet ", "DIGITSCORE_PAYLOAD_TTL": "60",
        "DIGITSCORE_MAX_QUEUED_BYTES": "1048576", "DIGITSCORE_TASK_EVENTS": "yes",
        "DIGITSCORE_SECRET": "s" * 16, "DIGITSCORE_BROKER_URL": "",
    })
    assert (s.queue, s.payload_ttl, s.max_queued_bytes, s.task_events, s.secret) == (
        "fleet", 60, 1048576, True, b"s" * 16)
    assert s.broker_url is None  # blank is unset


def test_a_flag_wins_over_its_env_var_and_none_means_not_given():
    env = {"DIGITSCORE_BROKER_URL": "redis://env/0", "DIGITSCORE_CONCURRENCY": "3"}
    assert Settings.from_env(env, broker_url="redis://flag/0").broker_url == "redis://flag/0"
    assert Settings.from_env(env, broker_url=None, concurrency=None).concurrency == 3
    with pytest.raises(TypeError, match="no such settings"):
        Settings.from_env({}, brokerurl="x")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DIGITSCORE_PAYLOAD_TTL": "0"}, "DIGITSCORE_PAYLOAD_TTL must be a positive number of "
         "seconds"),
        ({"DIGITSCORE_PAYLOAD_TTL": "soon"}, "'soon' is not a whole number of seconds"),
        ({"DIGITSCORE_MAX_QUEUED_BYTES": "1MB"}, "not a whole number of bytes"),
        ({"DIGITSCORE_MAX_BATCH_IMAGES": "0"}, "positive number of images"),
        ({"DIGITSCORE_SECRET": "short"}, "shorter than 16 characters"),
        ({"DIGITSCORE_SEND": "carrier-pigeon"}, "use one of bytes, paths"),
        ({"DIGITSCORE_VISIBILITY_TIMEOUT": "1"}, "leaves the task time limit (1 s) no room"),
    ],
)
def test_settings_that_cannot_be_used_name_themselves(env, message):
    with pytest.raises(SettingError, match=re.escape(message)):
        Settings.from_env(env)


def test_the_time_limit_and_retry_cap_follow_from_the_visibility_timeout():
    """Derived, never set: both stay below the visibility timeout, so a batch is never still
    running, or waiting to retry, when Redis hands its message to another worker."""
    for timeout, limit, retry in ((600, 300, 60), (150, 120, 60), (100, 80, 50), (5, 4, 2),
                                  (2, 1, 1)):
        s = Settings(visibility_timeout=timeout)
        assert (s.task_time_limit, s.db_retry_max) == (limit, retry)
        assert s.task_time_limit < timeout and s.db_retry_max < timeout
    assert Settings().task_time_limit == defaults.TASK_TIME_LIMIT
    # 2 s is the shortest timeout its env var takes (1 s: see the test above)
    assert Settings.from_env({"DIGITSCORE_VISIBILITY_TIMEOUT": "2"}).task_time_limit == 1


def test_describe_masks_urls_and_never_shows_the_secret():
    s = Settings(
        broker_url="redis://:Sup3rS3cret@queue:6379/0",
        database_url="postgresql+psycopg://me:DbPa55word@db/digitscore",
        secret=b"the-shared-secret-value",
    )
    text = s.describe()
    assert "redis://:***@queue:6379/0" in text and "me:***@db/digitscore" in text
    assert "signed messages only" in text and "task time limit 300 s" in text
    for secret in ("Sup3rS3cret", "DbPa55word", "the-shared-secret-value"):
        assert secret not in text and secret not in repr(s)
    assert "not set" in Settings().describe()
