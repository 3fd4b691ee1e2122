"""Submitting a directory as a run: walk, batch, record each batch, hand it to a sender.

A sender either scores the batch in this process (the embedded default) or enqueues it for
the Celery workers; both score with ``core.scoring.score_images`` and store with
``db.batch_life.store_batch``.

Each batch is recorded in the database before it is sent, so ``resume_run`` can always tell
what was sent and re-send what has no results. A failure part way (the database full or gone,
the broker gone or refusing writes, a file system error) therefore leaves a run that
``producer resume`` completes: it is raised as one :class:`SubmitInterrupted` that names the
cause in the driver's own words and that command.

A run's ``send_mode`` says what a batch carries: ``bytes``, the files read here; ``paths``,
nothing but its recorded paths, which each worker reads from the run's source directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

if TYPE_CHECKING:
    from core.classifier import Classifier

from core import defaults
from core.archive_batches import archive_batches, read_recorded
from core.errors import (
    BadInput,
    DatabaseUnavailable,
    DigitscoreError,
    DirectoryError,
    RunCancelled,
    SubmitInterrupted,
)
from core.files import (
    DirectoryWalk,
    FileBatch,
    batches,
    check_directory,
    path_batches,
    read_batch,
)
from core.text import first_line, mask_url
from core.wire import BatchMessage
from db import batch_life, queries
from db.healing import mark_sent
from db.leases import Lease, holding, this_process
from db.session import driver_reason, read_then_write


class Sender(Protocol):
    backend: str
    #: Called while the sender waits for room to send (the run's lease check), if it waits.
    while_waiting: Callable[[], None] | None

    def send(
        self, message: BatchMessage, batch: FileBatch | None, priority: str = ...
    ) -> None: ...


class EmbeddedSender:
    """Scores each batch in this process, at once."""

    backend = "embedded"
    while_waiting = None  # it never waits

    def __init__(self, engine: Engine, classifier: Classifier) -> None:
        self.engine = engine
        self.classifier = classifier

    def send(
        self, message: BatchMessage, batch: FileBatch | None,
        priority: str = defaults.PRIORITY,
    ) -> None:
        """Score and store the batch now (``priority`` orders nothing here)."""
        # imported here: a producer that only enqueues never loads torch
        from core.scoring import score_images

        if batch is None:
            raise ValueError("scoring in this process needs the batch's files read")
        columns = score_images(
            self.classifier, batch.paths, batch.blobs, batch.errors, class_names=batch.labels
        )
        batch_life.store_batch(self.engine, message.run_id, message.seq, columns)


@dataclass(frozen=True)
class Submission:
    run_id: int
    n_images: int
    n_skipped: int
    n_batches: int
    status: str


OnBatch = Callable[[int], None]  # called with the number of images just sent


def submit_directory(
    engine: Engine,
    root: Path,
    model_id: int,
    sender: Sender,
    *,
    batch_size: int = defaults.BATCH_SIZE,
    batch_bytes: int = defaults.BATCH_BYTES,
    send_mode: str = defaults.SEND,
    priority: str = defaults.PRIORITY,
    on_run: Callable[[int], None] | None = None,
    on_batch: OnBatch | None = None,
) -> Submission:
    """Create a run of ``priority`` for every image below ``root`` and send it in batches.

    Raises :class:`DirectoryError` (and creates no run) when ``root`` is missing or holds no
    image.
    """
    root = check_directory(root)
    walk = DirectoryWalk(root)
    stream = _stream(walk, send_mode, batch_size, batch_bytes)
    first = next(stream, None)
    if first is None:
        suffixes = ", ".join(sorted(defaults.IMAGE_SUFFIXES))
        raise DirectoryError(f"no images in {str(root)!r} (looked for files ending {suffixes})")
    try:
        with engine.begin() as conn:
            run_id, token = queries.create_run(
                conn, model_id, str(root), sender.backend, send_mode,
                lease=(this_process(), defaults.LEASE_SECONDS), priority=priority,
            )
    except SQLAlchemyError as e:
        raise DatabaseUnavailable(
            f"cannot create a run: {failure_cause(engine, e)}; nothing was submitted"
        ) from e
    with holding(engine, run_id, taken=True) as lease, kept_for_resume(engine, run_id, "submit"):
        if on_run is not None:
            on_run(run_id)
        n_batches = _send_all(
            engine, (run_id, token, priority), chain([first], stream), 0, sender, send_mode,
            on_batch, lease,
        )
        return _finish(engine, run_id, walk.n_skipped, n_batches)


def failure_cause(engine: Engine, e: BaseException) -> str:
    """What failed, in its own words: the database or broker named (password masked) and the
    first line of the driver's message."""
    if isinstance(e, DigitscoreError):  # the sender's BrokerUnavailable already says it all
        return str(e).rstrip(".")
    if isinstance(e, DBAPIError):
        kind = type(e.orig).__name__ if e.orig is not None else type(e).__name__
        reason = driver_reason(e).rstrip(".")
        return f"the database {mask_url(engine.url)} failed ({kind}): {reason}"
    reason = f"{type(e).__name__}: {first_line(e).rstrip('.')}"
    if isinstance(e, SQLAlchemyError):
        return f"the database {mask_url(engine.url)} failed: {reason}"
    if isinstance(e, OSError):  # the file system (reading the directory, a full disk)
        return reason
    return f"{reason} (run again with --debug for the traceback)"


@contextmanager
def kept_for_resume(engine: Engine, run_id: int, command: str) -> Iterator[None]:
    """Turn any failure of a run's submission into one :class:`SubmitInterrupted` naming its
    cause and ``producer resume RUN``. Bad input (the source directory gone) is left as it is:
    resuming cannot mend it; so is a cancel."""
    try:
        yield
    except (BadInput, RunCancelled):
        raise
    except Exception as e:
        raise SubmitInterrupted(
            f"run {run_id} stopped part way through {command}: {failure_cause(engine, e)}; "
            f"the run is kept: once that is fixed, run `producer resume {run_id}`"
        ) from e


def _stream(
    walk: DirectoryWalk,
    send_mode: str,
    batch_size: int,
    batch_bytes: int,
    sent: set[str] | None = None,
) -> Iterator[FileBatch]:
    """The walk's loose files in batches, then the archives it met, each in batches of its
    own (``sent``: paths already recorded, left out)."""
    files: Iterable[tuple[str, str]] = walk if sent is None else _unsent(walk, sent)
    if send_mode == "paths":
        loose = path_batches(files, batch_size)
    else:
        loose = batches(files, batch_size, batch_bytes)
    return chain(loose, archive_batches(walk, send_mode, batch_size, batch_bytes, sent))


def _send_all(
    engine: Engine,
    run: tuple[int, str, str],
    stream: Iterable[FileBatch],
    first_seq: int,
    sender: Sender,
    send_mode: str,
    on_batch: OnBatch | None,
    lease: Lease,
) -> int:
    """Record and send each batch of ``stream`` of ``run`` (its id, token and priority),
    numbered from ``first_seq``; how many."""
    run_id, token, priority = run
    seq, n_batches = first_seq, 0
    sender.while_waiting = lease.check
    for batch in stream:
        lease.check()
        seq = record_next(engine, run_id, seq, batch)
        sender.send(BatchMessage(run_id, seq, token), None if send_mode == "paths" else batch,
                    priority)
        if on_batch is not None:
            on_batch(len(batch.paths))
        seq, n_batches = seq + 1, n_batches + 1
    return n_batches


def record_next(engine: Engine, run_id: int, seq: int, batch: FileBatch) -> int:
    """Record ``batch`` as number ``seq`` of the run, or as the next free number where a
    worker's split of a batch (db/splits.py) has taken ``seq`` meanwhile; returns the number."""
    while True:
        try:
            with engine.begin() as conn:
                batch_life.record_batch(
                    conn, run_id, seq, batch.paths, batch.n_bytes, batch.members
                )
            return seq
        except IntegrityError:
            with engine.connect() as conn:
                free = queries.next_batch_seq(conn, run_id)
            if free <= seq:  # not a number taken: some other constraint
                raise
            seq = free


def _finish(engine: Engine, run_id: int, n_skipped: int, n_batches: int) -> Submission:
    with engine.connect() as conn:
        n_images = queries.images_sent(conn, run_id)
    status = queries.finish_submission(engine, run_id, n_images, n_skipped)
    return Submission(run_id, n_images, n_skipped, n_batches, status)


def _unsent(walk: Iterable[tuple[str, str]], sent: set[str]) -> Iterator[tuple[str, str]]:
    return ((path, rel) for path, rel in walk if rel not in sent)


def resume_run(
    engine: Engine,
    run_id: int,
    sender: Sender,
    *,
    batch_size: int = defaults.BATCH_SIZE,
    batch_bytes: int = defaults.BATCH_BYTES,
    send_mode: str | None = None,
    on_batch: OnBatch | None = None,
    retry_failed: Callable[[int], None] | None = None,
) -> tuple[int, Submission]:
    """Re-send every batch of a run that has no results yet, re-reading its files from the
    run's source directory; if the producer died mid-walk, walk again and send the rest.
    ``send_mode`` other than the run's own switches the run to it first (``None``: keep it).
    ``retry_failed`` given, the run's failed batches are made queued again first, once this
    process holds the run's lease, and it is told how many. Returns the number of batches
    re-sent and the submission as it now stands.

    A run that is done is left as it is (0 batches); a run another live process sends is
    refused with :class:`RunBeingSent`, and left as it is too, failed batches included; a
    cancelled run with :class:`RunCancelled`."""
    with engine.connect() as conn:
        run = queries.get_run(conn, run_id)
    if run["status"] == "cancelled":
        raise not_resumed(run)
    done = Submission(run_id, run["n_images"] or 0, run["n_skipped"],
                      _batch_count(engine, run_id), "done")
    if run["status"] == "done" and retry_failed is None:
        return 0, done
    with holding(engine, run_id) as lease, kept_for_resume(engine, run_id, "resume"):
        if retry_failed is not None:
            requeued = queries.requeue_failed_batches(engine, run_id)
            retry_failed(requeued)
            if not requeued and run["status"] == "done":
                return 0, done
        return _resume(engine, run_id, sender, batch_size, batch_bytes, send_mode, on_batch,
                       lease)


def not_resumed(run: dict[str, Any]) -> RunCancelled:
    """Why a cancelled run is not resumed, and how to score its directory again."""
    return RunCancelled(
        f"run {run['id']} was cancelled: it is not sent again; to score its directory, "
        f"submit it as a new run: `producer submit {run['source_dir']}`"
    )


def _batch_count(engine: Engine, run_id: int) -> int:
    with engine.connect() as conn:
        return queries.next_batch_seq(conn, run_id)


def _resume(
    engine: Engine,
    run_id: int,
    sender: Sender,
    batch_size: int,
    batch_bytes: int,
    send_mode: str | None,
    on_batch: OnBatch | None,
    lease: Lease,
) -> tuple[int, Submission]:
    with read_then_write(engine) as conn:
        run = queries.get_run(conn, run_id)
        if send_mode is not None and send_mode != run["send_mode"]:
            queries.set_send_mode(conn, run_id, send_mode)
        mode = send_mode or run["send_mode"]
        pending = queries.unfinished_batches(conn, run_id)
    root = Path(run["source_dir"])
    walked = run["submitted_at"] is not None
    # a --send paths run whose walk is complete needs no file here: its workers read them
    if ((mode == "bytes" and pending) or not walked) and not root.is_dir():
        raise DirectoryError(
            f"run {run_id}'s source directory {str(root)!r} is gone: its files cannot be re-read"
        )
    sender.while_waiting = lease.check
    for seq, paths, members in pending:
        lease.check()
        batch = None
        if mode == "bytes":
            batch = (read_batch(str(root), paths) if members is None
                     else read_recorded(str(root), paths, members))
        with engine.begin() as conn:
            mark_sent(conn, run_id, seq)
        sender.send(BatchMessage(run_id, seq, run["token"]), batch, run["priority"])
        if on_batch is not None:
            on_batch(len(paths))
    n_skipped = run["n_skipped"]
    if not walked:
        with engine.connect() as conn:
            sent = set(queries.batch_paths(conn, run_id))
            first_seq = queries.next_batch_seq(conn, run_id)
        walk = DirectoryWalk(root)
        stream = _stream(walk, mode, batch_size, batch_bytes, sent)
        _send_all(engine, (run_id, run["token"], run["priority"]), stream, first_seq, sender,
                  mode, on_batch, lease)
        n_skipped = walk.n_skipped
    with engine.connect() as conn:
        n_batches = queries.next_batch_seq(conn, run_id)
    return len(pending), _finish(engine, run_id, n_skipped, n_batches)
