"""Options and errors shared by every ``producer`` command (one setting: flag = env var)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from worker import defaults

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2  # the same status Click uses for usage errors

HELP = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class BadInput(click.ClickException):
    """Input we cannot use: a missing directory, a directory without images, no such model."""

    exit_code = EXIT_BAD_INPUT


def database_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--database-url`` / ``DIGITSCORE_DATABASE_URL``: one setting, shared by every command."""

    @click.option(
        "--database-url",
        envvar=defaults.DATABASE_URL_ENV,
        default=defaults.DATABASE_URL,
        show_default=True,
        metavar="URL",
        help=f"SQLAlchemy URL of the results database [env {defaults.DATABASE_URL_ENV}].",
    )
    @functools.wraps(f)
    def wrapper(*args: Any, database_url: str, **kwargs: Any) -> Any:
        from db.session import DatabaseURLError, get_engine, mask_url

        try:
            engine = get_engine(database_url)
        except DatabaseURLError as e:
            raise BadInput(str(e)) from None
        except Exception as e:  # connection refused, bad credentials...
            raise click.ClickException(
                f"cannot open the database {mask_url(database_url)}: {type(e).__name__}. "
                f"Check --database-url / {defaults.DATABASE_URL_ENV} and that the server is up."
            ) from None
        return f(*args, engine=engine, **kwargs)

    return wrapper


def broker_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--broker-url",
        envvar=defaults.BROKER_URL_ENV,
        default=None,
        metavar="URL",
        help=f"Celery broker (redis://...); unset: score in this process "
        f"[env {defaults.BROKER_URL_ENV}].",
    )(f)


def batch_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--batch-bytes",
        type=click.IntRange(min=1),
        default=defaults.BATCH_BYTES,
        show_default=True,
        help="Most encoded bytes in one batch.",
    )(f)
    return click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=defaults.BATCH_SIZE,
        show_default=True,
        help="Most images in one batch.",
    )(f)


def echo_err(message: str) -> None:
    click.echo(message, err=True)
