"""The Celery task: a thin wrapper over :func:`worker.batch.process_batch`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from celery.signals import worker_init, worker_process_init
from sqlalchemy.exc import OperationalError

from db.queries import batch_finished, count_redelivery, recorded_paths
from db.session import dispose_engines, get_engine
from worker import defaults, payloads
from worker.app import STORED_TASK_NAME, TASK_NAME, make_app
from worker.batch import abandon_batch, process_batch
from worker.classifier import Classifier
from worker.devices import current_device, describe_current_device
from worker.model_store import load_classifier

log = logging.getLogger("digitscore.worker")
app = make_app()


def database_url() -> str:
    return defaults.setting(defaults.DATABASE_URL_ENV, defaults.DATABASE_URL) or ""


@lru_cache(maxsize=8)
def cached_classifier(url: str, model_id: int, device: str) -> Classifier:
    """Each process loads a model once, on first use, and keeps it by id."""
    with get_engine(url).connect() as conn:
        clf = load_classifier(conn, model_id)
    log.info("loaded model %s onto %s", model_id, device)
    return clf.to(device)


@worker_process_init.connect
def _on_process_start(**_kwargs) -> None:
    # Connections must not cross a fork; CUDA is first touched here, in the pool process.
    dispose_engines()
    broker_connection.cache_clear()
    if current_device() == "cpu":
        torch.set_num_threads(1)
    log.info("worker process %s scores on %s", os.getpid(), describe_current_device())


@worker_init.connect
def _no_cuda_before_fork(**_kwargs) -> None:
    """The Celery main process forks the pool: CUDA must not be initialised in it."""
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in the Celery main process before the fork")


Loaded = tuple[list[str], list[bytes | None], list[str | None]]


def run_batch(
    task: Any, run_id: int, seq: int, model_id: int, load: Callable[[], Loaded]
) -> int:
    """What both tasks do; ``load`` gives the batch's paths, image bytes and read errors."""
    url = database_url()
    engine = get_engine(url)
    device = current_device()
    clf = cached_classifier(url, model_id, device)
    # A message the broker hands out again (its worker died holding it, or held it past the
    # visibility timeout) is flagged redelivered: count it before any work, so that a batch
    # that kills every worker is known. A retry after a database error is a new message with
    # request.retries one higher, not a redelivery. A first delivery, by far the common case,
    # is counted in the transaction that stores its rows: no extra write per batch.
    retries = task.request.retries
    if (task.request.delivery_info or {}).get("redelivered"):
        crashes = count_redelivery(engine, run_id, seq, retries) - 1 - retries
        if crashes >= defaults.MAX_DELIVERIES:
            log.error("run %s batch %s killed %s workers: marking it failed", run_id, seq, crashes)
            # its paths as the producer recorded them, whether or not its payload is there
            paths = recorded_paths(engine, run_id, seq)
            return abandon_batch(engine, clf, run_id, seq, paths, crashes)
        deliveries = 0
    else:
        deliveries = 1 + retries
    paths, blobs, errors = load()
    return process_batch(
        engine, clf, run_id, seq, paths, blobs, errors, torch.device(device), deliveries
    )


RETRY_ON_DATABASE_ERRORS: dict[str, Any] = {
    "autoretry_for": (OperationalError,),  # the database is away: back off and try again
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "max_retries": None,
}


@app.task(bind=True, name=TASK_NAME, **RETRY_ON_DATABASE_ERRORS)
def score_batch_task(
    self,
    run_id: int,
    seq: int,
    model_id: int,
    paths: list[str],
    blobs: list[bytes | None],
    errors: list[str | None],
) -> int:
    """A batch with its paths and image bytes inside the message."""
    return run_batch(self, run_id, seq, model_id, lambda: (paths, blobs, errors))


@lru_cache(maxsize=1)
def broker_connection() -> Any:
    """This process's own connection to the broker, opened on first use (after the fork)."""
    return app.connection_for_read()


def payload_store() -> Any:
    """The Redis client for payloads, through the broker's own connection and settings."""
    client = payloads.redis_client(broker_connection())
    if client is None:
        raise RuntimeError(f"{STORED_TASK_NAME} needs a Redis broker")
    return client


@app.task(bind=True, name=STORED_TASK_NAME, **RETRY_ON_DATABASE_ERRORS)
def score_stored_batch_task(
    self, run_id: int, seq: int, model_id: int, images: int | list[str], key: str
) -> int:
    """A batch of ``images`` images whose paths and bytes wait in Redis under ``key``
    (worker/payloads.py); the key is deleted once the batch's rows are committed. (From an
    earlier producer, ``images`` is the list of paths, and the payload holds only the bytes.)"""
    store = payload_store()
    sent_paths = images if isinstance(images, list) else None
    n_images = len(images) if isinstance(images, list) else int(images)

    def load() -> Loaded:
        data = store.get(key)
        if data is None:
            raise payloads.PayloadError(
                f"run {run_id} batch {seq}: its image bytes are gone from Redis (a restart "
                f"without persistence, or queued longer than {defaults.PAYLOAD_TTL_ENV}); "
                f"the batch stays unfinished: run `producer resume {run_id}`"
            )
        paths, blobs, errors = payloads.unpack(data, n_images)
        if paths is None:
            if sent_paths is None:
                raise payloads.PayloadError(f"run {run_id} batch {seq}: no paths in payload")
            paths = sent_paths
        return paths, blobs, errors

    try:
        n_new = run_batch(self, run_id, seq, model_id, load)
    except payloads.PayloadError:
        if batch_finished(get_engine(database_url()), run_id, seq):
            n_new = 0  # stored by an earlier delivery, which deleted the payload
        else:
            raise
    store.delete(key)
    return n_new
