"""Sending batches to the Celery workers: each batch's bytes to its payload key in Redis, then
its message (core/wire.py)."""

from __future__ import annotations

from typing import Any

from core import defaults, wire
from core.errors import BrokerUnavailable, BrokerURLError
from core.files import FileBatch
from core.text import mask_url


class CelerySender:
    """Enqueues each batch for the ``worker`` processes."""

    backend = "celery"

    def __init__(self, broker_url: str) -> None:
        self.url = broker_url
        self.app = wire.make_app(broker_url)
        self.queue = defaults.queue()
        self.ttl = defaults.payload_ttl()
        self.secret = defaults.secret()
        self._connection: Any = None
        self._redis: Any = None

    def check(self, timeout: float = defaults.BROKER_CONNECT_TIMEOUT) -> None:
        """Fail fast, naming the broker (password masked), when it cannot be reached."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=timeout)
        except ValueError:  # kombu could not parse it; its message may quote the password
            raise BrokerURLError(
                f"the broker URL {mask_url(self.url)} cannot be parsed: percent-escape "
                "reserved characters in its password (# as %23, / as %2F, @ as %40)"
            ) from None
        except Exception as e:
            raise BrokerUnavailable(
                f"cannot reach the broker {mask_url(self.url)} ({type(e).__name__}): start it, "
                f"or unset {defaults.BROKER_URL_ENV} to score in this process"
            ) from None
        self._payload_store()

    def _payload_store(self) -> Any:
        if self._connection is None:
            self._connection = self.app.connection_for_write()
            self._redis = wire.require_redis(self._connection, mask_url(self.url))
        return self._redis

    def send(self, message: wire.BatchMessage, batch: FileBatch) -> None:
        key = wire.payload_key(message)
        payload = wire.pack_payload(batch.blobs, batch.errors)
        self._payload_store().set(key, payload, ex=self.ttl)
        headers = wire.signature_headers(self.secret, message, payload) if self.secret else None
        self.app.send_task(
            wire.TASK_NAME, args=message.args(), queue=self.queue, serializer="msgpack",
            headers=headers,
        )
