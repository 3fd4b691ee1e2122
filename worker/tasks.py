"""The Celery task: a thin wrapper over :func:`handle_batch`, which believes the database and
nothing else a message says.

A message names a run, a batch and the run's token (core/wire.py). The worker scores the
batch only when its own database holds that run with that token and the batch is recorded
and unfinished; the paths and the model come from the database, the payload key from the
token and the batch number. In a ``--send paths`` run there is no payload: the worker reads
the recorded paths from the run's source directory itself, with the producer's rules
(core/files.py), and never opens anything whose resolved location is outside it.
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

import torch
from celery.exceptions import InvalidTaskError, Reject
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from celery.worker.strategy import default as default_strategy
from sqlalchemy.exc import OperationalError

from core import defaults, wire
from core.batch import poison_rows, score_images
from core.classifier import Classifier
from core.errors import MessageError
from core.files import map_prefix, read_batch_below
from core.text import mask_url
from db.model_store import load_classifier
from db.queries import (
    RecordedBatch,
    RunMismatch,
    count_redelivery,
    recorded_batch,
    store_batch_results,
)
from db.session import dispose_engines, get_engine
from db.workers import count_batch, heartbeat, register_worker, stop_worker
from worker import device_health
from worker.devices import DEVICE_FAILED_EXIT, current_device, describe_current_device

T = TypeVar("T")
log = logging.getLogger("digitscore.worker")
app = wire.make_app()


def database_url() -> str:
    return defaults.setting(defaults.DATABASE_URL_ENV, defaults.DATABASE_URL) or ""


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
    # Connections must not cross a fork; CUDA is first touched here, in the pool process.
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


def requeue_on_error(work: Callable[[], T]) -> T:
    """``work()`` (loading the model onto the device, or scoring): on an error the batch goes
    back to the queue instead of being acknowledged, and on a device error this worker stops,
    for its supervisor to start it again. A batch that fails on every delivery gets error rows
    after ``MAX_DELIVERIES`` (each requeue counts as a redelivery). A database error is left to
    the task's retries."""
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
                    describe_current_device(), defaults.queue())

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


def checked_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's own strategy behind a check of each message's shape (core/wire.py): what
    does not fit raises ``InvalidTaskError``, which Celery logs and acknowledges, and the
    worker goes on with the next message instead of dying inside Celery's request parser."""
    handle = default_strategy(task, app, consumer, **kwargs)

    def task_message_handler(message: Any, body: Any, *args: Any, **kw: Any) -> Any:
        try:
            wire.check_headers(message.headers)
            wire.check_message(
                message.headers.get("task", ""), message.decode(), len(message.body or b"")
            )
        except MessageError as e:
            raise InvalidTaskError(
                f"message {str(message.headers.get('id'))[:64]!r} dropped: {e}"
            ) from None
        return handle(message, body, *args, **kw)

    return task_message_handler


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
    mapped = map_prefix(batch.source_dir, defaults.path_map())
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
    try:
        batch = recorded_batch(engine, message.run_id, message.seq, message.token)
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
    device = current_device()
    clf = requeue_on_error(lambda: cached_classifier(url, batch.model_id, device))
    # A message the broker hands out again (its worker died holding it, or held it past the
    # visibility timeout) is flagged redelivered: count it before any work, so that a batch
    # that kills every worker is known. A retry after a database error is a new message with
    # request.retries one higher, not a redelivery. A first delivery, by far the common case,
    # is counted in the transaction that stores its rows: no extra write per batch.
    retries = task.request.retries
    if (task.request.delivery_info or {}).get("redelivered"):
        crashes = count_redelivery(engine, batch.run_id, batch.seq, retries) - 1 - retries
        if crashes >= defaults.MAX_DELIVERIES:
            log.error(
                "run %s batch %s killed %s workers: marking it failed",
                batch.run_id, batch.seq, crashes,
            )
            rows = poison_rows(batch.paths, clf.classes, crashes)
            n_new = store_batch_results(engine, batch.run_id, batch.seq, rows, "failed")
            store.delete(key)
            return n_new
        deliveries = 0
    else:
        deliveries = 1 + retries
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
        blobs, errors = wire.unpack_payload(data, len(batch.paths))
    rows = requeue_on_error(
        lambda: score_images(clf, batch.paths, blobs, errors, torch.device(device))
    )
    n_new = store_batch_results(engine, batch.run_id, batch.seq, rows, deliveries=deliveries)
    store.delete(key)
    node = getattr(task.request, "hostname", None)
    if node:
        count_batch(engine, node, len(rows))
    return n_new


@app.task(
    bind=True,
    name=wire.TASK_NAME,
    Strategy="worker.tasks:checked_strategy",
    autoretry_for=(OperationalError,),  # the database is away: back off and try again
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=None,
)
def score_batch_task(self, run_id: int, seq: int, token: str) -> int:
    """Score batch ``seq`` of run ``run_id`` (see :func:`handle_batch`)."""
    return handle_batch(self, wire.BatchMessage.from_args([run_id, seq, token]))
