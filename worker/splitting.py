"""A batch the task time limit stopped comes back whole; its next delivery's claim says
``split`` (db/batch_life.claim_batch) and it is split in two (db/splits.py) instead of scored
again, down to :data:`db.batch_life.SPLIT_FLOOR` images, so a batch too large for this
device's time limit is scored in halves rather than failed whole as poison.

Each half is recorded (owed) before its message goes; in a ``--send bytes`` run its image
bytes are cut from the batch's payload and written under the half's own payload key first.
A batch of one archive's members is split alike, each half with its part of the archive's
record (db/splits.py).
"""

from __future__ import annotations

import logging
from typing import Any

from core import wire
from core.errors import MessageError
from core.settings import Settings
from core.text import plural
from db.batch_life import RecordedBatch
from db.splits import run_priority, split_batch

log = logging.getLogger("digitscore.worker")


def split_and_resend(
    engine: Any, store: Any, app: Any, settings: Settings, batch: RecordedBatch,
    message: wire.BatchMessage, digest: str | None = None,
) -> list[int]:
    """Split ``batch`` (its message ``message``, whose payload digest header is ``digest``)
    and queue its halves; their numbers. With a secret, the payload is checked against the
    signed digest before its halves are signed."""
    key = wire.payload_key(message)
    payload = None
    if batch.send_mode != "paths":
        payload = store.get(key)
        if payload is None:
            raise MessageError(
                f"run {batch.run_id} batch {batch.seq}: its image bytes are gone from Redis; "
                f"the batch stays unfinished: run `producer resume {batch.run_id}`"
            )
        if settings.secret is not None:
            try:
                wire.check_payload_digest(digest, payload)
            except MessageError as e:
                raise MessageError(f"run {batch.run_id} batch {batch.seq}: {e}") from None
        blobs, errors = wire.unpack_payload(payload, len(batch.paths))
    halves = split_batch(engine, batch.run_id, batch.seq)
    priority = run_priority(engine, batch.run_id) if halves else ""
    start = 0
    for seq, paths in halves:
        half = wire.BatchMessage(batch.run_id, seq, message.token)
        data = b""
        if payload is not None:
            part = slice(start, start + len(paths))
            data = wire.pack_payload(blobs[part], errors[part])
            store.set(wire.payload_key(half), data, ex=settings.payload_ttl)
        start += len(paths)
        headers = (wire.signature_headers(settings.secret, half, data) if settings.secret
                   else None)
        # no time limit in the message (Celery would copy the registered task's, and
        # workers refuse a message that sets one: the receiving worker's own applies)
        app.send_task(wire.TASK_NAME, args=list(half), queue=settings.queue,
                      serializer="msgpack", headers=headers, time_limit=None,
                      soft_time_limit=None, priority=wire.message_priority(priority, seq))
    if halves:
        store.delete(key)
        log.warning(
            "run %s batch %s (%s images) was stopped by the task time limit (%s s): split into "
            "batches %s", batch.run_id, batch.seq, len(batch.paths), settings.task_time_limit,
            " and ".join(f"{seq} ({plural(len(paths), 'image')})" for seq, paths in halves),
        )
    return [seq for seq, _ in halves]
