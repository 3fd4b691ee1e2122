"""``producer heal``: one look for lost batches, for a user or cron (a ``--wait`` looks by
itself every ``DIGITSCORE_HEAL_EVERY`` seconds)."""

from __future__ import annotations

import time
from typing import Any

import click

from core import defaults
from producer.options import HELP, database_option
from producer.run_commands import RunArg, resolve_run


@click.command("heal", context_settings=HELP)
@click.argument("run", type=RunArg(), required=False)
@click.option(
    "--broker-url",
    envvar=defaults.BROKER_URL_ENV,
    required=True,
    metavar="URL",
    help=f"The runs' broker (redis://...) [env {defaults.BROKER_URL_ENV}].",
)
@database_option
def heal_cmd(run: int | str | None, broker_url: str, engine: Any) -> None:
    """Find the lost batches of RUN (default: of every unfinished run) and send them again.

    A batch is lost when it is unfinished and, on two looks a few seconds apart, the broker
    has no message for it (a worker on another database dropped it, or Redis lost it) or its
    message is held by no live worker (the worker holding it was killed). Each batch is
    taken in the database first, so healers running at once send it once; a run that a live
    `submit` or `resume` is sending is left to it. Files are re-read from the run's source
    directory when their bytes are gone from Redis.

    \b
    Examples:
      producer heal 12
      */5 * * * * DIGITSCORE_BROKER_URL=redis://queue:6379/0 producer heal
    """
    from core.settings import Settings
    from producer.heal import Healer

    settings = Settings.from_env(broker_url=broker_url)
    run_ids = None
    if run is not None:
        with engine.connect() as conn:
            run_ids = [resolve_run(conn, run)]
    healer = Healer(engine, settings, run_ids)
    healer.sweep()  # the suspects
    time.sleep(settings.heal_every or 1.0)
    healed = healer.sweep()  # confirmed, taken and re-sent
    for run_id in sorted(healed.resent):
        click.echo(f"run {run_id}: {healed.said(run_id)}")
    for line in healed.failed:
        click.echo(f"cannot re-send {line}", err=True)
    if not healed.count() and not healed.failed:
        click.echo("no lost batch found")
