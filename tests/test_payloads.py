"""Batch payloads (worker/payloads.py): the paths and image bytes wait in Redis under a key,
the message carries the batch's size and the key; the key goes once the rows are stored; a
batch whose payload is gone is left for ``producer resume``."""

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
    paths = ["3/a.png", "3/b.png", "7/\\xff é.png"]  # as the producer names an odd file
    blobs, errors = [b"\x89PNG...", None, b""], [None, "file could not be read: gone", None]
    assert payloads.unpack(payloads.pack(paths, blobs, errors), 3) == (paths, blobs, errors)
    # an earlier producer's payload: the bytes only, its message held the paths
    earlier = msgpack.packb([blobs, errors], use_bin_type=True)
    assert payloads.unpack(earlier, 3) == (None, blobs, errors)
    with pytest.raises(ValueError, match="2 paths, 2 images, 1 read errors"):
        payloads.pack(["a", "b"], [b"a", b"b"], [None])
    bad = {
        b"\xc1": "not msgpack",
        msgpack.packb([["a"], [b"a"], [None]]) + b"x": "not msgpack",
        msgpack.packb([["a"], [b"a"], [None], []]): "three lists of 1 items",
        msgpack.packb([["a"], [b"a"], [None]]): "three lists of 2 items",  # 2 in the message
        msgpack.packb([[b"a"], [b"a"], [None]], use_bin_type=True): "paths must be strings",
        msgpack.packb([["a"], ["text"], [None]], use_bin_type=True): "bytes or nil",
        msgpack.packb([["a"], [b"a"], [3]], use_bin_type=True): "strings or nil",
        msgpack.packb({"blobs": []}): "three lists",
    }
    for data, reason in bad.items():
        n = 2 if reason == "three lists of 2 items" else 1
        with pytest.raises(payloads.PayloadError, match=reason):
            payloads.unpack(data, n)


def test_the_task_reads_paths_from_the_payload_or_from_an_earlier_message(
    monkeypatch, classifier, sample_dir, tmp_path
):
    """Both forms of the stored-batch message through the task's own code (fakeredis for the
    store): the rows are stored and the payload key deleted."""
    import fakeredis

    from db import queries
    from tests.test_results import save
    from worker import tasks

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    monkeypatch.setenv(defaults.DATABASE_URL_ENV, url)
    engine = get_engine(url)
    model_id = save(engine, classifier)
    files = sorted((sample_dir / "valid" / "3").glob("*.png"))[:6]
    paths = [f"3/{f.name}" for f in files]
    blobs: list[bytes | None] = [f.read_bytes() for f in files]
    with engine.begin() as conn:
        run_id = queries.create_run(conn, model_id, str(sample_dir / "valid"), "celery")
        queries.record_batch(conn, run_id, 0, paths[:3], 0)
        queries.record_batch(conn, run_id, 1, paths[3:], 0)
    store = fakeredis.FakeRedis()
    monkeypatch.setattr(tasks, "payload_store", lambda: store)
    store.set("k0", payloads.pack(paths[:3], blobs[:3], [None] * 3))
    store.set("k1", msgpack.packb([blobs[3:], [None] * 3], use_bin_type=True))
    assert tasks.score_stored_batch_task.run(run_id, 0, model_id, 3, "k0") == 3
    assert tasks.score_stored_batch_task.run(run_id, 1, model_id, paths[3:], "k1") == 3
    assert store.keys() == []
    with engine.connect() as conn:
        stored = conn.execute(text(
            "SELECT path, batch_seq FROM predictions WHERE error IS NULL ORDER BY id")).all()
    assert [tuple(r) for r in stored] == [(p, i // 3) for i, p in enumerate(paths)]


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
    run_id, seq, model_id, n_images, key = args
    assert (run_id, seq, model_id, n_images, kwargs) == (3, 5, 1, 5, {})
    assert key.startswith(f"digitscore:payload:{broker_env['DIGITSCORE_QUEUE']}:3:5:")
    paths, blobs, errors = payloads.unpack(client.get(key), n_images)
    assert (paths, blobs, errors) == (batch.paths, batch.blobs, batch.errors)
    assert 0 < client.ttl(key) <= defaults.PAYLOAD_TTL
    # the message is small whatever the batch: no paths, no images in it
    assert b"7/" not in base64.b64decode(envelope["body"]) and len(envelope["body"]) < 500


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
