"""Sending batches to the Celery workers through the broker."""

from __future__ import annotations

from typing import Any

from kombu.utils.url import maybe_sanitize_url

from producer.files import Batch
from worker import defaults
from worker.app import TASK_NAME, make_app


class BrokerUnreachable(ConnectionError):
    pass


def masked(url: str) -> str:
    return maybe_sanitize_url(url, mask="***")


class CelerySender:
    """Enqueues each batch, image bytes inline, for the ``worker`` processes."""

    backend = "celery"

    def __init__(self, broker_url: str) -> None:
        self.url = broker_url
        self.app = make_app(broker_url)
        self._producer: Any = None

    def check(self, timeout: float = defaults.BROKER_CONNECT_TIMEOUT) -> None:
        """Fail fast, naming the broker (password masked), when it cannot be reached."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=timeout)
        except Exception as e:
            raise BrokerUnreachable(
                f"cannot reach the broker {masked(self.url)} ({type(e).__name__}): start it, "
                f"or unset {defaults.BROKER_URL_ENV} to score in this process"
            ) from None

    def send(self, run_id: int, seq: int, model_id: int, batch: Batch) -> None:
        self.app.send_task(
            TASK_NAME,
            args=[run_id, seq, model_id, batch.paths, batch.blobs, batch.errors],
            queue=defaults.queue(),
            serializer="msgpack",
        )
