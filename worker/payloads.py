"""Batch payloads: a queued batch's image bytes, kept in Redis under a key of their own while
the message that names the key goes through the queue (a claim check).

With the bytes inside the message, every batch cost a Celery worker's main process about
8 ms of work the pool process then waited for (a profile with one worker and a full queue):
kombu's Redis transport base64-decodes the body, JSON-encodes the whole message again into its
unacknowledged-messages hash, and the main process pickles the body down a pipe to the pool
process. A message that carries the paths and a key is a few dozen kilobytes; the pool
process reads the payload itself, raw msgpack bytes, in one ``GET``.

The payload is msgpack (never pickle): ``[blobs, errors]``, each a list as long as the
batch's paths, ``blobs[i]`` bytes or nil, ``errors[i]`` a string or nil. It is deleted once
the batch's rows are committed, and expires after ``DIGITSCORE_PAYLOAD_TTL`` seconds if no
worker ever gets to it; a batch whose payload is gone is left unfinished for
``producer resume`` to send again.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import msgpack

#: Every payload key starts with this, then the queue's name.
PREFIX = "digitscore:payload:"


class PayloadError(ValueError):
    """A payload that is gone or is not what a producer writes."""


def new_key(queue: str, run_id: int, seq: int) -> str:
    """A key no other send uses: a re-sent batch gets a payload of its own."""
    return f"{PREFIX}{queue}:{run_id}:{seq}:{uuid.uuid4().hex}"


def pack(blobs: Sequence[bytes | None], errors: Sequence[str | None]) -> bytes:
    if len(blobs) != len(errors):
        raise ValueError(f"{len(blobs)} images but {len(errors)} read errors")
    return msgpack.packb([list(blobs), list(errors)], use_bin_type=True)


def unpack(data: bytes, n_paths: int) -> tuple[list[bytes | None], list[str | None]]:
    """The payload's blobs and read errors, checked against the message's ``n_paths``."""
    try:
        value = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise PayloadError(f"payload is not msgpack: {e}") from None
    if not (isinstance(value, list) and len(value) == 2 and all(
            isinstance(part, list) and len(part) == n_paths for part in value)):
        raise PayloadError(f"payload is not two lists of {n_paths} items")
    blobs, errors = value
    if not all(b is None or isinstance(b, bytes) for b in blobs):
        raise PayloadError("payload images must be bytes or nil")
    if not all(e is None or isinstance(e, str) for e in errors):
        raise PayloadError("payload read errors must be strings or nil")
    return blobs, errors


def redis_client(connection: Any) -> Any | None:
    """The Redis client of a kombu connection to a Redis broker (the broker's own URL,
    password, database and TLS settings), or ``None`` for any other transport: then batches
    travel inside their messages."""
    if getattr(connection.transport, "driver_type", None) != "redis":
        return None
    return connection.default_channel.client
