"""Sending batches to the Celery workers: each batch's bytes to its payload key in Redis, then
its message (core/wire.py); or, for a ``--send paths`` run, the message alone.

Flow control: the producer keeps at most :attr:`CelerySender.max_queued` bytes of its
payloads (and their messages) waiting in Redis. It remembers the batches it sent whose payload
may still be there; once the next batch would take it past the bound, it asks Redis which
of those payloads still exist (a worker deletes a batch's payload when its rows are stored)
and, while still over, waits for workers with a growing sleep. What it remembers is bounded
too, so its memory stays flat however long the run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from core import defaults, wire
from core.errors import BrokerUnavailable, BrokerURLError, RedisFull
from core.files import FileBatch
from core.settings import Settings
from core.text import agree, first_line, mask_url, plural

#: Called while waiting, with the bytes queued and the bound.
OnWait = Callable[[int, int], None]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether Redis refused a write because it reached its ``maxmemory``."""
    from redis.exceptions import OutOfMemoryError, ResponseError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OutOfMemoryError) or (
            isinstance(seen, ResponseError) and str(seen).startswith("OOM")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def default_bound(client: Any) -> int:
    """:data:`defaults.MAX_QUEUED_BYTES`, or half of Redis's ``maxmemory`` if that is less
    (when ``CONFIG GET`` is not allowed, the former)."""
    from redis.exceptions import ResponseError

    try:
        maxmemory = int(client.config_get("maxmemory").get("maxmemory") or 0)
    except (ResponseError, ValueError):
        return defaults.MAX_QUEUED_BYTES
    if maxmemory > 0:
        return min(defaults.MAX_QUEUED_BYTES, maxmemory // 2)
    return defaults.MAX_QUEUED_BYTES


class CelerySender:
    """Enqueues each batch for the ``worker`` processes."""

    backend = "celery"

    def __init__(self, settings: Settings, on_wait: OnWait | None = None) -> None:
        self.url = str(settings.broker_url)
        self.app = wire.make_app(settings)
        self.queue = settings.queue
        self.ttl = settings.payload_ttl
        self.max_queued: int | None = settings.max_queued_bytes
        self.on_wait = on_wait
        #: (payload key, bytes counted) of sent batches whose payload may still be in Redis
        self._sent: deque[tuple[str, int]] = deque()
        self.queued_bytes = 0
        self.secret = settings.secret
        self.allow_eviction = settings.allow_eviction
        self._connection: Any = None
        self._redis: Any = None
        #: A risk the user accepted (an evicting Redis), to be shown once.
        self.warning: str | None = None
        #: Called at each turn of a wait for room: raises to stop it (a run cancelled).
        self.while_waiting: Callable[[], None] | None = None

    def check(self, timeout: float = defaults.BROKER_CONNECT_TIMEOUT) -> None:
        """Fail fast, naming the broker (password masked), when it cannot be reached or is
        a Redis that may evict queued batches (core/wire.check_eviction_policy)."""
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
        """The Redis client for payloads, connected on first use, once its eviction policy
        has passed: until a connection has, each call tries again, so a broker that was down
        when this sender was made is checked before anything is sent to it."""
        if self._redis is None:
            connection = self.app.connection_for_write()
            try:
                client = wire.require_redis(connection, self.url)
                self.warning = wire.check_eviction_policy(client, self.url, self.allow_eviction)
                if self.max_queued is None:
                    self.max_queued = default_bound(client)
            except BaseException:
                connection.release()
                raise
            self._connection, self._redis = connection, client
        return self._redis

    def batch_bytes(self, asked: int) -> int:
        """The bytes a batch may hold: ``asked``, but at most a quarter of the bound, so that
        several batches fit in Redis at once (a small ``maxmemory`` makes a small bound)."""
        bound = self.max_queued or defaults.MAX_QUEUED_BYTES
        return max(1, min(asked, bound // 4))

    def send(
        self, message: wire.BatchMessage, batch: FileBatch | None,
        priority: str = defaults.PRIORITY,
    ) -> None:
        """Queue the batch ``message`` names, at the step of its run's ``priority``
        (core/wire.message_priority); ``batch`` ``None`` sends the message alone (a
        ``--send paths`` run, whose workers read the files themselves). Raises
        :class:`BrokerUnavailable` with Redis's or kombu's own first line when the broker is
        gone or refuses a write."""
        from kombu.exceptions import KombuError
        from redis.exceptions import RedisError

        key = wire.payload_key(message)
        try:
            store = self._payload_store()
            payload = None
            if batch is not None:
                payload = wire.pack_payload(batch.blobs, batch.errors)
                cost = len(payload) + defaults.QUEUED_MESSAGE_BYTES
                self._wait_for_room(cost)
                store.set(key, payload, ex=self.ttl)
                self._sent.append((key, cost))
                self.queued_bytes += cost
            self._send_message(message, payload, priority)
        except Exception as e:
            if is_out_of_memory(e):
                self._leave_room(key if batch is not None else None)
                raise RedisFull(
                    f"the broker {mask_url(self.url)} failed ({type(e).__name__}): "
                    f"{first_line(e)}: Redis is out of memory and refused batch {message.seq}; "
                    f"start workers, give Redis more maxmemory, or lower "
                    f"{defaults.MAX_QUEUED_BYTES_ENV}"
                ) from None
            if isinstance(e, (RedisError, KombuError, OSError)):
                raise BrokerUnavailable(
                    f"the broker {mask_url(self.url)} failed ({type(e).__name__}): "
                    f"{first_line(e)}"
                ) from e
            raise

    def _send_message(
        self, message: wire.BatchMessage, payload: bytes | None, priority: str
    ) -> None:
        headers = (
            wire.signature_headers(self.secret, message, payload or b"")
            if self.secret else None
        )
        self.app.send_task(
            wire.TASK_NAME, args=list(message), queue=self.queue, serializer="msgpack",
            headers=headers, priority=wire.message_priority(priority, message.seq),
        )

    def resend(
        self, message: wire.BatchMessage, read: Callable[[], FileBatch] | None,
        priority: str = defaults.PRIORITY,
    ) -> None:
        """Send the batch ``message`` names again, at its run's ``priority``: its payload,
        when still in Redis, as it is; otherwise ``read()`` reads its files again (``read``
        ``None``: a ``--send paths`` batch, the message alone). With a secret the files are
        always read again: a payload found in Redis is not signed again, since anyone who can
        write to Redis could have swapped it."""
        if read is None:
            self.send(message, None, priority)
            return
        payload = None if self.secret else self._payload_store().get(wire.payload_key(message))
        if payload is None:
            self.send(message, read(), priority)
            return
        try:
            self._send_message(message, payload, priority)
        except Exception as e:
            raise BrokerUnavailable(
                f"the broker {mask_url(self.url)} failed ({type(e).__name__}): {first_line(e)}"
            ) from e

    def _leave_room(self, key: str | None) -> None:
        """After Redis refused a write: delete ``key`` (a payload no message may name) and
        the newest payload sent before it. A Redis past its ``maxmemory`` refuses a worker's
        every write too, so no worker could take a batch; the batch whose payload goes stays
        unfinished for ``producer resume``."""
        keys = [key] if key is not None else []
        if self._sent and self._sent[-1][0] == key:
            self.queued_bytes -= self._sent.pop()[1]
        if self._sent:
            newest, cost = self._sent.pop()
            self.queued_bytes -= cost
            keys.append(newest)
        if keys:
            try:
                self._redis.delete(*keys)  # DEL is allowed when Redis is out of memory
            except Exception:  # noqa: S110 - the refusal being reported matters more
                pass

    def _wait_for_room(self, cost: int) -> None:
        """Return once ``cost`` more bytes fit under the bound (or nothing of ours is queued:
        a batch larger than the bound goes alone)."""
        bound = self.max_queued or defaults.MAX_QUEUED_BYTES
        delay = 0.0  # the first turn asks Redis at once; each later one sleeps, longer each time
        reported = 0.0
        while self._sent and (
            self.queued_bytes + cost > bound or len(self._sent) >= defaults.MAX_TRACKED_BATCHES
        ):
            if delay:
                now = time.monotonic()
                if self.on_wait is not None and now - reported >= defaults.QUEUE_WAIT_REPORT_EVERY:
                    self.on_wait(self.queued_bytes, bound)
                    reported = now
                time.sleep(delay)
            if self.while_waiting is not None:
                self.while_waiting()
            self._forget_consumed()
            delay = min(2 * delay or defaults.QUEUE_WAIT_FIRST, defaults.QUEUE_WAIT_LONGEST)

    def _forget_consumed(self) -> None:
        """Drop the sent batches whose payload is gone from Redis (stored by a worker)."""
        pipe = self._redis.pipeline(transaction=False)
        for key, _ in self._sent:
            pipe.exists(key)
        still = [entry for entry, n in zip(self._sent, pipe.execute(), strict=True) if n]
        self._sent = deque(still)
        self.queued_bytes = sum(cost for _, cost in still)


def consumers(settings: Settings, timeout: float = defaults.INSPECT_TIMEOUT) -> list[str]:
    """The names of the workers that consume the settings' queue, as they answer Celery's
    control API within ``timeout`` seconds."""
    queue = settings.queue
    app = wire.make_app(settings)
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    finally:
        app.close()
    return sorted(
        node for node, queues in replies.items() if any(q.get("name") == queue for q in queues)
    )


def signing_problem(
    queue: str, registered: list[dict[str, Any]], secret: bytes | None
) -> str | None:
    """A line saying that every one of ``registered`` (live workers of ``queue``, as the
    registry holds them) drops the messages of a producer signing with ``secret``, or
    ``None``."""
    mine = wire.secret_fingerprint(secret)
    if not registered or not all(
        wire.signing_mismatch(mine, w.get("signing")) for w in registered
    ):
        return None
    names = ", ".join(w["name"] for w in registered)
    ours = " (this producer has none)" if mine == wire.NO_SECRET else ""
    return (
        f"the workers on queue {queue} ({names}) sign with another secret than this "
        f"producer's {defaults.SECRET_ENV}{ours}: they drop its messages, and its batches "
        f"stay queued; give the producer and every worker the same {defaults.SECRET_ENV}, "
        "then `producer resume RUN`"
    )


def why_idle(settings: Settings, engine: Any, run_id: int, healing: bool) -> str:
    """The likely reason no batch of a run is being stored, found by asking the broker which
    workers consume the queue and the run's database which workers write to it (its
    ``workers`` registry), with the command that fixes it, the URLs as the workers must be
    given them (passwords masked). ``healing``: this process re-sends lost batches."""
    from db.session import url_for_workers
    from db.workers import live_workers, vanished_workers

    queue, broker = settings.queue, mask_url(settings.broker_url)
    database = url_for_workers(engine.url)
    needed = (f"{defaults.BROKER_URL_ENV}={broker} {defaults.QUEUE_ENV}={queue} "
              f"{defaults.DATABASE_URL_ENV}={database}")
    try:
        nodes = consumers(settings)
    except Exception as e:
        reason = first_line(e)
        return f"cannot ask the broker {broker} which workers consume queue {queue}: {reason}"
    with engine.connect() as conn:
        writers = {w["name"]: w for w in live_workers(conn, 3 * defaults.HEARTBEAT_SECONDS)}
        gone = vanished_workers(conn, 3 * defaults.HEARTBEAT_SECONDS)
    if not nodes:
        killed = ""
        if gone:
            names = ", ".join(f"{w['name']} {w['seconds']:,.0f} s ago" for w in gone)
            killed = f" (stopped heartbeating without stopping: killed? {names})"
        return (f"no worker consumes queue {queue} on broker {broker}{killed}: start one: "
                f"{needed} worker")
    elsewhere = [n for n in nodes if n not in writers]
    if elsewhere:
        then = ("they are being re-sent" if healing
                else f"then run `producer resume {run_id}`")
        workers = agree(len(elsewhere), "worker", "workers")
        consume = agree(len(elsewhere), "consumes", "consume")
        return (
            f"{workers} {', '.join(elsewhere)} {consume} queue {queue} on broker {broker} but "
            f"{agree(len(elsewhere), 'writes', 'write')} to another database than this one, "
            f"{database}: its batches were dropped by a worker on another database: {then}; "
            f"restart {agree(len(elsewhere), 'that worker', 'those workers')} with {needed}"
        )
    problem = signing_problem(queue, [writers[n] for n in nodes], settings.secret)
    if problem:
        return problem
    n = len(nodes)
    return (
        f"{plural(n, 'worker')} {agree(n, 'consumes', 'consume')} queue {queue} on broker "
        f"{broker} and {agree(n, 'writes', 'write')} to {database} ({', '.join(nodes)}) but "
        f"stored none of this run's batches for a while: {agree(n, 'it', 'they')} may be busy "
        "with other runs"
        + ("; lost batches are being looked for and re-sent" if healing
           else f"; if the broker lost them, run `producer resume {run_id}`")
    )
