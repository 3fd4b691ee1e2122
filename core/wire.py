"""The wire: everything the producer and the workers say to each other through the broker.

One task, :data:`TASK_NAME`, and one message, :class:`BatchMessage`: a run id, a batch number
and the run's token, as three positional arguments, msgpack-encoded (never pickle). A message
carries no paths, no model id and no Redis key: the worker reads the batch's paths and model
from the database (the producer recorded them before sending), and derives the payload key
from the run, its token and the batch number. So a message can at most ask for work the
database already holds, on the batch it names.

With a shared secret (``DIGITSCORE_SECRET``) the producer signs each message: header
:data:`SIGNATURE_HEADER` holds an HMAC-SHA256 of the task name, the arguments and the
payload's SHA-256, which travels in header :data:`PAYLOAD_DIGEST_HEADER`. A worker with the
secret checks the HMAC before Celery reads the message, and the payload's digest before it
unpacks the payload; so without the secret no one can make a message a worker acts on, nor
swap a queued batch's image bytes. A copy of a signed message can still be sent again: it can
only ask for the work its batch's record holds, which is done once.

A batch's image bytes wait in Redis under :func:`payload_key` (a claim check), so that the
message stays a few hundred bytes whatever the batch: the payload is msgpack
``[blobs, errors]``, two lists as long as the batch's recorded paths, ``blobs[i]`` bytes or
nil and ``errors[i]`` a string or nil (why the producer could not read file ``i``). It is
deleted once the batch's rows are committed and expires after ``DIGITSCORE_PAYLOAD_TTL``;
a batch whose payload is gone stays unfinished for ``producer resume``.

:func:`check_delivery` validates what arrives (headers, task name, size, body) before Celery
reads any of it, so a malformed message costs a log line, not a worker.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import msgpack

from core import defaults
from core.errors import BrokerURLError, MessageError, RedisPolicyError
from core.text import first_line, mask_url, plural

if TYPE_CHECKING:
    from celery import Celery

    from core.settings import Settings

#: The one task a producer sends and a worker runs.
TASK_NAME = "digitscore.score_batch"
#: Every payload key starts with this, then the run, its token and the batch number.
PAYLOAD_PREFIX = "digitscore:payload:"
#: A run token: 32 lowercase hex digits (``uuid4().hex``).
TOKEN = re.compile(r"[0-9a-f]{32}")
#: The largest message body a worker accepts (bytes); a real one is under 200.
MAX_BODY_BYTES = 4096
#: The most database-error retries a message may say it had (at the longest backoff, days).
MAX_RETRIES = 10_000
#: The largest id or batch number in a message (a 63-bit database integer).
MAX_ID = 2**63 - 1
#: Headers of a signed message: the HMAC (hex) and the SHA-256 (hex) of its payload.
SIGNATURE_HEADER = "digitscore_signature"
PAYLOAD_DIGEST_HEADER = "digitscore_payload_sha256"
#: The longest read error a payload may carry for one file (characters).
MAX_READ_ERROR_CHARS = 64 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")

#: The message priorities in use: kombu's Redis transport keeps one list per step beside the
#: queue's own (step 0, the queue's name), and each worker's BRPOP names them lowest step
#: first, so a message of a lower step is always taken before one of a higher step. Two steps
#: per run priority: a run's first :data:`BOOSTED_BATCHES` batches one step ahead of the rest.
PRIORITY_STEPS = (0, 1, 2, 3, 4, 5)
#: kombu's separator between a queue's name and a priority step, in its lists' names.
PRIORITY_SEPARATOR = "\x06\x16"
#: A run's first batches are sent one step ahead of its priority: so a small run submitted
#: while a big one is scored waits for the batches being scored, not for the big run.
BOOSTED_BATCHES = 4


def message_priority(priority: str, seq: int) -> int:
    """The priority step of batch ``seq`` of a run of ``priority`` (one of
    :data:`core.defaults.PRIORITIES`): every send of that batch (submit, resume, healing)
    uses it."""
    base = 2 * defaults.PRIORITIES.index(priority) + 1
    return base - 1 if seq < BOOSTED_BATCHES else base


def queue_lists(queue: str) -> list[str]:
    """The Redis lists ``queue``'s waiting messages are in, in the order workers take them."""
    return [f"{queue}{PRIORITY_SEPARATOR}{step}" if step else queue for step in PRIORITY_STEPS]


class BatchMessage(NamedTuple):
    """Score batch ``seq`` of run ``run_id``, whose token is ``token``: the task's three
    positional arguments, in order (``list(message)``)."""

    run_id: int
    seq: int
    token: str

    @classmethod
    def from_args(cls, args: Any, kwargs: Any = None) -> BatchMessage:
        """The message of a task's arguments, or :class:`MessageError` saying what is wrong."""
        if kwargs:
            raise MessageError(f"unexpected keyword arguments {sorted(map(str, kwargs))[:5]}")
        if not isinstance(args, (list, tuple)) or len(args) != 3:
            raise MessageError("arguments must be [run_id, seq, token]")
        run_id, seq, token = args
        for name, value in (("run_id", run_id), ("seq", seq)):
            if type(value) is not int or not 0 <= value <= MAX_ID:
                raise MessageError(f"{name} must be a whole number from 0 to 2**63-1")
        if not isinstance(token, str) or not TOKEN.fullmatch(token):
            raise MessageError("token must be 32 lowercase hex digits")
        return cls(run_id, seq, token)


def check_headers(headers: Any) -> None:
    """The Celery protocol-2 headers a worker reads before the task runs, each of the type
    Celery expects; anything else raises :class:`MessageError`."""
    if not isinstance(headers, dict):
        raise MessageError("headers are not a map")
    for name in ("task", "id"):
        if not isinstance(headers.get(name), str):
            raise MessageError(f"header {name!r} is not a string")
    retries = headers.get("retries", 0)
    if retries is not None and (type(retries) is not int or not 0 <= retries <= MAX_RETRIES):
        raise MessageError(f"header 'retries' is not a whole number from 0 to {MAX_RETRIES}")
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            datetime.fromisoformat(value)
        except (TypeError, ValueError):
            raise MessageError(f"header {name!r} is not an ISO 8601 time") from None
    # the worker's own time limit applies (Settings.task_time_limit): a message that sets one
    # could have every delivery killed, split and failed
    limits = headers.get("timelimit")
    if limits is not None and (
        not isinstance(limits, (list, tuple)) or len(limits) != 2 or any(limits)
    ):
        raise MessageError("header 'timelimit' sets a time limit: the worker's own applies")
    for name in ("root_id", "parent_id", "group", "shadow", "lang", "origin"):
        if headers.get(name) is not None and not isinstance(headers[name], str):
            raise MessageError(f"header {name!r} is not a string")


def check_delivery(
    headers: Any, size: int, decode: Callable[[], Any], secret: bytes | None = None
) -> BatchMessage:
    """The message of a delivery whose headers are ``headers`` and whose encoded body has
    ``size`` bytes and decodes with ``decode()`` (only once the rest fits), signed with
    ``secret`` when one is given; or :class:`MessageError` saying what is wrong. Each part
    is checked once, here, in this order: headers, task name, size, body (Celery protocol
    2's ``(args, kwargs, embed)``), signature."""
    check_headers(headers)
    task_name = headers["task"]
    if task_name != TASK_NAME:
        raise MessageError(f"unknown task {task_name[:80]!r}")
    if size > MAX_BODY_BYTES:
        raise MessageError(f"body of {size} bytes (at most {MAX_BODY_BYTES})")
    try:
        body = decode()
    except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the body is refused
        raise MessageError(
            f"body cannot be decoded: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    if not (isinstance(body, (list, tuple)) and len(body) == 3 and isinstance(body[2], dict)
            and (body[1] is None or isinstance(body[1], dict))):
        raise MessageError("body is not [args, kwargs, embed]")
    args, kwargs, embed = body
    if any(embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord")):
        raise MessageError("callbacks, chains and chords are not accepted")
    message = BatchMessage.from_args(args, kwargs)
    if secret is not None:
        check_signature(secret, headers, message)
    return message


def _mac(secret: bytes, message: BatchMessage, payload_digest: str) -> str:
    signed = msgpack.packb([TASK_NAME, list(message), payload_digest], use_bin_type=True)
    return hmac.new(secret, signed, hashlib.sha256).hexdigest()


def signature_headers(secret: bytes, message: BatchMessage, payload: bytes) -> dict[str, str]:
    """The headers that sign ``message`` and its ``payload`` with ``secret``."""
    digest = hashlib.sha256(payload).hexdigest()
    return {SIGNATURE_HEADER: _mac(secret, message, digest), PAYLOAD_DIGEST_HEADER: digest}


#: What becomes of a batch whose message a worker drops for its signature.
_OWED = (f"its batch, if real, stays queued: give the producer and every worker the same "
         f"{defaults.SECRET_ENV}, then `producer resume RUN`")


def check_signature(secret: bytes, headers: dict[str, Any], message: BatchMessage) -> None:
    signature, digest = headers.get(SIGNATURE_HEADER), headers.get(PAYLOAD_DIGEST_HEADER)
    if signature is None:
        raise MessageError(
            f"not signed, and this worker has {defaults.SECRET_ENV}; {_OWED}")
    # both must be hex before compare_digest, which raises on text that is not ASCII
    if not (isinstance(signature, str) and isinstance(digest, str)
            and _HEX64.fullmatch(signature) and _HEX64.fullmatch(digest)
            and hmac.compare_digest(signature, _mac(secret, message, digest))):
        raise MessageError(
            f"bad signature: not signed with this worker's {defaults.SECRET_ENV}; {_OWED}")


#: What a worker registers when it has no secret (it takes unsigned messages).
NO_SECRET = "none"


def secret_fingerprint(secret: bytes | None) -> str:
    """A name of the secret that signs: an HMAC of a fixed text under it, never the secret
    (16 hex digits), or :data:`NO_SECRET`. Workers register it, so a producer can say when
    the workers of its queue sign with another secret."""
    if secret is None:
        return NO_SECRET
    return hmac.new(secret, b"digitscore secret fingerprint", hashlib.sha256).hexdigest()[:16]


def signing_mismatch(producer: str, worker: str | None) -> bool:
    """Whether a worker registered with fingerprint ``worker`` drops the messages of a
    producer whose fingerprint is ``producer``: a worker without a secret takes any."""
    return worker not in (None, NO_SECRET, producer)


def check_payload_digest(digest: Any, payload: bytes) -> None:
    """:class:`MessageError` unless ``payload`` has the SHA-256 its signed message names."""
    if not (isinstance(digest, str) and _HEX64.fullmatch(digest)
            and hmac.compare_digest(digest, hashlib.sha256(payload).hexdigest())):
        raise MessageError(
            "its image bytes in Redis are not those its producer signed (written by someone "
            "else): nothing scored"
        )


def payload_key(message: BatchMessage) -> str:
    """Where the batch a message names keeps its payload: a re-send of the batch overwrites
    it, and a message can name no other key."""
    return f"{PAYLOAD_PREFIX}{message.run_id}:{message.token}:{message.seq}"


def pack_payload(blobs: Sequence[bytes | None], errors: Sequence[str | None]) -> bytes:
    if len(blobs) != len(errors):
        raise ValueError(f"{plural(len(blobs), 'image')} but {plural(len(errors), 'read error')}")
    return msgpack.packb([list(blobs), list(errors)], use_bin_type=True)


def unpack_payload(
    data: bytes, n_images: int, max_file_bytes: int = defaults.MAX_FILE_BYTES
) -> tuple[list[bytes | None], list[str | None]]:
    """A payload's image bytes and read errors, checked against the batch's recorded size and
    the producer's own limit per file: anything else raises :class:`MessageError`."""
    try:
        value = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True,
            max_bin_len=max_file_bytes, max_str_len=MAX_READ_ERROR_CHARS,
            max_array_len=max(n_images, 2), max_map_len=0, max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise MessageError(f"payload is not what a producer writes: {e}") from None
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(part, list) and len(part) == n_images for part in value)):
        raise MessageError(f"payload is not two lists of {plural(n_images, 'item')}")
    blobs, errors = value
    if not all(b is None or isinstance(b, bytes) for b in blobs):
        raise MessageError("payload images must be bytes or nil")
    if not all(e is None or isinstance(e, str) for e in errors):
        raise MessageError("payload read errors must be strings or nil")
    return blobs, errors


def check_broker_url(url: str) -> None:
    """:class:`BrokerURLError` when kombu could not take ``url`` apart (its own message, and
    urllib's, quote the part that fails, which is often the password)."""
    try:
        urlsplit(url).port  # noqa: B018 - reading it is the check: urllib parses it lazily
    except ValueError:
        raise BrokerURLError(
            f"the broker URL {mask_url(url)} cannot be parsed: percent-escape reserved "
            "characters in its password (# as %23, / as %2F, @ as %40)"
        ) from None


def require_redis(connection: Any, broker_url: str) -> Any:
    """The Redis client of a kombu connection to a Redis broker (its own URL, password,
    database and TLS settings); :class:`BrokerURLError` for any other transport, naming
    ``broker_url`` with its password masked."""
    if getattr(connection.transport, "driver_type", None) != "redis":
        raise BrokerURLError(
            f"the broker {mask_url(broker_url)} is not Redis: batches keep their image bytes "
            "in Redis while queued, so use a redis:// (or rediss://) broker"
        )
    return connection.default_channel.client


def check_eviction_policy(client: Any, broker_url: str, allow: bool = False) -> str | None:
    """:class:`RedisPolicyError` unless the Redis behind ``client`` (at ``broker_url``, named
    with its password masked) never evicts a key (``maxmemory-policy noeviction``): an
    evicting Redis under memory pressure drops queued batches, their image bytes and the
    queue itself, without a trace. With ``allow`` (``DIGITSCORE_ALLOW_EVICTION=1``) nothing
    is refused, and the risk is returned as a warning (``None`` when there is none)."""
    from redis.exceptions import ResponseError

    try:
        policy = str(client.config_get("maxmemory-policy").get("maxmemory-policy") or "?")
    except ResponseError as e:
        problem = f"its maxmemory-policy cannot be read ({first_line(e)})"
        fix = (f"if it never evicts keys (a managed Redis set to noeviction), set "
               f"{defaults.ALLOW_EVICTION_ENV}=1")
    else:
        if policy == "noeviction":
            return None
        problem = f"its maxmemory-policy is {policy}"
        fix = (f"set it with `redis-cli CONFIG SET maxmemory-policy noeviction` (and in "
               f"redis.conf), or set {defaults.ALLOW_EVICTION_ENV}=1 to run at that risk")
    risk = (f"the broker {mask_url(broker_url)}: {problem}, so under memory pressure Redis may "
            "drop queued batches, their image bytes and the queue itself without a trace")
    if allow:
        return f"{risk} ({defaults.ALLOW_EVICTION_ENV}=1)"
    raise RedisPolicyError(f"{risk}; {fix}")


def make_app(settings: Settings) -> Celery:
    """The Celery app producer and workers share: msgpack only, at-least-once delivery, with
    the visibility timeout, time limit, queue and events of ``settings``, which the producer
    and every worker read from the same ``DIGITSCORE_*`` env vars."""
    from celery import Celery

    broker = settings.broker_url
    if not broker:
        raise BrokerURLError(
            f"no broker: set {defaults.BROKER_URL_ENV} (or --broker-url), e.g. "
            "redis://127.0.0.1:6379/0"
        )
    timeout = settings.visibility_timeout
    events = settings.task_events
    app = Celery("digitscore", broker=broker, set_as_current=False)
    # The visibility timeout is read from the broker's and the result backend's transport
    # options; no results are kept, but both are set so no part of Celery falls back to 1 h.
    transport = {
        "visibility_timeout": timeout,
        # kombu sweeps for the unacked messages of dead workers every interval x throttle
        # seconds (100 s by default, whatever the timeout): every timeout/5 (1-10 s) instead,
        # so a dead worker's batch is back in the queue within about 1.2 x the timeout.
        "unacked_restore_interval": max(1, min(10, timeout // 5)),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": defaults.BROKER_CONNECT_TIMEOUT,
        "socket_timeout": defaults.BROKER_SOCKET_TIMEOUT,
        # one list per priority step (see PRIORITY_STEPS); the producer's app puts a message
        # in its step's list, the worker's BRPOP names the lists in this order
        "priority_steps": list(PRIORITY_STEPS),
        "queue_order_strategy": "priority",
    }
    app.conf.update(
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack"],  # anything else (pickle!) is rejected and logged
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,  # ack after the rows are committed
        task_reject_on_worker_lost=True,  # a killed worker's batch goes back to the queue
        # a batch over its time limit has its process killed, and goes back to the queue
        task_time_limit=settings.task_time_limit,
        task_acks_on_timeout=False,
        # a GPU pool process initialises CUDA as it starts, which can take longer than the
        # 4 s Celery waits by default before killing a process that has not reported up
        worker_proc_alive_timeout=defaults.PROCESS_START_TIMEOUT,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": timeout},
        broker_connection_timeout=defaults.BROKER_CONNECT_TIMEOUT,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=events,  # for flower; see defaults.TASK_EVENTS
        task_send_sent_event=events,
        worker_hijack_root_logger=False,
    )
    return app
