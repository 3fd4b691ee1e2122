"""kombu's Redis transport with every queue entry checked before kombu reads it.

kombu keeps a message in the Redis list of its queue as a JSON envelope: the body (base64),
its content type and encoding, the headers, and properties that hold a delivery tag and the
delivery info. Anyone who can write to Redis can push anything onto that list; kombu's own
reader raises on an entry that is not such an envelope, inside the worker's event loop, and
the worker exits. Here an entry that is not JSON, or whose envelope lacks a part kombu needs,
is logged and dropped (BRPOP has already taken it off the list) and the worker goes on.
What is inside a well-formed envelope is checked next by ``worker/tasks.CheckedConsumer``.

Used for ``redis://`` brokers (``worker/tasks.py`` sets it); ``rediss://`` keeps kombu's own
transport, whose TLS defaults are set from that scheme.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from kombu.transport import redis as kombu_redis

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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            # raised by kombu's json.loads of the entry BRPOP just took, before any delivery
            log.error("a queue entry that is not JSON was dropped: %s", e)
            return True


class CheckedTransport(kombu_redis.Transport):
    """kombu's Redis transport; see the module's docstring."""

    Channel = CheckedChannel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem is not None:
            log.error("a queue entry of %r that is not a kombu message was dropped: %s",
                      str(queue)[:80], problem)
            return
        super()._deliver(message, queue)
