"""Batch payloads on real Redis (core/wire.py): the image bytes wait under a key derived from
the run's token and the batch; the message carries run, batch and token only; the key goes
once the rows are stored; a batch whose payload is gone is left for ``producer resume``."""

from __future__ import annotations

import base64
import json
import time

import msgpack
import pytest
import redis
from sqlalchemy import text

from core import defaults, wire
from core.files import FileBatch
from core.settings import Settings
from db.session import get_engine
from producer.queue import CelerySender
from tests.support import assert_exactly_once, run_row, save_model, wait_done, wait_for_log


@pytest.mark.integration
def test_on_redis_the_message_names_a_payload_key_holding_the_bytes(broker_env, sample_dir):
    files = sorted((sample_dir / "valid" / "7").glob("*.png"))[:4]
    batch = FileBatch()
    for f in files:
        batch.add(f"7/{f.name}", f.read_bytes(), None)
    batch.add("7/gone.png", None, "file could not be read: No such file or directory")
    token = "ab" * 16
    sender = CelerySender(Settings.from_env())  # broker_env sets the env vars
    sender.send(wire.BatchMessage(3, 5, token), batch)

    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    # batch 5 is past the boosted first batches: a normal run's later batches' list
    (stored,) = client.lrange(wire.queue_lists(broker_env["DIGITSCORE_QUEUE"])[3], 0, -1)
    envelope = json.loads(stored)
    assert envelope["properties"]["priority"] == wire.message_priority("normal", 5) == 3
    assert envelope["headers"]["task"] == wire.TASK_NAME
    assert envelope["content-type"] == "application/x-msgpack"
    args, kwargs, _embed = msgpack.unpackb(base64.b64decode(envelope["body"]), raw=False)
    assert (args, kwargs) == ([3, 5, token], {})
    key = wire.payload_key(wire.BatchMessage(3, 5, token))
    assert key == f"digitscore:payload:3:{token}:5"
    blobs, errors = wire.unpack_payload(client.get(key), 5)
    assert (blobs, errors) == (batch.blobs, batch.errors)
    assert 0 < client.ttl(key) <= defaults.PAYLOAD_TTL
    # the message is small whatever the batch: no paths, no images in it
    assert b"7/" not in base64.b64decode(envelope["body"]) and len(envelope["body"]) < 500


@pytest.mark.integration
def test_payloads_are_deleted_once_stored_and_a_lost_one_is_resumed(
    run_cli, classifier, sample_dir, sqlite_url, broker_env, start_worker
):
    save_model(sqlite_url, classifier)
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    pattern = "digitscore:payload:*"
    # no worker yet: the batches wait, each payload under its key
    r = run_cli("submit", str(sample_dir / "valid"), "--batch-size", "50",
                "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    keys = sorted(client.scan_iter(pattern))
    assert len(keys) == 4
    client.delete(keys[0])  # as if it had expired
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url},
                          "--device", "cpu")
    wait_for_log(worker, "ready.")
    deadline = time.monotonic() + 60
    while run_row(sqlite_url)["n_scored"] + run_row(sqlite_url)["n_failed"] < 150:
        assert time.monotonic() < deadline, run_row(sqlite_url)
        time.sleep(0.1)
    wait_for_log(worker, "producer resume 1")  # the lost batch is named, with what to do
    time.sleep(0.5)
    assert run_row(sqlite_url)["status"] == "running"
    assert list(client.scan_iter(pattern)) == []  # the stored batches' payloads are gone
    r = run_cli("resume", "1", "--wait", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    assert "re-sent 1" in r.stdout
    assert wait_done(sqlite_url, timeout=60)["status"] == "done"
    assert_exactly_once(sqlite_url, 200)
    assert list(client.scan_iter(pattern)) == []
    with get_engine(sqlite_url).connect() as conn:
        deliveries = conn.execute(text("SELECT deliveries FROM batches ORDER BY seq")).scalars()
        assert list(deliveries) == [1, 1, 1, 1]  # the lost send never reached the rows
