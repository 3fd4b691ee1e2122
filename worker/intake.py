"""The worker's intake: everything between a Redis queue entry and the task, in the worker's
main process, where Celery and kombu offer no public hook.

1. The Redis transport (:class:`CheckedTransport`, for ``redis://`` brokers; ``rediss://``
   keeps kombu's own, whose TLS defaults are set from that scheme) drops an entry that is not
   a kombu envelope. kombu keeps a message in its queue's Redis list as JSON: the body
   (base64), its content type and encoding, the headers, and properties that hold a delivery
   tag, the delivery info and the priority (one of ``core/wire.PRIORITY_STEPS``, or none:
   where the worker restores a message, kombu clamps any number to 0-9, takes what is no
   number for 0, the first list, and fails on an infinite one). Anyone who can write to
   Redis can push anything there, and kombu's own reader raises on an entry that is not
   such an envelope, inside the worker's event loop, and the worker exits. Here it is
   logged and dropped (BRPOP has already taken it off the list) and the worker goes on.
2. The consumer (:class:`CheckedConsumer`) checks the broker's ``maxmemory-policy`` each
   time it connects, before it consumes anything (core/wire.check_eviction_policy): the
   launcher checks it too, but cannot when the broker is down at start, and a Redis restarted
   with another configuration is caught as it comes back. An evicting Redis stops the worker
   with status 2 (``DIGITSCORE_ALLOW_EVICTION=1``: a warning). It checks every delivery once,
   before Celery reads
   any of it (``core/wire.check_delivery``: headers, task name, size, body, signature); what
   does not fit is logged with its id, acknowledged (dropped: there is no dead-letter queue)
   and the worker goes on. Unchecked, a body Celery cannot unpack, or an unknown task without
   an ``id`` header, raises inside Celery's consumer and stops the worker, and the message,
   restored, stops the next one. The task then takes the arguments as checked here
   (``worker/tasks.score_batch_task``) and parses nothing again.
3. The request (:class:`DeathCountingRequest`) counts a pool process's death, or a batch
   killed at the time limit, as a failed delivery of the batch it held
   (``db/batch_life.count_failed_delivery``) before Celery requeues the message. A message
   cannot forge that (a redelivered flag can be).

Private or internal names of Celery and kombu this module relies on (the pins in
pyproject.toml name the minor versions tested; ``tests/test_intake.py`` checks that each
still exists with the signature below):

- ``kombu.transport.redis.Channel._brpop_read(self, **options)``: reads one BRPOP reply;
- ``kombu.transport.redis.Transport._deliver(self, message, queue)``: hands a decoded entry
  to its consumer;
- ``celery.worker.consumer.Consumer.create_task_handler(self, promise=promise)``: builds the
  function that receives each message;
- ``celery.worker.request.Request.on_failure(self, exc_info, send_failed_event=True,
  return_ok=False)`` and ``Request.on_timeout(self, soft, timeout)``;
- ``Request._already_cancelled`` and ``Request._already_revoked``: whether Celery itself ended
  the process (a revoke or a cancel);
- ``celery.worker.state.should_terminate``: set during a cold stop;
- ``billiard.einfo.ExceptionWithTraceback.exc``: a child's exception as billiard sends it.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any
from urllib.parse import urlsplit

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.exceptions import WorkerShutdown
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.transport import redis as kombu_redis
from vine import promise

from core import wire
from core.errors import EXIT_BAD_INPUT, MessageError, RedisPolicyError
from core.text import mask_urls_in
from db.batch_life import count_failed_delivery
from db.session import get_engine
from worker.tasks import SETTINGS

log = logging.getLogger("digitscore.worker")


def envelope_problem(entry: Any) -> str | None:
    """Why ``entry`` (a queue entry as JSON gave it) is not an envelope kombu can read, or
    ``None`` when it is one."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    properties = entry.get("properties")
    if not isinstance(properties, dict):
        return "no properties"
    if not isinstance(properties.get("delivery_tag"), str):
        return "no delivery tag"
    info = properties.get("delivery_info")
    if not (isinstance(info, dict) and isinstance(info.get("exchange"), str)
            and isinstance(info.get("routing_key"), str)):
        return "no delivery info"
    # kombu would clamp any number, and read what is no number as 0, the first list; a
    # producer of ours sends only the steps
    priority = properties.get("priority")
    if priority is not None and (type(priority) is not int
                                 or priority not in wire.PRIORITY_STEPS):
        return f"priority {str(priority)[:40]!r} is not one of {list(wire.PRIORITY_STEPS)}"
    if not isinstance(entry.get("headers") or {}, dict):
        return "headers are not a map"
    for name in ("content-type", "content-encoding"):
        if not isinstance(entry.get(name), str):
            return f"no {name}"
    body = entry.get("body")
    if not isinstance(body, str):
        return "the body is not text"
    if properties.get("body_encoding") == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "the body is not base64"
    elif properties.get("body_encoding") is not None:
        return "unknown body encoding"
    return None


class CheckedChannel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except (ValueError, RecursionError) as e:
            # raised by kombu's json.loads of the entry BRPOP just took, before any delivery:
            # not JSON, not UTF-8 (both ValueErrors), or nested deeper than the parser goes
            log.error("a queue entry that is not JSON was dropped: %s", str(e)[:200])
            return True


class CheckedTransport(kombu_redis.Transport):
    """kombu's Redis transport with every queue entry checked before kombu reads it."""

    Channel = CheckedChannel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem is not None:
            log.error("a queue entry of %r that is not a kombu message was dropped: %s",
                      str(queue)[:80], problem)
            return
        super()._deliver(message, queue)


def message_id(message: Any) -> str:
    """A delivery's id for the log: its ``id`` header when that is text, else its tag."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    value = headers.get("id")
    if not isinstance(value, str):
        value = (message.delivery_info or {}).get("delivery_tag") or message.delivery_tag
    return repr(str(value)[:64])


class CheckedConsumer(Consumer):
    """Celery's consumer with its broker's eviction policy checked on each connection, and
    every delivery checked once before Celery reads any of it (see the module's docstring)."""

    def connect(self) -> Any:
        connection = super().connect()
        if urlsplit(str(SETTINGS.broker_url)).scheme in ("redis", "rediss"):
            try:
                warning = wire.check_eviction_policy(
                    connection.default_channel.client, str(SETTINGS.broker_url),
                    SETTINGS.allow_eviction,
                )
            except RedisPolicyError as e:
                log.critical("%s. Stopping this worker (status %s)", e, EXIT_BAD_INPUT)
                raise WorkerShutdown(EXIT_BAD_INPUT) from None
            if warning:
                log.warning("warning: %s", warning)
        return connection

    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            try:
                wire.check_delivery(
                    message.headers, len(message.body or b""), message.decode, SETTINGS.secret
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


def record_death(args: Any, why: str, time_limited: bool = False) -> None:
    """Count a pool process's death as a failed delivery of the batch it held, in the
    database, before the batch goes back to the queue; a failure to count only means one
    death goes uncounted. A death by the time limit is marked so: the next delivery splits
    the batch (worker/splitting.py)."""
    try:
        message = wire.BatchMessage(*args)  # checked by CheckedConsumer
        failed = count_failed_delivery(
            get_engine(SETTINGS.database_url), message.run_id, message.seq, message.token, why,
            time_limited,
        )
    except Exception as e:  # noqa: BLE001 - the requeue below must happen whatever this does
        log.error("a worker process died; its death could not be counted: %s",
                  mask_urls_in(str(e)))
        return
    if failed is not None:
        log.warning(
            "a worker process died holding run %s batch %s (%s failed deliveries so far)",
            message.run_id, message.seq, failed,
        )


class DeathCountingRequest(Request):
    """Celery's request, in the worker's main process: when the pool process running a batch
    dies, the batch's delivery count goes up by one (db/batch_life.count_failed_delivery) before
    Celery requeues the message. A message cannot forge that (a redelivered flag can be)."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False):
        if died_holding(self, exc_info.exception):
            record_death(self.args, "the worker process died holding it")
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        # past the hard time limit Celery kills the process and requeues the batch: a death
        if not soft and not worker_state.should_terminate:
            record_death(self.args, f"it ran past the task time limit ({timeout:g} s)", True)
        super().on_timeout(soft, timeout)
