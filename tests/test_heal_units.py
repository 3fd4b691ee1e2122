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
from core.wire import TASK_NAME, queue_lists
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
    client.lpush(queue_lists("q")[3], json.dumps(stored(1, 1)))  # kombu's priority list
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


def test_a_split_checks_the_signed_digest_before_signing_the_halves(engine):
    """With a secret, a payload swapped in Redis is refused before the batch is split:
    the halves would be signed with the secret over bytes nobody checked."""
    from core import wire
    from core.errors import MessageError
    from core.settings import Settings
    from db.batch_life import RecordedBatch
    from worker.splitting import split_and_resend

    with engine.begin() as conn:
        run_id, _ = queries.create_run(conn, 1, "/data", "celery")
        batch_life.record_batch(conn, run_id, 0, ["a.png", "b.png"], 2)
    message = wire.BatchMessage(run_id, 0, TOKEN)
    signed = wire.pack_payload([b"a", b"b"], [None, None])
    store = fakeredis.FakeRedis()
    store.set(wire.payload_key(message), wire.pack_payload([b"X", b"Y"], [None, None]))
    settings = Settings(secret=b"s" * 32)
    batch = RecordedBatch(run_id, 0, 1, ["a.png", "b.png"], "queued", 2, 1, time_limited=1)
    digest = wire.signature_headers(settings.secret, message, signed)[wire.PAYLOAD_DIGEST_HEADER]
    with pytest.raises(MessageError, match="not those its producer signed"):
        split_and_resend(engine, store, None, settings, batch, message, digest)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT seq, status FROM batches")).all() == [(0, "queued")]


def test_with_a_secret_a_re_send_reads_the_files_again_instead_of_signing_redis_bytes():
    """A healer's re-send never signs a payload it finds in Redis (anyone who can write there
    could have swapped it): with a secret it reads the batch's files again. The broker here
    is unreachable, so a look at Redis would fail the test."""
    from core import wire
    from core.files import FileBatch
    from core.settings import Settings
    from producer.queue import CelerySender

    sent: list = []

    class Recording(CelerySender):
        def send(self, message, batch, priority="normal"):
            sent.append((message, batch))

    sender = Recording(Settings(broker_url="redis://127.0.0.1:1/0", secret=b"s" * 32))
    files = FileBatch(paths=["a.png"], blobs=[b"a"], errors=[None], n_bytes=1)
    message = wire.BatchMessage(1, 0, TOKEN)
    sender.resend(message, lambda: files)
    assert sent == [(message, files)]
