"""Sending batches to the Celery workers through the broker."""

from __future__ import annotations

from typing import Any

from kombu.utils.url import maybe_sanitize_url

from producer.files import Batch
from worker import defaults, payloads
from worker.app import STORED_TASK_NAME, TASK_NAME, make_app


class BrokerUnreachable(ConnectionError):
    pass


def masked(url: str) -> str:
    return maybe_sanitize_url(url, mask="***")


class CelerySender:
    """Enqueues each batch for the ``worker`` processes. On a Redis broker the image bytes go
    and paths go to a payload key and the message carries the batch's size and that key
    (worker/payloads.py); on any other broker, paths and bytes go inside the message."""

    backend = "celery"

    def __init__(self, broker_url: str) -> None:
        self.url = broker_url
        self.app = make_app(broker_url)
        self.queue = defaults.queue()
        self.ttl = defaults.payload_ttl()
        self._connection: Any = None
        self._redis: Any = None

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

    def _payload_store(self) -> Any | None:
        if self._connection is None:
            self._connection = self.app.connection_for_write()
            self._redis = payloads.redis_client(self._connection)
        return self._redis

    def send(self, run_id: int, seq: int, model_id: int, batch: Batch) -> None:
        store = self._payload_store()
        if store is None:
            self.app.send_task(
                TASK_NAME,
                args=[run_id, seq, model_id, batch.paths, batch.blobs, batch.errors],
                queue=self.queue,
                serializer="msgpack",
            )
            return
        key = payloads.new_key(self.queue, run_id, seq)
        store.set(key, payloads.pack(batch.paths, batch.blobs, batch.errors), ex=self.ttl)
        self.app.send_task(
            STORED_TASK_NAME,
            args=[run_id, seq, model_id, len(batch.paths), key],
            queue=self.queue,
            serializer="msgpack",
        )
