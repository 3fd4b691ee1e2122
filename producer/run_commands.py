"""``producer submit``, ``resume``, ``wait`` and ``status``: thin commands over
producer.submit, producer.progress, producer.report and db.queries."""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from core import defaults, wire
from core.errors import EXIT_INTERRUPTED, BadInput, RunCancelled
from core.settings import Settings
from core.text import plural
from producer.options import (
    HELP,
    batch_options,
    broker_option,
    database_option,
    queue_broker_option,
    send_option,
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


def _sender(engine: Any, settings: Settings, model_id: int) -> Any:
    if settings.broker_url:
        from producer.queue import CelerySender

        sender = CelerySender(settings, on_wait=_report_wait)
        sender.check()
        if sender.warning:
            click.echo(f"warning: {sender.warning}", err=True)
        return sender
    from db.model_store import load_classifier
    from producer.submit import EmbeddedSender

    with engine.connect() as conn:
        clf = load_classifier(conn, model_id)
    return EmbeddedSender(engine, clf)


def _report_wait(queued: int, bound: int) -> None:
    mib = 1024 * 1024
    click.echo(
        f"\r{queued / mib:,.1f} MiB queued in Redis (at most {bound / mib:,.1f} MiB, "
        f"{defaults.MAX_QUEUED_BYTES_ENV}): waiting for workers to take batches",
        err=True,
    )


def _mode_for(sender: Any, send_mode: str | None) -> str | None:
    """The send mode to use (``None``: the run's own); in this process the files are read
    whatever ``--send`` says, so a run scored here is a ``bytes`` run."""
    if sender.backend != "embedded":
        return send_mode
    if send_mode == "paths":
        click.echo("--send paths needs workers: reading the files in this process", err=True)
    return "bytes"


@dataclass
class Counter:
    """Counts images sent and, on a terminal, shows it on one line of stderr."""

    label: str
    n: int = 0
    start: float = field(default_factory=time.monotonic)
    tty: bool = field(default_factory=lambda: sys.stderr.isatty())  # stderr as it is now

    def __call__(self, n: int) -> None:
        self.n += n
        if self.tty:
            rate = self.n / max(time.monotonic() - self.start, 1e-9)
            line = f"\r{self.label} {plural(self.n, 'image')} ({rate:,.0f}/s)"
            click.echo(line, err=True, nl=False)


def timeout_option(f: Any) -> Any:
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        metavar="S",
        help="Give up waiting after S seconds (exit 1); the run goes on. Default: wait on.",
    )(f)


def wait_options(f: Any) -> Any:
    f = timeout_option(f)
    return click.option(
        "--wait", is_flag=True, help="Wait until the run is done, then print its report."
    )(f)


def check_send_options(
    settings: Settings, wait: bool, timeout: float | None, batch_size: int
) -> None:
    """The options ``submit`` and ``resume`` share, checked before anything is opened:
    ``--timeout`` needs ``--wait``, and ``--batch-size`` is at most what a worker scores in
    one batch."""
    if timeout is not None and not wait:
        raise click.UsageError("--timeout is how long --wait waits: give --wait too")
    limit = settings.max_batch_images
    if batch_size > limit:
        raise click.BadParameter(
            f"{batch_size} is more than {defaults.MAX_BATCH_IMAGES_ENV}={limit}, the most "
            "images a worker scores in one batch", param_hint="'--batch-size'",
        )


@click.command("submit", context_settings=HELP)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "model_id", type=int, help="Model id to score with; default: newest.")
@click.option(
    "--priority",
    type=click.Choice(defaults.PRIORITIES),
    default=defaults.PRIORITY,
    show_default=True,
    help="Workers take the batches of high runs first, then normal, then low; within one, "
    f"each run's first {wire.BOOSTED_BATCHES} batches go ahead of the other runs' later "
    "ones, so a small run is not stuck behind a big one.",
)
@wait_options
@send_option(defaults.SEND)
@batch_options
@broker_option
@database_option
def submit_cmd(
    directory: Path,
    model_id: int | None,
    priority: str,
    wait: bool,
    timeout: float | None,
    send_mode: str,
    batch_size: int,
    batch_bytes: int,
    broker_url: str | None,
    engine: Any,
) -> None:
    """Score every image below DIRECTORY (recursively) as a new run; prints the run id.

    An image's label is its parent folder's name when that is one of the model's classes.
    With no broker set, scores in this process; with one, enqueues batches for `worker`
    processes, signed when DIGITSCORE_SECRET is set (workers with that secret score nothing
    else): with --send bytes (the default) their image bytes wait in Redis, at most
    DIGITSCORE_MAX_QUEUED_BYTES of them (default: the smaller of 256 MiB and half of Redis's
    maxmemory; past it the producer waits for workers); with --send paths only their paths
    go, and each worker reads the files from DIRECTORY, which it must see at the same path
    (or mapped by the workers' DIGITSCORE_PATH_MAP=/here=/there).

    \b
    If it stops part way (the database or the broker failed, or Ctrl-C: exit 130), it says
    why; `producer resume RUN` then sends the rest. While it sends, `status` shows the run as
    still being sent. With --wait it shows the rate over the last 20 s, or `stalled for N s`
    and why; every DIGITSCORE_HEAL_EVERY s (5; 0: off) it re-sends lost batches (see
    `producer heal`); when no batch is stored for 30 s (DIGITSCORE_STALL_HINT_AFTER), it
    asks the broker which workers consume the queue and says what to do.

    \b
    Examples:
      producer submit ./mnist/valid --wait
      DIGITSCORE_BROKER_URL=redis://queue:6379/0 producer submit ./images --model 3
      producer submit ./images --wait --timeout 600
      producer submit ./urgent --priority high --wait
      DIGITSCORE_BROKER_URL=redis://queue:6379/0 producer submit /nfs/images --send paths
    """
    settings = Settings.from_env(broker_url=broker_url, send=send_mode)
    check_send_options(settings, wait, timeout, batch_size)
    created: list[int] = []
    try:
        sub = _submit(directory, model_id, priority, settings, batch_size, batch_bytes, engine,
                      created)
    except RunCancelled:
        _cancel_since(engine, settings, created[0])
        raise
    except KeyboardInterrupt:
        if not created:
            click.echo("\nstopped before the run was created: nothing was submitted", err=True)
        else:
            run_id = created[0]
            click.echo(
                f"\nstopped; run {run_id} is kept: `producer resume {run_id}` sends the rest",
                err=True,
            )
        sys.exit(EXIT_INTERRUPTED)
    try:
        click.echo(
            f"run {sub.run_id}: {plural(sub.n_images, 'image')} in "
            f"{plural(sub.n_batches, 'batch', 'batches')} "
            f"({plural(sub.n_skipped, 'other file')} skipped), status {sub.status}"
        )
    except KeyboardInterrupt:  # the run is wholly sent
        if wait:
            _stopped_waiting(engine, sub.run_id, settings)
        click.echo(
            f"\nstopped; run {sub.run_id} was sent: `producer status {sub.run_id}`",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    if wait:
        _wait_and_report(engine, sub.run_id, settings, timeout)


#: What a Ctrl-C before ``submit``'s body runs (its options open the database) has left.
setattr(submit_cmd, "interrupted_early",  # noqa: B010 - read by ProducerGroup
        "stopped before the run was created: nothing was submitted")


def _cancel_since(engine: Any, settings: Settings, run_id: int) -> None:
    """Cancel again a run that was cancelled while this process sent it: the batches it
    recorded since the cancel are stopped, their payloads deleted."""
    from producer.cancel import cancel

    cancel(engine, settings, run_id)


def _submit(
    directory: Path,
    model_id: int | None,
    priority: str,
    settings: Settings,
    batch_size: int,
    batch_bytes: int,
    engine: Any,
    created: list[int],
) -> Any:
    """``submit``'s work up to the last batch sent; ``created`` gets the run's id as soon as
    the run exists."""
    from core.files import check_directory
    from db.model_store import resolve_model_id
    from producer.submit import submit_directory

    check_directory(directory)
    with engine.connect() as conn:
        model_id = resolve_model_id(conn, model_id)
    sender = _sender(engine, settings, model_id)
    if sender.backend == "embedded":
        click.echo(f"no broker set ({defaults.BROKER_URL_ENV}): scoring in this process", err=True)
    send_mode = _mode_for(sender, settings.send) or defaults.SEND
    if sender.backend == "celery":
        batch_bytes = sender.batch_bytes(batch_bytes)
    counter = Counter("sent" if sender.backend == "celery" else "scored")

    def on_run(run_id: int) -> None:
        created.append(run_id)
        click.echo(f"run {run_id} created", err=True)

    try:
        return submit_directory(
            engine,
            directory,
            model_id,
            sender,
            batch_size=batch_size,
            batch_bytes=batch_bytes,
            send_mode=send_mode,
            priority=priority,
            on_run=on_run,
            on_batch=counter,
        )
    finally:
        if counter.tty and counter.n:  # end the progress line
            click.echo("", err=True)


def _wait_and_report(
    engine: Any, run_id: int, settings: Settings, timeout: float | None
) -> None:
    """Wait for the run (saying why when it does not move), then print its report; a
    Ctrl-C from the moment it is called is :func:`_stopped_waiting`'s."""
    try:
        from sqlalchemy.exc import SQLAlchemyError

        from core.errors import DatabaseUnavailable
        from producer.progress import wait_for_run
        from producer.report import build_report, format_report
        from producer.submit import failure_cause

        heal = None
        every = settings.heal_every
        explain = functools.partial(why_stalled, engine, run_id, settings, every > 0)
        if settings.broker_url and every > 0:
            from producer.heal import Healer, sweep_and_say

            heal = functools.partial(sweep_and_say, Healer(engine, settings, [run_id]), run_id)
        try:
            status = wait_for_run(engine, run_id, timeout=timeout, explain=explain,
                                  stall_after=settings.stall_hint_after, heal=heal,
                                  heal_every=every)
        except SQLAlchemyError as e:
            raise DatabaseUnavailable(
                f"stopped waiting for run {run_id}: {failure_cause(engine, e)}; the run goes "
                f"on without this command: see `producer status {run_id}`"
            ) from e
    except KeyboardInterrupt:
        _stopped_waiting(engine, run_id, settings)
    with engine.connect() as conn:
        click.echo(format_report(build_report(conn, run_id)))
    if status == "cancelled":
        raise RunCancelled(
            f"run {run_id} was cancelled (`producer cancel`): the report above is of what it "
            "stored"
        )


def _stopped_waiting(engine: Any, run_id: int, settings: Settings) -> None:
    """A Ctrl-C while waiting: on a terminal, ask whether to cancel the run (a second Ctrl-C
    declines); elsewhere say how to. Exits 130 either way."""
    goes_on = f"stopped waiting; run {run_id} goes on: `producer status {run_id}`"
    if not sys.stdin.isatty():
        click.echo(f"\n{goes_on}, `producer cancel {run_id}` stops it", err=True)
        sys.exit(EXIT_INTERRUPTED)
    try:
        stop = click.confirm(f"\ncancel run {run_id}?", default=False, err=True)
    except click.Abort:  # a second Ctrl-C, or the end of input
        stop = False
    if stop:
        from producer.cancel import cancel, describe_cancel

        click.echo(describe_cancel(engine, *cancel(engine, settings, run_id)), err=True)
    else:
        click.echo(f"\n{goes_on}", err=True)
    sys.exit(EXIT_INTERRUPTED)


def why_stalled(engine: Any, run_id: int, settings: Settings, healing: bool) -> str:
    """Why a run stores nothing: its sender interrupted or still sending, else what the
    broker and the workers registry say (producer/queue.why_idle)."""
    from db.queries import get_run

    with engine.connect() as conn:
        note = sending_note(get_run(conn, run_id))
    if note is not None and not note.startswith("still"):
        return note
    if not settings.broker_url:
        return note or "no broker set: its batches are scored by the process that sends them"
    from producer.queue import why_idle

    idle = why_idle(settings, engine, run_id, healing)
    return f"{idle} (the run is {note})" if note else idle


@click.command("resume", context_settings=HELP)
@click.argument("run", type=RunArg())
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Also score again the batches that failed (their error rows say why: fix that "
    "first); each one's error rows are replaced by its new rows in one transaction.",
)
@wait_options
@send_option(None)
@batch_options
@broker_option
@database_option
def resume_cmd(
    run: int | str,
    retry_failed: bool,
    wait: bool,
    timeout: float | None,
    send_mode: str | None,
    batch_size: int,
    batch_bytes: int,
    broker_url: str | None,
    engine: Any,
) -> None:
    """Re-send the batches of RUN that have no results yet, and finish an interrupted walk.

    Use it when the broker lost its queue (Redis restarted, or was full) or the producer
    died mid-submit. It refuses while a live `submit` or `resume` sends the run, and leaves
    a done run as it is. Files are re-read from the run's source directory (by the workers, in
    a --send paths run); nothing is scored twice into the results. --send switches the run
    to that mode for what is left. --retry-failed re-sends the batches that failed too,
    once their cause is fixed (a model, a file, a worker setting).

    \b
    Examples:
      producer resume 12 --wait
      producer resume 12 --send paths
      producer resume 12 --retry-failed --wait
    """
    from db.queries import get_run
    from producer.submit import not_resumed, resume_run

    settings = Settings.from_env(broker_url=broker_url)
    check_send_options(settings, wait, timeout, batch_size)
    with engine.connect() as conn:
        run_id = resolve_run(conn, run)
        found = get_run(conn, run_id)
    if found["status"] == "cancelled":
        raise not_resumed(found)

    def say_requeued(n: int) -> None:
        click.echo(
            f"run {run_id}: {plural(n, 'failed batch', 'failed batches')} to score again",
            err=True,
        )

    resent, sub = 0, None
    if found["status"] != "done" or retry_failed:
        sender = _sender(engine, settings, found["model_id"])
        if sender.backend == "celery":
            batch_bytes = sender.batch_bytes(batch_bytes)
        try:
            resent, sub = resume_run(
                engine, run_id, sender, batch_size=batch_size, batch_bytes=batch_bytes,
                send_mode=_mode_for(sender, send_mode),
                retry_failed=say_requeued if retry_failed else None,
            )
        except KeyboardInterrupt:
            click.echo(
                f"\nstopped; run {run_id} is kept: `producer resume {run_id}` sends the rest",
                err=True,
            )
            sys.exit(EXIT_INTERRUPTED)
        except RunCancelled:
            _cancel_since(engine, settings, run_id)
            raise
    if sub is None or (sub.status == "done" and not resent):
        click.echo(f"run {run_id} is done: nothing to re-send, nothing changed")
    else:
        click.echo(
            f"run {run_id}: re-sent {plural(resent, 'batch', 'batches')}; "
            f"{plural(sub.n_images, 'image')}, status {sub.status}"
        )
    if wait:
        _wait_and_report(engine, run_id, settings, timeout)


@click.command("wait", context_settings=HELP)
@click.argument("run", type=RunArg())
@timeout_option
@click.option(
    "--broker-url",
    envvar=defaults.BROKER_URL_ENV,
    default=None,
    metavar="URL",
    help=f"The run's broker, asked which workers consume its queue when the run does not "
    f"move [env {defaults.BROKER_URL_ENV}].",
)
@database_option
def wait_cmd(run: int | str, timeout: float | None, broker_url: str | None, engine: Any) -> None:
    """Wait for RUN, submitted earlier, showing its progress; then print its report.

    Exits 1 if --timeout passed. With a broker set, re-sends lost batches every
    DIGITSCORE_HEAL_EVERY s (see `producer heal`) and says why when no batch is stored for
    30 s (DIGITSCORE_STALL_HINT_AFTER).

    \b
    Example:
      producer wait latest --timeout 3600
    """
    settings = Settings.from_env(broker_url=broker_url)
    with engine.connect() as conn:
        run_id = resolve_run(conn, run)
    _wait_and_report(engine, run_id, settings, timeout)


@click.command("status", context_settings=HELP)
@click.argument("run", type=RunArg())
@queue_broker_option
@database_option
def status_cmd(run: int | str, broker_url: str | None, engine: Any) -> None:
    """One line on RUN: status, priority and counts; while batches of it wait, a second:
    how many, how many batches are ahead of its next one on the broker, its rate over the
    last 20 s and its estimated end (see `producer queue`).

    \b
    Example:
      producer status latest
    """
    from db.queries import get_run, stall
    from producer.backlog import broker_queue, runs_in_queue, status_queue_line

    settings = Settings.from_env(broker_url=broker_url)
    with engine.connect() as conn:
        r = get_run(conn, resolve_run(conn, run))
        stalled = stall(conn, r)
    line = status_line(r)
    hint = stall_hint(r, stalled, settings.stall_hint_after)
    click.echo(f"{line}; {hint}" if hint else line)
    if stalled is None:  # nothing of it waits
        return
    queue = broker_queue(settings) if settings.broker_url else None
    with engine.connect() as conn:
        for waiting in runs_in_queue(conn, queue, [r["id"]]):
            click.echo(f"run {r['id']}: {status_queue_line(waiting)}")


def stall_hint(run: dict[str, Any], stalled: Any, stall_after: float) -> str | None:
    """For a run that stored nothing for longer than ``stall_after`` seconds
    (``Settings.stall_hint_after``) while batches of it wait: what to run. Batches for
    workers may be lost on the broker (``producer heal`` finds and re-sends them), or held by
    workers of another database; a batch of a run scored in its producer's process waits
    only when that process stopped."""
    if stalled is None or stalled.seconds <= stall_after:
        return None
    run_id = run["id"]
    head = (f"stalled: no batch stored for {stalled.seconds:,.0f} s while "
            f"{stalled.queued_batches} wait")
    if run["backend"] != "celery":
        return f"{head}: its producer stopped: run `producer resume {run_id}`"
    return (
        f"{head}: `producer heal {run_id}` re-sends lost ones (`producer wait {run_id}` heals "
        f"as it waits, `producer resume {run_id}` re-sends them all); see `producer workers` "
        "for the workers writing to this database"
    )


def status_line(r: dict[str, Any]) -> str:
    """A run's status and counts; for a run whose submission has not finished, whether a
    live process is still sending it or how to finish it (:func:`sending_note`)."""
    total = "?" if r["n_images"] is None else r["n_images"]
    line = (
        f"run {r['id']} {r['status']}, priority {r['priority']}: "
        f"{r['n_scored'] + r['n_failed']}/{total} done "
        f"({r['n_scored']} scored, {r['n_failed']} failed)"
    )
    note = sending_note(r)
    return f"{line}; {note}" if note else line


def sending_note(r: dict[str, Any]) -> str | None:
    """For a run not wholly sent (``submitted_at`` unset): ``still being sent (pid, host)``
    while its sender's lease is renewed (db/leases.py), else that it was interrupted and
    ``producer resume RUN`` sends the rest; ``None`` for a run wholly sent."""
    from db.leases import holder_of, is_alive

    if r["submitted_at"] is not None or r["status"] not in ("queued", "running"):
        return None
    sender = holder_of(r)
    if sender is not None and is_alive(sender):
        return f"still being sent ({sender.describe()})"
    who = f" ({sender.describe()} stopped)" if sender is not None else ""
    return (
        f"interrupted before all was sent{who}: run `producer resume {r['id']}` to send "
        f"the rest"
    )
