"""The broker message of a batch on a broker other than Redis: msgpack, image bytes inline,
on our queue (in-memory kombu transport: no server needed). On Redis the bytes go to a payload
key instead: tests/test_payloads.py."""

from __future__ import annotations

import msgpack
import pytest
from kombu import Connection

from producer.files import Batch
from producer.queue import CelerySender
from worker.app import TASK_NAME


@pytest.fixture
def memory_sender(monkeypatch: pytest.MonkeyPatch) -> CelerySender:
    monkeypatch.setenv("DIGITSCORE_QUEUE", "unit-test-queue")
    return CelerySender("memory://")


def test_batch_message_is_msgpack_with_the_image_bytes_inline(memory_sender, sample_dir):
    files = sorted((sample_dir / "valid" / "3").glob("*.png"))[:3]
    batch = Batch()
    for f in files:
        batch.add(f"3/{f.name}", f.read_bytes(), None)
    batch.add("3/gone.png", None, "file could not be read: No such file or directory")
    memory_sender.send(run_id=7, seq=2, model_id=1, batch=batch)

    with Connection("memory://") as conn:
        queue = conn.SimpleQueue("unit-test-queue", accept=["msgpack"])
        message = queue.get(timeout=2)
        raw = message.body if isinstance(message.body, bytes) else message.body.encode()
        content_type = message.content_type
        headers = message.headers
        message.ack()
        queue.close()
    assert content_type == "application/x-msgpack"
    assert headers["task"] == TASK_NAME
    args, kwargs, _embed = msgpack.unpackb(raw, raw=False)
    run_id, seq, model_id, paths, blobs, errors = args
    assert (run_id, seq, model_id) == (7, 2, 1)
    assert paths == [f"3/{f.name}" for f in files] + ["3/gone.png"]
    assert blobs[:3] == [f.read_bytes() for f in files]  # the bytes themselves, not paths
    assert blobs[3] is None and errors[3].startswith("file could not be read")
    assert kwargs == {}


def test_the_app_accepts_msgpack_only():
    from worker.app import make_app

    app = make_app("memory://")
    assert app.conf.accept_content == ["msgpack"]
    assert app.conf.task_serializer == "msgpack"
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    vt = app.conf.broker_transport_options["visibility_timeout"]
    assert vt == app.conf.result_backend_transport_options["visibility_timeout"] == 600


def test_task_events_are_off_unless_asked_for_and_bad_values_are_refused(monkeypatch):
    import pytest

    from worker.app import make_app

    monkeypatch.delenv("DIGITSCORE_TASK_EVENTS", raising=False)
    app = make_app("memory://")
    assert not app.conf.worker_send_task_events and not app.conf.task_send_sent_event
    monkeypatch.setenv("DIGITSCORE_TASK_EVENTS", "1")
    app = make_app("memory://")
    assert app.conf.worker_send_task_events and app.conf.task_send_sent_event
    monkeypatch.setenv("DIGITSCORE_TASK_EVENTS", "maybe")
    with pytest.raises(ValueError, match="DIGITSCORE_TASK_EVENTS='maybe': use 1 or 0"):
        make_app("memory://")
