"""The pieces of healing without a broker: the re-send two healers race for, the runs a live
sender holds left alone, the broker's messages read back to their batches (fakeredis), and a
batch stored twice writing its rows once (a SQLite file)."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import fakeredis
import msgpack
import pytest
from sqlalchemy import text, update

from core.queued import read_broker_batches
from core.wire import TASK_NAME
from db import batch_life, queries
from db.healing import take_resend, waiting_batches
from db.leases import release_lease
from db.models import batches, utcnow
from db.session import get_engine
from tests.support import score_and_store

TOKEN = "ab" * 16


@pytest.fixture
def engine(model_db):
    return get_engine(model_db)


def age_batches(engine, seconds: float) -> None:
    with engine.begin() as conn:
        conn.execute(update(batches).values(enqueued_at=utcnow() - timedelta(seconds=seconds)))


def test_of_two_healers_one_takes_the_re_send_of_a_lost_batch(engine):
    with engine.begin() as conn:
        run_id, _ = queries.create_run(conn, 1, "/data", "celery")
        batch_life.record_batch(conn, run_id, 0, ["3/a.png"], 10)
    age_batches(engine, 60)
    with engine.connect() as conn:
        seen = [waiting_batches(conn, utcnow())[0] for _ in range(2)]  # two healers' reads
    assert [take_resend(engine, b) for b in seen] == [True, False]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT resends FROM batches")).scalar() == 1
        # just re-sent: not waiting long enough to be suspected again
        assert waiting_batches(conn, utcnow() - timedelta(seconds=5)) == []


def test_a_run_a_live_sender_holds_is_left_to_it(engine):
    with engine.begin() as conn:
        run_id, _ = queries.create_run(conn, 1, "/data", "celery", lease=("1@h", 60))
        batch_life.record_batch(conn, run_id, 0, ["3/a.png"], 10)
    age_batches(engine, 60)
    with engine.connect() as conn:
        assert waiting_batches(conn, utcnow()) == []
    release_lease(engine, run_id, "1@h")
    with engine.connect() as conn:
        assert [(b.run_id, b.seq) for b in waiting_batches(conn, utcnow())] == [(run_id, 0)]


def stored(run_id: int, seq: int, task: str = TASK_NAME) -> dict:
    body = msgpack.packb([[run_id, seq, TOKEN], {}, {"callbacks": None}], use_bin_type=True)
    return {"body": base64.b64encode(body).decode(), "content-type": "application/x-msgpack",
            "headers": {"task": task, "id": f"{run_id}-{seq}"},
            "properties": {"body_encoding": "base64", "delivery_tag": f"tag-{run_id}-{seq}"}}


def test_the_broker_view_finds_waiting_and_delivered_batches_of_the_queue():
    client = fakeredis.FakeRedis()
    client.lpush("q", json.dumps(stored(1, 0)), b"not json", json.dumps(stored(1, 9, "x.y")))
    client.lpush("q\x06\x163", json.dumps(stored(1, 1)))  # kombu's priority list
    client.lpush("other", json.dumps(stored(1, 5)))
    client.hset("unacked", "tag-1-2", json.dumps([stored(1, 2), "", "q"]))
    client.hset("unacked", "tag-1-6", json.dumps([stored(1, 6), "", "other"]))
    client.zadd("unacked_index", {"tag-1-2": 1234.5, "tag-1-6": 1.0})
    view = read_broker_batches(client, "q")
    assert view.waiting == {(1, 0), (1, 1)}
    assert view.delivered == {(1, 2): 1234.5}
    assert view.holds((1, 2)) and not view.holds((1, 5)) and not view.holds((1, 9))


def test_a_batch_stored_twice_writes_its_rows_once(engine, classifier, sample_dir):
    root = sample_dir / "valid"
    paths = [str(p.relative_to(root)) for p in sorted(root.rglob("*.png"))[:3]]
    with engine.begin() as conn:
        run_id, _ = queries.create_run(conn, 1, str(root), "celery")
        batch_life.record_batch(conn, run_id, 0, paths, 10)
    queries.finish_submission(engine, run_id, 3, 0)
    blobs = [(root / p).read_bytes() for p in paths]
    # the first copy and a re-sent one, both scored: the second adds nothing
    assert score_and_store(engine, classifier, run_id, 0, paths, blobs) == 3
    assert score_and_store(engine, classifier, run_id, 0, paths, blobs) == 0
    with engine.connect() as conn:
        run = queries.get_run(conn, run_id)
        n = conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar()
    assert (n, run["n_scored"] + run["n_failed"], run["status"]) == (3, 3, "done")


def test_a_worker_that_stopped_heartbeating_without_stopping_is_named(engine):
    from db.models import workers
    from db.workers import register_worker, stop_worker, vanished_workers

    register_worker(engine, "w1@h", "h", 1, "cpu", "q")
    register_worker(engine, "w2@h", "h", 2, "cpu", "q")
    with engine.begin() as conn:
        conn.execute(update(workers).values(last_seen=utcnow() - timedelta(seconds=45)))
    stop_worker(engine, "w2@h")  # a warm stop: not vanished
    with engine.connect() as conn:
        gone = vanished_workers(conn, 30)
    assert [w["name"] for w in gone] == ["w1@h"] and 44 < gone[0]["seconds"] < 60
