"""The Celery task: a thin wrapper over :func:`handle_batch`, which believes the database and
nothing else a message says.

A message names a run, a batch and the run's token (core/wire.py). The worker scores the
batch only when its own database holds that run with that token and the batch is recorded
and unfinished; the paths and the model come from the database, the payload key from the
token and the batch number. In a ``--send paths`` run there is no payload: the worker reads
the recorded paths from the run's source directory itself, with the producer's rules
(core/files.py), and never opens anything whose resolved location is outside it.

Three pieces of Celery and kombu are replaced, all in the worker's main process: the Redis
transport drops queue entries that are not kombu messages (worker/transport.py), the
consumer checks every delivery before Celery reads it (:class:`CheckedConsumer`), and the
request counts a pool process's death against the batch it held
(:class:`DeathCountingRequest`).
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
from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.exceptions import Reject
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from sqlalchemy.exc import OperationalError
from vine import promise

from core import defaults, wire
from core.batch import poison_rows, score_images
from core.classifier import Classifier
from core.errors import MessageError
from core.files import map_prefix, read_batch_below
from core.settings import Settings
from core.text import mask_url, mask_urls_in
from db.model_store import load_classifier
from db.queries import (
    RecordedBatch,
    RunMismatch,
    count_worker_death,
    recorded_batch,
    store_batch_results,
)
from db.session import dispose_engines, get_engine
from db.workers import count_batch, heartbeat, register_worker, stop_worker
from worker import device_health
from worker.devices import DEVICE_FAILED_EXIT, current_device, describe_current_device

T = TypeVar("T")
log = logging.getLogger("digitscore.worker")
#: This worker's settings, read once from the environment its launcher checked them in.
SETTINGS = Settings.from_env()
app = wire.make_app(SETTINGS)
app.conf.worker_consumer = "worker.tasks:CheckedConsumer"
#: Set: every message must be signed with it (core/wire.py).
SECRET = SETTINGS.secret
if urlsplit(str(app.conf.broker_url)).scheme == "redis":
    app.conf.broker_transport = "worker.transport:CheckedTransport"


def database_url() -> str:
    return SETTINGS.database_url


@lru_cache(maxsize=8)
def cached_classifier(url: str, model_id: int, device: str) -> Classifier:
    """Each process loads a model once, on first use, and keeps it by id."""
    with get_engine(url).connect() as conn:
        clf = load_classifier(conn, model_id)
    log.info("loaded model %s onto %s", model_id, device)
    return clf.to(device)


#: Set in a pool process once its device has failed: it scores nothing more.
_device_failed = False


@worker_process_init.connect
def _on_process_start(**_kwargs) -> None:
    # Connections must not cross a fork (the main process's, which counts worker deaths, stay
    # open for it); CUDA is first touched here, in the pool process.
    dispose_engines(close=False)
    broker_connection.cache_clear()
    device = current_device()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        device_health.prepare_device(device)
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


@worker_init.connect
def _no_cuda_before_fork(**_kwargs) -> None:
    """The Celery main process forks the pool: CUDA must not be initialised in it. It also
    learns to stop when a pool process reports its device failed."""
    device_health.check_main_process()
    device_health.install_stop_handler()


def requeue_on_error(work: Callable[[], T], engine: Any, message: wire.BatchMessage) -> T:
    """``work()`` (loading the model onto the device, or scoring): on an error the batch goes
    back to the queue instead of being acknowledged, and on a device error this worker stops,
    for its supervisor to start it again. An error that is not the device's counts as a failed
    delivery of the batch (a broken device is not the batch's fault), so a batch that fails on
    every delivery gets error rows after ``MAX_DELIVERIES``. A database error is left to the
    task's retries."""
    global _device_failed
    if _device_failed:
        raise Reject("this process's device failed: the batch goes back", requeue=True)
    try:
        return work()
    except OperationalError:
        raise
    except Exception as e:
        if device_health.is_device_error(e):
            _device_failed = True
            log.critical(
                "device error on %s: %s. The batch goes back to the queue; stopping this "
                "worker (status %s)", describe_current_device(), e, DEVICE_FAILED_EXIT,
            )
            device_health.stop_this_worker()
        else:
            log.exception("scoring failed: the batch goes back to the queue")
            count_worker_death(engine, message.run_id, message.seq, message.token)
        raise Reject(f"scoring failed: {e!r}", requeue=True) from e


#: The node name this main process registered under.
_registered: list[str] = []


@worker_ready.connect
def _register(sender: Any = None, **_kwargs) -> None:
    """Enter this worker in its database's registry and keep it seen there, from the main
    process, so that a producer can tell which workers write where (``producer workers``)."""
    name = str(sender.hostname)
    _registered.append(name)
    engine = get_engine(database_url())
    register_worker(engine, name, socket.gethostname(), os.getpid(),
                    describe_current_device(), SETTINGS.queue)

    def beat() -> None:
        while True:
            time.sleep(defaults.HEARTBEAT_SECONDS)
            try:
                heartbeat(engine, name)
            except Exception as e:  # the database is away: the next beat tries again
                log.warning("heartbeat failed: %s", type(e).__name__)

    threading.Thread(target=beat, name="digitscore-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _unregister(**_kwargs) -> None:
    try:
        for name in _registered:
            stop_worker(get_engine(database_url()), name)
    except Exception as e:
        log.warning("could not mark this worker stopped: %s", type(e).__name__)


def message_id(message: Any) -> str:
    """A delivery's id for the log: its ``id`` header when that is text, else its tag."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    value = headers.get("id")
    if not isinstance(value, str):
        value = (message.delivery_info or {}).get("delivery_tag") or message.delivery_tag
    return repr(str(value)[:64])


class CheckedConsumer(Consumer):
    """Celery's consumer with every delivery checked (core/wire.check_delivery) before Celery
    reads any of it: a message that is not this worker's one task in its one shape is
    logged with its id and why, acknowledged (dropped: there is no dead-letter queue) and
    the worker goes on with the next one. Unchecked, a body Celery cannot unpack, or an
    unknown task without an ``id`` header, raises inside Celery's consumer and stops the
    worker, and the message, restored, stops the next one."""

    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            try:
                wire.check_delivery(
                    message.headers, len(message.body or b""), message.decode, SECRET
                )
            except Exception as e:  # noqa: BLE001 - nothing in a message may stop the worker
                why = e if isinstance(e, MessageError) else f"cannot be checked: {e!r:.200}"
                log.error("message %s dropped: %s", message_id(message), why)
                message.reject_log_error(log, self.connection_errors)  # no requeue: gone
                return None
            return handle(message)

        return on_task_received


def died_holding(request: Any, exc: BaseException) -> bool:
    """Whether a failure Celery reports means the pool process running the task died of it:
    not when the worker is being stopped coldly (Celery ends its own pool processes then)."""
    if worker_state.should_terminate:
        return False
    if isinstance(exc, ExceptionWithTraceback):  # a child's exception, as billiard sends it
        exc = exc.exc
    if isinstance(exc, WorkerLostError):
        return True
    # billiard >= 4.3 reports a child's exit as SystemExit; Celery takes it for a lost worker
    # unless it killed the child itself (a revoke or a cancel)
    return isinstance(exc, (SystemExit, KeyboardInterrupt)) and not (
        request._already_cancelled or request._already_revoked
    )


def record_death(args: Any) -> None:
    """Count a pool process's death against the batch it held, in the database, before the
    batch goes back to the queue; a failure to count only means one death goes uncounted."""
    try:
        message = wire.BatchMessage.from_args(args)
        deaths = count_worker_death(
            get_engine(database_url()), message.run_id, message.seq, message.token
        )
    except Exception as e:  # noqa: BLE001 - the requeue below must happen whatever this does
        log.error("a worker process died; its death could not be counted: %s",
                  mask_urls_in(str(e)))
        return
    if deaths is not None:
        log.warning(
            "a worker process died holding run %s batch %s (%s deaths on it so far)",
            message.run_id, message.seq, deaths,
        )


class DeathCountingRequest(Request):
    """Celery's request, in the worker's main process: when the pool process running a batch
    dies, the batch's delivery count goes up by one (db/queries.count_worker_death) before
    Celery requeues the message. A message cannot forge that (a redelivered flag can be)."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False):
        if died_holding(self, exc_info.exception):
            record_death(self.args)
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        # past the hard time limit Celery kills the process and requeues the batch: a death
        if not soft and not worker_state.should_terminate:
            record_death(self.args)
        super().on_timeout(soft, timeout)


@lru_cache(maxsize=1)
def broker_connection() -> Any:
    """This process's own connection to the broker, opened on first use (after the fork)."""
    return app.connection_for_read()


def payload_store() -> Any:
    """The Redis client for payloads, through the broker's own connection and settings."""
    return wire.require_redis(broker_connection(), mask_url(app.conf.broker_url))


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
    """Score and store the batch a message names, if the database says it is to be scored;
    returns the number of rows stored."""
    url = database_url()
    engine = get_engine(url)
    store = payload_store()
    key = wire.payload_key(message)
    limit = SETTINGS.max_batch_images
    try:
        batch = recorded_batch(engine, message.run_id, message.seq, message.token, limit)
    except RunMismatch as e:
        log.error(
            "%s: nothing written, its payload deleted. Is the producer on another database? "
            "This worker's database is %s", e, mask_url(url),
        )
        store.delete(key)
        return 0
    if batch.finished:  # stored by an earlier delivery, or given up on
        store.delete(key)
        return 0
    if batch.n_images > limit:
        log.error(
            "run %s batch %s holds %s images, more than %s=%s: dropped unscored, its payload "
            "deleted; the batch stays queued (raise the limit on every worker, then `producer "
            "resume %s`)", batch.run_id, batch.seq, batch.n_images,
            defaults.MAX_BATCH_IMAGES_ENV, limit, batch.run_id,
        )
        store.delete(key)
        return 0
    device = current_device()
    clf = requeue_on_error(
        lambda: cached_classifier(url, batch.model_id, device), engine, message
    )
    # Failed deliveries of this batch, counted where no message can forge them: worker
    # processes that died holding it (by the Celery main process, DeathCountingRequest) and
    # scoring errors that sent it back (requeue_on_error).
    if batch.deaths >= defaults.MAX_DELIVERIES:
        log.error(
            "run %s batch %s failed on %s deliveries: marking it failed",
            batch.run_id, batch.seq, batch.deaths,
        )
        rows = poison_rows(batch.paths, clf.classes, batch.deaths)
        n_new = store_batch_results(engine, batch.run_id, batch.seq, rows, "failed", 1)
        store.delete(key)
        return n_new
    if batch.send_mode == "paths":
        files = read_batch_below(source_root(batch), batch.paths)
        blobs, errors = files.blobs, files.errors
    else:
        data = store.get(key)
        if data is None:
            raise MessageError(
                f"run {batch.run_id} batch {batch.seq}: its image bytes are gone from Redis (a "
                f"restart without persistence, or queued longer than "
                f"{defaults.PAYLOAD_TTL_ENV}); the batch stays unfinished: run "
                f"`producer resume {batch.run_id}`"
            )
        if SECRET is not None:
            try:
                name = wire.PAYLOAD_DIGEST_HEADER  # a custom header: in the request's headers
                digest = getattr(task.request, name, None) or (
                    task.request.headers or {}).get(name)
                wire.check_payload_digest(digest, data)
            except MessageError as e:
                raise MessageError(f"run {batch.run_id} batch {batch.seq}: {e}") from None
        blobs, errors = wire.unpack_payload(data, len(batch.paths))
    rows = requeue_on_error(
        lambda: score_images(clf, batch.paths, blobs, errors, torch.device(device)),
        engine, message,
    )
    # this delivery, and one per earlier try that ended in a database error (a retry)
    deliveries = 1 + task.request.retries
    n_new = store_batch_results(engine, batch.run_id, batch.seq, rows, deliveries=deliveries)
    store.delete(key)
    node = getattr(task.request, "hostname", None)
    if node:
        count_batch(engine, node, len(rows))
    return n_new


@app.task(
    bind=True,
    name=wire.TASK_NAME,
    autoretry_for=(OperationalError,),  # the database is away: back off and try again
    Request="worker.tasks:DeathCountingRequest",
    retry_backoff=True,
    retry_backoff_max=SETTINGS.db_retry_max,  # below the visibility timeout
    max_retries=None,
)
def score_batch_task(self, run_id: int, seq: int, token: str) -> int:
    """Score batch ``seq`` of run ``run_id`` (see :func:`handle_batch`)."""
    return handle_batch(self, wire.BatchMessage.from_args([run_id, seq, token]))
