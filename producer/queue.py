"""Sending batches to the Celery workers: each batch's bytes to its payload key in Redis, then
its message (core/wire.py)."""

from __future__ import annotations

from typing import Any

from core import defaults, wire
from core.errors import BrokerUnavailable, BrokerURLError
from core.files import FileBatch
from core.text import first_line, mask_url


class CelerySender:
    """Enqueues each batch for the ``worker`` processes."""

    backend = "celery"

    def __init__(self, broker_url: str) -> None:
        self.url = broker_url
        self.app = wire.make_app(broker_url)
        self.queue = defaults.queue()
        self.ttl = defaults.payload_ttl()
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
        """Store the batch's bytes, then enqueue its message; raises :class:`BrokerUnavailable`
        with Redis's or kombu's own first line when the broker is gone or refuses a write
        (``OOM command not allowed`` under ``maxmemory``)."""
        from kombu.exceptions import KombuError
        from redis.exceptions import RedisError

        key = wire.payload_key(message)
        try:
            store = self._payload_store()
            store.set(key, wire.pack_payload(batch.blobs, batch.errors), ex=self.ttl)
            self.app.send_task(
                wire.TASK_NAME, args=message.args(), queue=self.queue, serializer="msgpack"
            )
        except (RedisError, KombuError, OSError) as e:
            raise BrokerUnavailable(
                f"the broker {mask_url(self.url)} failed ({type(e).__name__}): {first_line(e)}"
            ) from e


def consumers(broker_url: str, queue: str, timeout: float = defaults.INSPECT_TIMEOUT) -> list[str]:
    """The names of the workers that consume ``queue``, as they answer Celery's control API
    within ``timeout`` seconds."""
    app = wire.make_app(broker_url)
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    finally:
        app.close()
    return sorted(
        node for node, queues in replies.items() if any(q.get("name") == queue for q in queues)
    )


def why_idle(broker_url: str, engine: Any) -> str:
    """The likely reason no batch of a run is being stored, found by asking the broker which
    workers consume the queue and the run's database which workers write to it (its
    ``workers`` registry)."""
    from db.workers import live_workers

    queue, broker, database = defaults.queue(), mask_url(broker_url), mask_url(engine.url)
    try:
        nodes = consumers(broker_url, queue)
    except Exception as e:
        reason = first_line(e)
        return f"cannot ask the broker {broker} which workers consume queue {queue}: {reason}"
    if not nodes:
        return (
            f"no worker consumes queue {queue} on broker {broker}: start `worker` with "
            f"{defaults.BROKER_URL_ENV} set to that broker and {defaults.DATABASE_URL_ENV} to "
            f"{database}"
        )
    with engine.connect() as conn:
        writers = {w["name"] for w in live_workers(conn, 3 * defaults.HEARTBEAT_SECONDS)}
    elsewhere = [n for n in nodes if n not in writers]
    if elsewhere:
        return (
            f"worker(s) {', '.join(elsewhere)} consume queue {queue} on broker {broker} but "
            f"none of them writes to this database, {database}: set their "
            f"{defaults.DATABASE_URL_ENV} to it (or this producer's to theirs)"
        )
    return (
        f"{len(nodes)} worker(s) consume queue {queue} on broker {broker} and write to "
        f"{database} ({', '.join(nodes)}) but stored none of this run's batches: they may be "
        "busy with other runs"
    )
