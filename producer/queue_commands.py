"""``producer queue``: the runs waiting on the broker, a thin command over producer.backlog."""

from __future__ import annotations

import json
from typing import Any

import click

from core.settings import Settings
from core.text import plural
from producer.options import HELP, database_option, queue_broker_option


@click.command("queue", context_settings=HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@queue_broker_option
@database_option
def queue_cmd(as_json: bool, broker_url: str | None, engine: Any) -> None:
    """List the runs with batches waiting, in the order the workers will take them: each
    one's priority, batches and images waiting (queued or being scored), the batches ahead
    of its next one on the broker, its rate over the last 20 s and its estimated end.

    The depth of the queue is read from the broker (each priority list's length); the runs
    and their counts from this database, so runs of another database on the same queue are
    counted in the depth but not listed. Without a broker only the database's part is shown.

    \b
    Examples:
      producer queue
      DIGITSCORE_BROKER_URL=redis://queue:6379/0 producer queue --json
    """
    from producer.backlog import (
        ahead_text,
        broker_queue,
        eta_text,
        queue_document,
        runs_in_queue,
    )
    from producer.tables import format_table

    settings = Settings.from_env(broker_url=broker_url)
    queue = broker_queue(settings) if settings.broker_url else None
    with engine.connect() as conn:
        shown = runs_in_queue(conn, queue)
    if as_json:
        click.echo(json.dumps(queue_document(queue, shown), indent=2))
        return
    if queue is not None:
        waiting = plural(sum(queue.depths), "message")
        click.echo(f"queue {queue.name}: {waiting} waiting on the broker")
    if not shown:
        click.echo("no run of this database has batches waiting")
        return
    table = [
        [r.run, r.priority, r.status, r.batches_waiting, r.images_waiting, ahead_text(r),
         f"{r.rate:,.0f}", eta_text(r.eta_seconds)]
        for r in shown
    ]
    headers = ["run", "priority", "status", "batches", "images", "ahead", "images/s", "ends in"]
    click.echo(format_table(headers, table, "rllrrrrr"))
