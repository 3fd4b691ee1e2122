"""Options and errors shared by every ``producer`` command (one setting: flag = env var)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from core import defaults

HELP = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@dataclass(frozen=True)
class LazyEngine:
    """The engine of a database URL, opened and migrated on first use: a command checks all
    its arguments before it touches any database, since nothing opens one before."""

    database_url: str  # not ``url``: that is the engine's own

    def __getattr__(self, name: str) -> Any:
        """The engine's own attribute: the engine opened and migrated now, the first time
        (db.session keeps one engine per URL)."""
        from db.session import get_engine

        return getattr(get_engine(self.database_url), name)


def database_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--database-url`` / ``DIGITSCORE_DATABASE_URL``: one setting, shared by every command;
    the command receives it as ``engine``, the :class:`LazyEngine` Click makes of the URL."""
    return click.option(
        "--database-url",
        "engine",
        type=LazyEngine,
        envvar=defaults.DATABASE_URL_ENV,
        default=defaults.DATABASE_URL,
        show_default=True,
        metavar="URL",
        help=f"SQLAlchemy URL of the results database [env {defaults.DATABASE_URL_ENV}].",
    )(f)


def broker_option(
    f: Callable[..., Any],
    use: str = "Celery broker (redis://...); unset: score in this process",
) -> Callable[..., Any]:
    """``--broker-url`` / ``DIGITSCORE_BROKER_URL``; ``use`` says what the command does with
    it."""
    return click.option(
        "--broker-url",
        envvar=defaults.BROKER_URL_ENV,
        default=None,
        metavar="URL",
        help=f"{use} [env {defaults.BROKER_URL_ENV}].",
    )(f)


def queue_broker_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker-url`` of a command that reads the queue's depth from the broker."""
    return broker_option(
        f, "The broker whose queue is read (redis://...); unset: the database's part only")


def limit_option(text: str, minimum: int = 1) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--limit N`` (default 50): how many rows a listing shows, ``text`` its help."""
    return click.option("--limit", type=click.IntRange(min=minimum), default=50,
                        show_default=True, help=text)


def send_option(default: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--send bytes|paths`` / ``DIGITSCORE_SEND``: what a queued batch carries."""
    text = "; default: the run's own" if default is None else ""
    return click.option(
        "--send",
        "send_mode",
        type=click.Choice(defaults.SEND_MODES),
        envvar=defaults.SEND_ENV,
        default=default,
        show_default=default is not None,
        help="bytes: read the files here, their bytes wait in Redis for the workers; paths: "
        "send only the batches' paths, each worker reads the files from the directory, "
        f"which every worker host must see{text} [env {defaults.SEND_ENV}].",
    )


def batch_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--batch-bytes",
        type=click.IntRange(min=1),
        default=defaults.BATCH_BYTES,
        show_default=True,
        help="Most encoded bytes in one batch (with a broker, at most a quarter of "
        f"{defaults.MAX_QUEUED_BYTES_ENV}).",
    )(f)
    return click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=defaults.BATCH_SIZE,
        show_default=True,
        help=f"Most images in one batch; at most {defaults.MAX_BATCH_IMAGES_ENV} (default "
        f"{defaults.MAX_BATCH_IMAGES}), the most a worker scores.",
    )(f)
