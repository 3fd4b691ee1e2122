"""Batch payloads: a queued batch's image bytes, kept in Redis under a key of their own while
the message that names the key goes through the queue (a claim check).

With the bytes inside the message, every batch cost a Celery worker's main process about
8 ms of work the pool process then waited for (a profile with one worker and a full queue):
kombu's Redis transport base64-decodes the body, JSON-encodes the whole message again into its
unacknowledged-messages hash, and the main process pickles the body down a pipe to the pool
process. The message carries the batch's size and the key, a few hundred bytes whatever the
batch (with the paths in it, the main process's work per message grew with the batch: the
wait between two batches was 2.3 ms at 1,024 images and 3.2-3.8 ms at 4,096); the pool
process reads the payload itself, raw msgpack bytes, in one ``GET``.

The payload is msgpack (never pickle): ``[paths, blobs, errors]``, three lists as long as the
batch, ``paths[i]`` a string, ``blobs[i]`` bytes or nil, ``errors[i]`` a string or nil. (A
producer before this one put ``[blobs, errors]`` there and the paths in the message; such a
payload still reads, see :func:`unpack`.) It is deleted once the batch's rows are committed,
and expires after ``DIGITSCORE_PAYLOAD_TTL`` seconds if no worker ever gets to it; a batch
whose payload is gone is left unfinished for ``producer resume`` to send again.
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


def pack(
    paths: Sequence[str], blobs: Sequence[bytes | None], errors: Sequence[str | None]
) -> bytes:
    if not len(paths) == len(blobs) == len(errors):
        raise ValueError(f"{len(paths)} paths, {len(blobs)} images, {len(errors)} read errors")
    return msgpack.packb([list(paths), list(blobs), list(errors)], use_bin_type=True)


Unpacked = tuple[list[str] | None, list[bytes | None], list[str | None]]


def unpack(data: bytes, n_images: int) -> Unpacked:
    """The payload's paths, blobs and read errors, checked against the message's batch size
    ``n_images``. An earlier producer's payload, ``[blobs, errors]``, gives ``None`` for the
    paths (its message carried them)."""
    try:
        value = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise PayloadError(f"payload is not msgpack: {e}") from None
    if not (isinstance(value, list) and len(value) in (2, 3) and all(
            isinstance(part, list) and len(part) == n_images for part in value)):
        raise PayloadError(f"payload is not three lists of {n_images} items")
    paths, blobs, errors = value if len(value) == 3 else (None, *value)
    if paths is not None and not all(isinstance(p, str) for p in paths):
        raise PayloadError("payload paths must be strings")
    if not all(b is None or isinstance(b, bytes) for b in blobs):
        raise PayloadError("payload images must be bytes or nil")
    if not all(e is None or isinstance(e, str) for e in errors):
        raise PayloadError("payload read errors must be strings or nil")
    return paths, blobs, errors


def redis_client(connection: Any) -> Any | None:
    """The Redis client of a kombu connection to a Redis broker (the broker's own URL,
    password, database and TLS settings), or ``None`` for any other transport: then batches
    travel inside their messages."""
    if getattr(connection.transport, "driver_type", None) != "redis":
        return None
    return connection.default_channel.client
