"""The Celery task: a thin wrapper over :func:`handle_batch`, which believes the database and
nothing else a message says.

A message names a run, a batch and the run's token (core/wire.py). The worker scores the
batch only when its own database holds that run with that token and the batch is recorded
and unfinished; the paths and the model come from the database, the payload key from the
token and the batch number. In a ``--send paths`` run there is no payload: the worker reads
the recorded paths from the run's source directory itself, with the producer's rules
(core/files.py), and never opens anything whose resolved location is outside it.

What reaches the task has been checked once, in the worker's main process, by the intake
(worker/intake.py: the Redis transport, the consumer and the request Celery uses here).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import urlsplit

import torch
from celery.exceptions import Reject
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError

from core import defaults, wire
from core.archive_batches import read_recorded
from core.classifier import Classifier
from core.errors import DatabaseUnavailable, MessageError
from core.files import map_prefix, read_batch_below
from core.scoring import score_images
from core.settings import Settings
from core.text import first_line, mask_url, mask_urls_in
from db.batch_life import (
    Claim,
    RecordedBatch,
    claim_batch,
    count_failed_delivery,
    give_up,
    store_batch,
    was_cancelled,
)
from db.model_store import load_classifier
from db.session import dispose_engines, get_engine
from db.workers import count_batch, heartbeat, register_worker, stop_worker
from worker import device_health, metrics
from worker.batch_timing import seconds_per_image, time_limit_warning
from worker.devices import DEVICE_FAILED_EXIT, current_device, describe_current_device
from worker.splitting import split_and_resend

T = TypeVar("T")
log = logging.getLogger("digitscore.worker")
#: This worker's settings, read once from the environment its launcher checked them in.
SETTINGS = Settings.from_env()
#: The device this worker's processes score on, set by its launcher (worker/devices.py).
DEVICE = current_device()
app = wire.make_app(SETTINGS)
app.conf.worker_consumer = "worker.intake:CheckedConsumer"
#: Set: every message must be signed with it (core/wire.py).
SECRET = SETTINGS.secret
if urlsplit(str(app.conf.broker_url)).scheme == "redis":
    app.conf.broker_transport = "worker.intake:CheckedTransport"


@lru_cache(maxsize=8)
def cached_classifier(url: str, model_id: int, device: str) -> Classifier:
    """Each process loads a model once, on first use, and keeps it by id."""
    with get_engine(url).connect() as conn:
        clf = load_classifier(conn, model_id, device)
    log.info("loaded model %s onto %s", model_id, device)
    return clf


#: Set in a pool process once its device has failed: it scores nothing more.
_device_failed = False


@worker_process_init.connect
def _on_process_start(**_kwargs) -> None:
    # Connections must not cross a fork (the main process's, which counts worker deaths, stay
    # open for it); CUDA is first touched here, in the pool process.
    dispose_engines(close=False)
    payload_store.cache_clear()
    # one pool process a core: torch's own threads (decoding, the CPU side of a GPU batch)
    # would only contend with the other pool processes'
    torch.set_num_threads(1)
    try:
        device_health.prepare_device(DEVICE)
    except Exception as e:
        # Celery logs and ignores what a worker_process_init receiver raises. This process
        # stays up, taking no batch (each goes back to the queue), while the main process
        # stops the worker warmly with the device's status.
        global _device_failed
        _device_failed = True
        log.critical(
            "worker process %s cannot score on %s: %s. Stopping this worker (status %s)",
            os.getpid(), describe_current_device(), e, DEVICE_FAILED_EXIT,
        )
        device_health.stop_this_worker()
        return
    log.info("worker process %s scores on %s", os.getpid(), describe_current_device())
    warn_of_slow_batches(DEVICE)


def warn_of_slow_batches(device: str) -> None:
    """Warn when a batch of the default size would outlast the task time limit here."""
    try:
        per_image = seconds_per_image(lambda *a: score_images(*a), device)
    except Exception as e:  # noqa: BLE001 - a measurement must not stop the process
        log.warning("could not time a sample batch: %s", first_line(e))
        return
    warning = time_limit_warning(per_image, defaults.BATCH_SIZE, SETTINGS.task_time_limit,
                                 SETTINGS.visibility_timeout)
    if warning:
        log.warning("%s", warning)


@worker_init.connect
def _no_cuda_before_fork(**_kwargs) -> None:
    """The Celery main process forks the pool: CUDA must not be initialised in it. It also
    learns to stop when a pool process reports its device failed."""
    device_health.check_main_process()
    device_health.install_stop_handler()


def count_failure_on_error(
    work: Callable[[], T], engine: Any, message: wire.BatchMessage, what: str
) -> T:
    """``work()`` (loading the batch's model onto the device, or scoring it); on an error the
    batch goes back to the queue instead of being acknowledged. Every error counts as a failed
    delivery of the batch, ``what`` failed and why kept as its last failure, so a batch that
    fails on every delivery is given up after ``MAX_DELIVERIES``, even one that breaks each
    device it reaches; an error of the device also stops this worker, for its supervisor to
    start it again on a fresh CUDA context. Any other error holds the batch for
    :func:`failure_backoff` seconds first, so that an unloadable model or a batch that fails
    every time cannot flood the log: each pool process fails at most one batch a second, and
    logs each error's traceback once. A database error is left to the task's retries."""
    global _device_failed
    if _device_failed:
        raise Reject("this process's device failed: the batch goes back", requeue=True)
    try:
        return work()
    except (OperationalError, DatabaseUnavailable):
        raise
    except Exception as e:
        why = f"{what}: {type(e).__name__}: {mask_urls_in(str(e))[:300]}"
        failed = count_failed_delivery(engine, message.run_id, message.seq, message.token, why)
        if device_health.is_device_error(e):
            _device_failed = True
            log.critical(
                "device error on %s: %s. The batch goes back to the queue; stopping this "
                "worker (status %s)", describe_current_device(), e, DEVICE_FAILED_EXIT,
            )
            device_health.stop_this_worker()
        else:
            delay = failure_backoff(failed or 1, SETTINGS.task_time_limit)
            log.error(
                "run %s batch %s: %s; failed delivery %s of %s: the batch goes back to the "
                "queue in %s s", message.run_id, message.seq, why, failed, defaults.MAX_DELIVERIES,
                f"{delay:g}", exc_info=e if why not in _logged else None,
            )
            if len(_logged) > 1_000:  # errors that differ each time: keep the set small
                _logged.clear()
            _logged.add(why)
            time.sleep(delay)
            # Celery logs a rejection with its traceback: the cause's was logged above, once
            raise Reject(f"{what}: {e!r}", requeue=True) from None
        raise Reject(f"{what}: {e!r}", requeue=True) from e


#: The failures whose traceback this process has logged (each is logged once).
_logged: set[str] = set()


def failure_backoff(failed: int, time_limit: float) -> float:
    """Seconds to hold a batch after its ``failed``-th failed delivery before it goes back:
    ``FAILURE_BACKOFF`` doubled per earlier failure, at most a quarter of the time limit."""
    return min(defaults.FAILURE_BACKOFF * 2 ** (failed - 1), time_limit / 4)


#: The node name this main process registered under.
_registered: list[str] = []


@worker_ready.connect
def _register(sender: Any = None, **_kwargs) -> None:
    """Enter this worker in its database's registry and keep it seen there, from the main
    process, so that a producer can tell which workers write where (``producer workers``).
    A database that is away when the worker starts is tried again at each heartbeat."""
    name = str(sender.hostname)
    _registered.append(name)
    threading.Thread(
        target=keep_registered, args=(name,), name="digitscore-heartbeat", daemon=True
    ).start()


def keep_registered(name: str, beat: float = defaults.HEARTBEAT_SECONDS) -> None:
    """Register ``name``, then heartbeat every ``beat`` seconds; a failed registration is
    tried again at the next beat, a failed heartbeat too."""
    registered = False
    while True:
        try:
            engine = get_engine(SETTINGS.database_url)
            if registered:
                heartbeat(engine, name)
            else:
                register_worker(engine, name, socket.gethostname(), os.getpid(),
                                describe_current_device(), SETTINGS.queue,
                                wire.secret_fingerprint(SETTINGS.secret))
                registered = True
                log.info("registered as %s in %s", name, mask_url(SETTINGS.database_url))
        except Exception as e:  # the database is away: the next beat tries again
            what = "heartbeat" if registered else "registration"
            log.warning("%s failed (tried again in %s s): %s", what, beat, first_line(e))
        time.sleep(beat)


@worker_shutdown.connect
def _unregister(**_kwargs) -> None:
    try:
        for name in _registered:
            stop_worker(get_engine(SETTINGS.database_url), name)
    except Exception as e:
        log.warning("could not mark this worker stopped: %s", type(e).__name__)


@lru_cache(maxsize=1)
def payload_store() -> Any:
    """The Redis client for payloads, through this process's own connection to the broker
    (opened on first use, after the fork) and its settings."""
    return wire.require_redis(app.connection_for_read(), str(app.conf.broker_url))


def source_root(batch: RecordedBatch) -> str:
    """Where this host sees the run's source directory (``DIGITSCORE_PATH_MAP`` applied),
    resolved; :class:`MessageError` when it is not a directory here, which leaves the batch
    unfinished rather than failing each of its images."""
    mapped = map_prefix(batch.source_dir, SETTINGS.path_map)
    root = os.path.realpath(mapped)
    if not os.path.isdir(root):
        via = f" (mapped from {batch.source_dir!r})" if mapped != batch.source_dir else ""
        raise MessageError(
            f"run {batch.run_id} batch {batch.seq}: its source directory {mapped!r}{via} is "
            f"not a directory on this host: mount it there, or set "
            f"{defaults.PATH_MAP_ENV}=/producer/prefix=/worker/prefix; the batch stays "
            f"unfinished: run `producer resume {batch.run_id}`"
        )
    return root


def handle_batch(task: Any, message: wire.BatchMessage) -> int:
    """Claim the batch a message names (db/batch_life.py) and do what the claim says: skip
    it, give it up as poison, split it, or score and store it; then delete its payload.
    Returns the number of rows stored."""
    engine = get_engine(SETTINGS.database_url)
    claim = claim_batch(engine, message.run_id, message.seq, message.token,
                        SETTINGS.max_batch_images)
    if claim.action == "split":  # the time limit stopped an earlier delivery: score in halves
        assert claim.batch is not None
        split_and_resend(engine, payload_store(), app, SETTINGS, claim.batch, message,
                         payload_digest(task))
        n_new = 0
    elif claim.action == "score":
        assert claim.batch is not None
        n_new = score_and_store(task, engine, message, claim.batch)
    elif claim.action == "poison":
        n_new = give_up_on(engine, claim)
    elif claim.action == "cancelled":
        log_cancelled(message, "dropped unscored")
        n_new = 0
    else:
        log_skip(claim)
        n_new = 0
    payload_store().delete(wire.payload_key(message))
    return n_new


def log_skip(claim: Claim) -> None:
    if claim.batch is None:  # the database does not hold the batch as the message names it
        log.error(
            "%s: nothing written, its payload deleted. Is the producer on another database? "
            "This worker's database is %s: give this worker the producer's %s; the producer's "
            "--wait (or `producer heal`) sends the batch again", claim.why,
            mask_url(SETTINGS.database_url), defaults.DATABASE_URL_ENV,
        )
    elif claim.why:
        log.error(
            "%s: dropped unscored, its payload deleted; the batch stays queued (raise the limit "
            "on every worker, then `producer resume %s`)", claim.why, claim.batch.run_id,
        )


def log_cancelled(message: wire.BatchMessage, what: str) -> None:
    log.info("run %s batch %s: its run was cancelled: %s, its payload deleted",
             message.run_id, message.seq, what)


def give_up_on(engine: Any, claim: Claim) -> int:
    batch = claim.batch
    assert batch is not None
    log.error(
        "run %s batch %s failed on %s deliveries (last: %s): marking it failed",
        batch.run_id, batch.seq, batch.failed_deliveries, batch.last_failure,
    )
    n_new = give_up(engine, claim)
    metrics.count_poisoned(n_new)
    return n_new


def score_and_store(
    task: Any, engine: Any, message: wire.BatchMessage, batch: RecordedBatch
) -> int:
    """Load the batch's model, read its images, score them and store the rows; a failure to
    load or to score counts as a failed delivery (:func:`count_failure_on_error`)."""
    device = DEVICE
    clf = count_failure_on_error(
        lambda: cached_classifier(SETTINGS.database_url, batch.model_id, device),
        engine, message, f"model {batch.model_id} could not be loaded",
    )
    start = time.monotonic()  # the model is loaded once per process: not counted
    try:
        blobs, errors = read_images(task, message, batch)
    except MessageError:
        if was_cancelled(engine, batch.run_id, batch.seq):  # the cancel deleted its payload
            log_cancelled(message, "dropped unscored")
            return 0
        raise
    columns = count_failure_on_error(
        lambda: score_images(clf, batch.paths, blobs, errors, torch.device(device),
                             (batch.members or {}).get("labels")),  # an archive's .cls names
        engine, message, "scoring failed",
    )
    # this delivery, and one per earlier try that ended in a database error (a retry; the
    # header is bounded by core/wire.check_headers)
    deliveries = 1 + task.request.retries
    # an error the database keeps giving (not an outage) fails the batch at the delivery
    # limit instead of sending it round for ever
    n_new = count_failure_on_error(
        lambda: store_batch(engine, batch.run_id, batch.seq, columns, deliveries=deliveries),
        engine, message, "storing failed",
    )
    if not n_new and columns.paths and was_cancelled(engine, batch.run_id, batch.seq):
        # cancelled while it was scored: its claim was gone at the store, nothing written
        log_cancelled(message, f"{len(columns.paths)} scored rows dropped")
        return 0
    metrics.count_stored(columns, n_new, time.monotonic() - start)
    node = getattr(task.request, "hostname", None)
    if node:
        count_batch(engine, node, len(columns.paths))
    return n_new


def read_images(
    task: Any, message: wire.BatchMessage, batch: RecordedBatch
) -> tuple[list[bytes | None], list[str | None]]:
    """The batch's encoded images and read errors: from the run's source directory in a
    ``paths`` run, else from its payload in Redis, checked against its signed digest."""
    if batch.send_mode == "paths":
        root = source_root(batch)
        files = (read_batch_below(root, batch.paths) if batch.members is None
                 else read_recorded(root, batch.paths, batch.members))
        return files.blobs, files.errors
    data = payload_store().get(wire.payload_key(message))
    if data is None:
        raise MessageError(
            f"run {batch.run_id} batch {batch.seq}: its image bytes are gone from Redis (a "
            f"restart without persistence, or queued longer than "
            f"{defaults.PAYLOAD_TTL_ENV}); the batch stays unfinished: run "
            f"`producer resume {batch.run_id}`"
        )
    if SECRET is not None:
        try:
            wire.check_payload_digest(payload_digest(task), data)
        except MessageError as e:
            raise MessageError(f"run {batch.run_id} batch {batch.seq}: {e}") from None
    return wire.unpack_payload(data, len(batch.paths))


def payload_digest(task: Any) -> str | None:
    """The payload digest header of the message ``task`` runs (a custom header: in the
    request's headers)."""
    name = wire.PAYLOAD_DIGEST_HEADER
    digest = getattr(task.request, name, None) or (task.request.headers or {}).get(name)
    return digest if isinstance(digest, str) else None


@app.task(
    bind=True,
    name=wire.TASK_NAME,
    # the database is away (at connect time, or later): back off and try again
    autoretry_for=(OperationalError, DatabaseUnavailable),
    Request="worker.intake:DeathCountingRequest",
    retry_backoff=True,
    retry_backoff_max=SETTINGS.db_retry_max,  # below the visibility timeout
    max_retries=None,
)
def score_batch_task(self, run_id: int, seq: int, token: str) -> int:
    """Score batch ``seq`` of run ``run_id`` (see :func:`handle_batch`); the arguments are
    those ``worker/intake.CheckedConsumer`` checked, so they are not parsed again."""
    return handle_batch(self, wire.BatchMessage(run_id, seq, token))
