"""Batch payloads (worker/payloads.py): the image bytes wait in Redis under a key, the message
carries the paths and the key; the key goes once the rows are stored; a batch whose payload
is gone is left for ``producer resume``."""

from __future__ import annotations

import base64
import json
import time

import msgpack
import pytest
import redis
from sqlalchemy import text

from db.session import get_engine
from producer.files import Batch
from producer.queue import CelerySender
from tests.conftest import wait_for_log
from tests.test_faults import assert_exactly_once, run_row, train, wait_done
from worker import defaults, payloads
from worker.app import STORED_TASK_NAME


def test_payload_round_trip_and_what_is_refused():
    blobs, errors = [b"\x89PNG...", None, b""], [None, "file could not be read: gone", None]
    assert payloads.unpack(payloads.pack(blobs, errors), 3) == (blobs, errors)
    with pytest.raises(ValueError, match="2 images but 1 read errors"):
        payloads.pack([b"a", b"b"], [None])
    bad = {
        b"\xc1": "not msgpack",
        msgpack.packb([[b"a"], [None]]) + b"x": "not msgpack",
        msgpack.packb([[b"a"], [None], []]): "two lists of 1 items",
        msgpack.packb([[b"a"], [None]]): "two lists of 2 items",  # checked against 2 paths
        msgpack.packb([["text"], [None]], use_bin_type=True): "bytes or nil",
        msgpack.packb([[b"a"], [3]], use_bin_type=True): "strings or nil",
        msgpack.packb({"blobs": []}): "two lists",
    }
    for data, reason in bad.items():
        n = 2 if reason == "two lists of 2 items" else 1
        with pytest.raises(payloads.PayloadError, match=reason):
            payloads.unpack(data, n)


def test_keys_are_unique_per_send_and_name_the_queue():
    a, b = payloads.new_key("q1", 7, 2), payloads.new_key("q1", 7, 2)
    assert a != b and a.startswith("digitscore:payload:q1:7:2:")


def test_payload_ttl_setting(monkeypatch):
    monkeypatch.delenv(defaults.PAYLOAD_TTL_ENV, raising=False)
    assert defaults.payload_ttl() == 7 * 24 * 3600
    monkeypatch.setenv(defaults.PAYLOAD_TTL_ENV, "0")
    with pytest.raises(ValueError, match="positive"):
        defaults.payload_ttl()
    monkeypatch.setenv(defaults.PAYLOAD_TTL_ENV, "soon")
    with pytest.raises(ValueError, match="whole number"):
        defaults.payload_ttl()


@pytest.mark.integration
def test_on_redis_the_message_names_a_payload_key_holding_the_bytes(broker_env, sample_dir):
    files = sorted((sample_dir / "valid" / "7").glob("*.png"))[:4]
    batch = Batch()
    for f in files:
        batch.add(f"7/{f.name}", f.read_bytes(), None)
    batch.add("7/gone.png", None, "file could not be read: No such file or directory")
    CelerySender(broker_env["DIGITSCORE_BROKER_URL"]).send(3, 5, 1, batch)

    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    envelope = json.loads(client.lindex(broker_env["DIGITSCORE_QUEUE"], 0))
    assert envelope["headers"]["task"] == STORED_TASK_NAME
    assert envelope["content-type"] == "application/x-msgpack"
    args, kwargs, _embed = msgpack.unpackb(base64.b64decode(envelope["body"]), raw=False)
    run_id, seq, model_id, paths, key = args
    assert (run_id, seq, model_id, kwargs) == (3, 5, 1, {})
    assert paths == batch.paths
    assert key.startswith(f"digitscore:payload:{broker_env['DIGITSCORE_QUEUE']}:3:5:")
    blobs, errors = payloads.unpack(client.get(key), len(paths))
    assert blobs == batch.blobs and errors == batch.errors
    assert 0 < client.ttl(key) <= defaults.PAYLOAD_TTL
    # the message is small: the images are in the payload, not in it
    assert len(envelope["body"]) < len(client.get(key))


@pytest.mark.integration
def test_payloads_are_deleted_once_stored_and_a_lost_one_is_resumed(
    run_cli, sample_dir, sqlite_url, broker_env, start_worker
):
    train(run_cli, sample_dir, sqlite_url)
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    pattern = f"digitscore:payload:{broker_env['DIGITSCORE_QUEUE']}:*"
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
