"""``producer submit``, ``resume``, ``status``, ``runs`` and ``report``: thin commands over
producer.submit, producer.report and db.queries."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from core import defaults
from core.errors import BadInput
from producer.options import (
    HELP,
    batch_options,
    broker_option,
    database_option,
    echo_err,
)


class RunArg(click.ParamType):
    """A run id, or ``latest``."""

    name = "RUN"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if isinstance(value, int) or str(value).lower() == "latest":
            return value if isinstance(value, int) else "latest"
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not a run id (a number, or 'latest')", param, ctx)


def resolve_run(conn: Any, run: int | str) -> int:
    from db.queries import get_run, latest_run_id

    if run == "latest":
        found = latest_run_id(conn)
        if found is None:
            raise BadInput("no runs yet: run `producer submit DIR`")
        return found
    get_run(conn, int(run))
    return int(run)


def _sender(engine: Any, broker_url: str | None, model_id: int) -> Any:
    if broker_url:
        from producer.queue import CelerySender

        sender = CelerySender(broker_url)
        sender.check()
        return sender
    from db.model_store import load_classifier
    from producer.submit import EmbeddedSender

    with engine.connect() as conn:
        clf = load_classifier(conn, model_id)
    return EmbeddedSender(engine, clf)


class Counter:
    """Counts images sent and, on a terminal, shows it on one line of stderr."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.n = 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, n: int) -> None:
        self.n += n
        if self.tty:
            rate = self.n / max(time.monotonic() - self.start, 1e-9)
            click.echo(f"\r{self.label} {self.n:,} images ({rate:,.0f}/s)", err=True, nl=False)

    def close(self) -> None:
        if self.tty and self.n:
            click.echo("", err=True)


@click.command("submit", context_settings=HELP)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "model_id", type=int, help="Model id to score with; default: newest.")
@click.option("--wait", is_flag=True, help="Wait until the run is done, then print its report.")
@batch_options
@broker_option
@database_option
def submit_cmd(
    directory: Path,
    model_id: int | None,
    wait: bool,
    batch_size: int,
    batch_bytes: int,
    broker_url: str | None,
    engine: Any,
) -> None:
    """Score every image below DIRECTORY (recursively) as a new run; prints the run id.

    An image's label is its parent folder's name when that is one of the model's classes.
    With no broker set, scores in this process; with one, enqueues stacked batches (image
    bytes inline) for `worker` processes, signed when DIGITSCORE_SECRET is set (workers with
    that secret score nothing else).

    \b
    Examples:
      producer submit ./mnist/valid --wait
      DIGITSCORE_BROKER_URL=redis://queue:6379/0 producer submit ./images --model 3
    """
    from core.files import check_directory
    from db.model_store import resolve_model_id
    from producer.submit import submit_directory

    check_directory(directory)
    with engine.connect() as conn:
        model_id = resolve_model_id(conn, model_id)
    sender = _sender(engine, broker_url, model_id)
    if sender.backend == "embedded":
        echo_err(f"no broker set ({defaults.BROKER_URL_ENV}): scoring in this process")
    counter = Counter("sent" if sender.backend == "celery" else "scored")
    try:
        sub = submit_directory(
            engine,
            directory,
            model_id,
            sender,
            batch_size=batch_size,
            batch_bytes=batch_bytes,
            on_run=lambda r: echo_err(f"run {r} created"),
            on_batch=counter,
        )
    finally:
        counter.close()
    click.echo(
        f"run {sub.run_id}: {sub.n_images} images in {sub.n_batches} batches "
        f"({sub.n_skipped} other files skipped), status {sub.status}"
    )
    if wait:
        _wait_and_report(engine, sub.run_id)


def _wait_and_report(engine: Any, run_id: int) -> None:
    from producer.progress import wait_for_run
    from producer.report import build_report, format_report

    try:
        status = wait_for_run(engine, run_id)
    except KeyboardInterrupt:
        echo_err(f"\nstopped waiting; run {run_id} goes on: `producer status {run_id}`")
        sys.exit(130)
    with engine.connect() as conn:
        click.echo(format_report(build_report(conn, run_id)))
    if status == "failed":
        sys.exit(1)


@click.command("resume", context_settings=HELP)
@click.argument("run", type=RunArg())
@click.option("--wait", is_flag=True, help="Wait until the run is done, then print its report.")
@batch_options
@broker_option
@database_option
def resume_cmd(
    run: int | str,
    wait: bool,
    batch_size: int,
    batch_bytes: int,
    broker_url: str | None,
    engine: Any,
) -> None:
    """Re-send the batches of RUN that have no results yet, and finish an interrupted walk.

    Use it when the broker lost its queue (Redis restarted) or the producer died mid-submit.
    Files are re-read from the run's source directory; nothing is scored twice into the
    results.

    \b
    Example:
      producer resume 12 --wait
    """
    from db.queries import get_run
    from producer.submit import resume_run

    with engine.connect() as conn:
        run_id = resolve_run(conn, run)
        model_id = get_run(conn, run_id)["model_id"]
    sender = _sender(engine, broker_url, model_id)
    resent, sub = resume_run(
        engine, run_id, sender, batch_size=batch_size, batch_bytes=batch_bytes
    )
    click.echo(
        f"run {run_id}: re-sent {resent} batch(es); {sub.n_images} images, status {sub.status}"
    )
    if wait:
        _wait_and_report(engine, run_id)


@click.command("status", context_settings=HELP)
@click.argument("run", type=RunArg())
@database_option
def status_cmd(run: int | str, engine: Any) -> None:
    """One line on RUN: status and counts.

    \b
    Example:
      producer status latest
    """
    from db.queries import get_run

    with engine.connect() as conn:
        r = get_run(conn, resolve_run(conn, run))
    total = "?" if r["n_images"] is None else r["n_images"]
    click.echo(
        f"run {r['id']} {r['status']}: {r['n_scored'] + r['n_failed']}/{total} done "
        f"({r['n_scored']} scored, {r['n_failed']} failed)"
    )
