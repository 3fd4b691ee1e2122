"""Which batches have a message on the broker now: kombu's Redis transport keeps a queue's
waiting messages in a list named after the queue, and every delivered, unacknowledged one in
the hash ``unacked`` (delivery tag to ``[message, exchange, routing key]``) with its delivery
time in the sorted set ``unacked_index``, until the worker acknowledges it.

Each stored message is read only as far as finding the run and batch it names
(core/wire.BatchMessage): it proves nothing, it only says a message for that batch exists.
Anything that does not decode is skipped.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import msgpack

from core.wire import TASK_NAME, BatchMessage, queue_lists

#: kombu's Redis transport: the unacknowledged messages and their delivery times.
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"

Batch = tuple[int, int]  # (run id, batch number)


@dataclass(frozen=True)
class BrokerBatches:
    """The batches with a message waiting in the queue, and those delivered and not yet
    acknowledged with the time (seconds since the epoch) they were delivered."""

    waiting: frozenset[Batch]
    delivered: dict[Batch, float]

    def holds(self, batch: Batch) -> bool:
        return batch in self.waiting or batch in self.delivered


def read_broker_batches(client: Any, queue: str) -> BrokerBatches:
    """One consistent view (MULTI/EXEC) of ``queue``'s waiting and unacknowledged batch
    messages on the Redis ``client``."""
    lists = queue_lists(queue)  # the queue's own list and kombu's priority lists beside it
    pipe = client.pipeline(transaction=True)
    for name in lists:
        pipe.lrange(name, 0, -1)
    pipe.hgetall(UNACKED)
    pipe.zrange(UNACKED_INDEX, 0, -1, withscores=True)
    *waiting_lists, unacked, index = pipe.execute()
    waiting = {b for entries in waiting_lists for raw in entries
               if (b := batch_of(raw)) is not None}
    times = {_text(tag): float(score) for tag, score in index}
    delivered: dict[Batch, float] = {}
    for tag, raw in unacked.items():
        found = _unacked_batch(raw, queue)
        if found is not None:
            at = times.get(_text(tag), 0.0)
            delivered[found] = min(at, delivered.get(found, at))
    return BrokerBatches(frozenset(waiting), delivered)


def batch_of(raw: bytes | str) -> Batch | None:
    """The (run, batch) a stored kombu message of ours names, or ``None``."""
    try:
        return _batch_of_message(json.loads(raw))
    except (ValueError, TypeError):
        return None


def _unacked_batch(raw: bytes | str, queue: str) -> Batch | None:
    try:
        message, _exchange, routing_key = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if routing_key != queue:
        return None
    return _batch_of_message(message)


def _batch_of_message(message: Any) -> Batch | None:
    try:
        if message["headers"]["task"] != TASK_NAME:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, _kwargs, _embed = msgpack.unpackb(body, raw=False)
        batch = BatchMessage.from_args(args)
    except Exception:  # noqa: BLE001 - whatever a stored entry holds, it names no batch of ours
        return None
    return batch.run_id, batch.seq


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
