"""``producer cancel``, ``delete`` and ``prune``: thin commands over producer/cancel.py,
db/cancellation.py and db/deletion.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from core import defaults
from core.text import plural
from producer.options import HELP, database_option
from producer.run_commands import RunArg, resolve_run


def broker_for_payloads(f: Any) -> Any:
    return click.option(
        "--broker-url",
        envvar=defaults.BROKER_URL_ENV,
        default=None,
        metavar="URL",
        help=f"The runs' broker, whose Redis holds their queued payloads; unset: none is "
        f"looked for [env {defaults.BROKER_URL_ENV}].",
    )(f)


@click.command("cancel", context_settings=HELP)
@click.argument("run", type=RunArg())
@broker_for_payloads
@database_option
def cancel_cmd(run: int | str, broker_url: str | None, engine: Any) -> None:
    """Stop RUN: no worker starts another batch of it, and its queued payloads are deleted.

    The cancel is recorded in the database, so it holds across worker restarts: a worker
    that gets a message of the run drops it unscored. A batch being scored at that moment is
    either stored before the cancel, and kept, or dropped unstored; nothing is half stored,
    and nothing already stored is lost. A live `submit` or `resume` of the run stops sending
    within seconds. The run's status becomes `cancelled`; `resume` refuses it (submit the
    directory again for a new run), `delete` may remove it.

    \b
    Examples:
      producer cancel 12
      DIGITSCORE_BROKER_URL=redis://queue:6379/0 producer cancel latest
    """
    from core.settings import Settings
    from producer.cancel import cancel, describe_cancel

    settings = Settings.from_env(broker_url=broker_url)
    with engine.connect() as conn:
        run_id = resolve_run(conn, run)
    cancelled, removed = cancel(engine, settings, run_id)
    click.echo(describe_cancel(engine, cancelled, removed))


def yes_option(f: Any) -> Any:
    return click.option("--yes", "-y", is_flag=True, help="Delete without asking.")(f)


def vacuum_option(f: Any) -> Any:
    return click.option(
        "--vacuum", is_flag=True,
        help="On SQLite, VACUUM the file afterwards so that it shrinks (it rewrites the "
        "whole file, holding the database's lock meanwhile).",
    )(f)


@click.command("delete", context_settings=HELP)
@click.argument("runs", type=RunArg(), nargs=-1, required=True)
@yes_option
@vacuum_option
@broker_for_payloads
@database_option
def delete_cmd(
    runs: tuple[int | str, ...], yes: bool, vacuum: bool, broker_url: str | None, engine: Any
) -> None:
    """Delete RUNS: their prediction rows, batches, counts, kept lists, lease and any payloads
    left in Redis. The models they used stay.

    Only a done or cancelled run can be deleted: cancel a queued or running one first
    (`producer cancel RUN`). Asks first unless --yes. Deleted run ids are never reused.

    \b
    Examples:
      producer delete 12 13 --yes
      producer delete 12 --vacuum
    """
    from db.deletion import check_deletable, footprint

    with engine.connect() as conn:
        ids = sorted({resolve_run(conn, run) for run in runs})
        found = [footprint(conn, run_id) for run_id in ids]
    for run in found:
        check_deletable(run)
    _delete_confirmed(engine, found, yes, vacuum, broker_url)


@click.command("prune", context_settings=HELP)
@click.option(
    "--older-than", "age", required=True, metavar="AGE",
    help="Delete the done and cancelled runs that ended longer ago than AGE: a number and "
    "a unit, s m h d or w (30d, 12h, 2w).",
)
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@yes_option
@vacuum_option
@broker_for_payloads
@database_option
def prune_cmd(
    age: str, dry_run: bool, yes: bool, vacuum: bool, broker_url: str | None, engine: Any
) -> None:
    """Delete every done or cancelled run that ended more than --older-than ago, as
    `producer delete` does; queued and running runs are left alone.

    \b
    Examples:
      producer prune --older-than 30d --dry-run
      producer prune --older-than 90d --yes
    """
    from db.deletion import finished_before
    from producer.cancel import parse_age

    try:
        cutoff = datetime.now(UTC) - parse_age(age)
    except Exception as e:
        raise click.BadParameter(str(e), param_hint="--older-than") from None
    with engine.connect() as conn:
        found = finished_before(conn, cutoff)
    if not found:
        click.echo(f"no done or cancelled run ended before {cutoff:%Y-%m-%d %H:%M:%S} UTC")
        return
    if dry_run:
        for run in found:
            click.echo(f"would delete {run.describe()}")
        click.echo(f"{plural(len(found), 'run')} would be deleted (--dry-run: nothing was)")
        return
    _delete_confirmed(engine, found, yes, vacuum, broker_url)


def _delete_confirmed(
    engine: Any, found: list[Any], yes: bool, vacuum: bool, broker_url: str | None
) -> None:
    from core.settings import Settings
    from db.deletion import sqlite_file
    from db.deletion import vacuum as vacuum_file
    from producer.cancel import delete

    if not yes:
        for run in found:
            click.echo(f"to delete: {run.describe()}")
        click.confirm(f"delete {plural(len(found), 'run')}?", abort=True)
    settings = Settings.from_env(broker_url=broker_url)
    for run in found:
        deleted, removed = delete(engine, settings, run.run_id)
        click.echo(f"deleted run {deleted.run_id}: {deleted.rows:,} rows, "
                   f"{deleted.batches:,} batches; {removed.describe()}")
    if sqlite_file(engine) is None:
        return
    if vacuum:
        before, after = vacuum_file(engine)
        mib = 1024 * 1024
        click.echo(f"VACUUM: {before / mib:,.1f} MiB -> {after / mib:,.1f} MiB")
    else:
        click.echo(
            "the SQLite file keeps its size until VACUUM: add --vacuum to shrink it",
            err=True,
        )
