"""The wire (core/wire.py) without a server: the one message, the payload, what is refused,
and the task's handling of a batch through its own code (fakeredis for the payload store)."""

from __future__ import annotations

from dataclasses import replace

import fakeredis
import msgpack
import pytest
from sqlalchemy import text

from core import defaults, wire
from core.errors import BrokerURLError, MessageError
from core.settings import SettingError, Settings
from db import batch_life, queries
from db.session import get_engine
from tests.support import save_model

TOKEN = "0123456789abcdef" * 2


def test_message_arguments_are_checked():
    assert wire.BatchMessage.from_args([1, 2, TOKEN]) == wire.BatchMessage(1, 2, TOKEN)
    assert list(wire.BatchMessage(1, 2, TOKEN)) == [1, 2, TOKEN]
    bad = [
        ({"not": "a list"}, "run_id, seq, token"),
        (5, "run_id, seq, token"),
        ([1, 2], "run_id, seq, token"),
        (["1", 2, TOKEN], "run_id must be"),
        ([1, -2, TOKEN], "seq must be"),
        ([1, True, TOKEN], "seq must be"),
        ([1, 2**64, TOKEN], "seq must be"),
        ([1, 2, "x" * 32], "token must be"),
        ([1, 2, None], "token must be"),
    ]
    for args, reason in bad:
        with pytest.raises(MessageError, match=reason):
            wire.BatchMessage.from_args(args)
    with pytest.raises(MessageError, match="keyword"):
        wire.BatchMessage.from_args([1, 2, TOKEN], {"paths": ["/etc/passwd"]})


def test_bodies_and_headers_that_do_not_fit_are_refused():
    good = [[1, 2, TOKEN], {}, {"callbacks": None, "errbacks": None, "chain": None}]
    headers = {"task": wire.TASK_NAME, "id": "x"}
    assert wire.check_delivery(headers, 60, lambda: good) == wire.BatchMessage(1, 2, TOKEN)
    for name, body, size, reason in [
        ("other.task", good, 60, "unknown task"),
        (wire.TASK_NAME, good, 10**6, "bytes"),
        (wire.TASK_NAME, {"not": "a list"}, 10, "args, kwargs, embed"),
        (wire.TASK_NAME, [[1, 2, TOKEN], {}, None], 10, "args, kwargs, embed"),
        (wire.TASK_NAME, [[1, 2, TOKEN], {}, {"chain": [{"task": "x"}]}], 10, "chains"),
    ]:
        with pytest.raises(MessageError, match=reason):
            wire.check_delivery({**headers, "task": name}, size, lambda b=body: b)
    headers = {"task": wire.TASK_NAME, "id": "x", "retries": 0, "eta": None}
    wire.check_headers(headers)
    wire.check_headers({**headers, "retries": wire.MAX_RETRIES, "timelimit": [None, None]})
    for change, reason in [
        ({"id": 5}, "'id'"),
        ({"retries": "3"}, "retries"),
        ({"eta": "tomorrow"}, "eta"),
        ({"expires": 12}, "expires"),
        ({"retries": 2**40}, "retries"),  # would overflow the deliveries column
        ({"retries": -1}, "retries"),
        ({"timelimit": "x"}, "timelimit"),
        ({"timelimit": [0.5, None]}, "timelimit"),  # would kill every delivery
        ({"timelimit": [None, 1]}, "timelimit"),
        ({"timelimit": [None]}, "timelimit"),
        ({"group": ["x"]}, "group"),
    ]:
        with pytest.raises(MessageError, match=reason):
            wire.check_headers({**headers, **change})


def test_a_delivery_is_checked_before_its_body_is_decoded():
    """Headers, task name and size first; the body is decoded only when they fit, and a
    decoder's error is a refusal like any other."""
    headers = {"task": wire.TASK_NAME, "id": "x"}
    body = [[1, 2, TOKEN], {}, {}]
    decoded: list[int] = []

    def decode():
        decoded.append(1)
        return body

    assert wire.check_delivery(headers, 60, decode) == wire.BatchMessage(1, 2, TOKEN)
    for hdrs, size, reason in [
        ({**headers, "task": "os.system"}, 60, "unknown task 'os.system'"),
        ({"id": "x"}, 60, "header 'task'"),
        (None, 60, "headers are not a map"),
        (headers, 10**6, "body of 1000000 bytes"),
    ]:
        with pytest.raises(MessageError, match=reason):
            wire.check_delivery(hdrs, size, decode)
    assert len(decoded) == 1

    def broken():
        raise ValueError("unpack(b) received extra data")

    with pytest.raises(MessageError, match="body cannot be decoded: ValueError"):
        wire.check_delivery(headers, 60, broken)


def test_signed_messages_and_payloads_are_checked():
    """With a secret, a delivery passes only with the HMAC of its task, arguments and payload
    digest; the payload must then have that digest."""
    secret = b"s" * 32
    message = wire.BatchMessage(1, 2, TOKEN)
    payload = wire.pack_payload([b"png"], [None])
    signed = {"task": wire.TASK_NAME, "id": "x",
              **wire.signature_headers(secret, message, payload)}
    body = [list(message), {}, {}]
    assert wire.check_delivery(signed, 60, lambda: body, secret) == message
    wire.check_payload_digest(signed[wire.PAYLOAD_DIGEST_HEADER], payload)
    other = [[1, 3, TOKEN], {}, {}]
    for headers, decoded, key, reason in [
        ({"task": wire.TASK_NAME, "id": "x"}, body, secret, "not signed"),
        (signed, other, secret, "bad signature"),  # signed for another batch
        (signed, body, b"t" * 32, "bad signature"),  # another secret
        ({**signed, wire.PAYLOAD_DIGEST_HEADER: "0" * 64}, body, secret, "bad signature"),
        ({**signed, wire.SIGNATURE_HEADER: 5}, body, secret, "bad signature"),
        ({**signed, wire.SIGNATURE_HEADER: "é" * 64}, body, secret, "bad signature"),
        ({**signed, wire.PAYLOAD_DIGEST_HEADER: "é" * 64}, body, secret, "bad signature"),
    ]:
        with pytest.raises(MessageError, match=reason):
            wire.check_delivery(headers, 60, lambda d=decoded: d, key)
    for digest in (None, "0" * 64, 7, "é"):
        with pytest.raises(MessageError, match="not those its producer signed"):
            wire.check_payload_digest(digest, payload)
    assert wire.check_delivery({"task": wire.TASK_NAME, "id": "x"}, 60, lambda: body) == message


def test_broker_urls_kombu_cannot_parse_are_refused_without_echoing_them():
    wire.check_broker_url("redis://:pa%23ss@127.0.0.1:6379/0")
    wire.check_broker_url("redis://:pa@ss@127.0.0.1:6379/0")  # the last @ ends the password
    for url in ("redis://:Sup3r#S3cret@127.0.0.1:6379/0", "redis://:Sup3r/S3cret@host:6379/0"):
        with pytest.raises(BrokerURLError, match="cannot be parsed") as e:
            wire.check_broker_url(url)
        assert "Sup3r" not in str(e.value) and "S3cret" not in str(e.value)


def test_payload_round_trip_and_what_is_refused():
    blobs, errors = [b"\x89PNG...", None, b""], [None, "file could not be read: gone", None]
    assert wire.unpack_payload(wire.pack_payload(blobs, errors), 3) == (blobs, errors)
    with pytest.raises(ValueError, match="2 images but 1 read error$"):
        wire.pack_payload([b"a", b"b"], [None])
    bad = {
        b"\xc1": "not what a producer writes",
        msgpack.packb([[b"a"], [None]]) + b"x": "not what a producer writes",
        msgpack.packb([[b"a"], [None], []]): "max_array_len",
        msgpack.packb([["text"], [None]], use_bin_type=True): "bytes or nil",
        msgpack.packb([[b"a"], [3]], use_bin_type=True): "strings or nil",
        msgpack.packb({"blobs": []}): "not what a producer writes",
        msgpack.packb([[b"x" * 20], [None]], use_bin_type=True): "not what a producer writes",
    }
    for data, reason in bad.items():
        with pytest.raises(MessageError, match=reason):
            wire.unpack_payload(data, 1, max_file_bytes=10)


def test_the_app_accepts_msgpack_only_and_needs_a_broker():
    app = wire.make_app(Settings(broker_url="memory://"))
    assert app.conf.accept_content == ["msgpack"]
    assert app.conf.task_serializer == "msgpack"
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    vt = app.conf.broker_transport_options["visibility_timeout"]
    assert vt == app.conf.result_backend_transport_options["visibility_timeout"] == 600
    with pytest.raises(BrokerURLError, match="no broker"):
        wire.make_app(Settings())


def test_task_events_are_off_unless_asked_for_and_bad_values_are_refused():
    broker = {"DIGITSCORE_BROKER_URL": "memory://"}
    app = wire.make_app(Settings.from_env(broker))
    assert not app.conf.worker_send_task_events and not app.conf.task_send_sent_event
    app = wire.make_app(Settings.from_env({**broker, "DIGITSCORE_TASK_EVENTS": "1"}))
    assert app.conf.worker_send_task_events and app.conf.task_send_sent_event
    with pytest.raises(SettingError, match="DIGITSCORE_TASK_EVENTS='maybe': use 1 or 0"):
        Settings.from_env({**broker, "DIGITSCORE_TASK_EVENTS": "maybe"})


class FakeTask:
    class request:  # noqa: N801 - Celery's attribute name
        retries = 0
        delivery_info: dict = {}


def test_the_task_scores_what_the_database_recorded_and_nothing_else(
    monkeypatch, classifier, sample_dir, tmp_path
):
    """The paths come from the batch's record; a wrong token, an unknown run or batch, or a
    finished batch writes nothing; the payload key is deleted in each case."""
    monkeypatch.setenv(defaults.BROKER_URL_ENV, "memory://")
    from worker import tasks

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    monkeypatch.setattr(tasks, "SETTINGS", replace(tasks.SETTINGS, database_url=url))
    engine = get_engine(url)
    model_id = save_model(engine, classifier)
    files = sorted((sample_dir / "valid" / "3").glob("*.png"))[:6]
    paths = [f"3/{f.name}" for f in files]
    blobs: list[bytes | None] = [f.read_bytes() for f in files]
    with engine.begin() as conn:
        run_id, token = queries.create_run(conn, model_id, str(sample_dir / "valid"), "celery")
        batch_life.record_batch(conn, run_id, 0, paths[:3], 0)
        batch_life.record_batch(conn, run_id, 1, paths[3:], 0)
    store = fakeredis.FakeRedis()
    monkeypatch.setattr(tasks, "payload_store", lambda: store)
    for seq in (0, 1):
        part = slice(3 * seq, 3 * seq + 3)
        store.set(wire.payload_key(wire.BatchMessage(run_id, seq, token)),
                  wire.pack_payload(blobs[part], [None] * 3))
    other = "f" * 32
    for message in (
        wire.BatchMessage(run_id, 0, other),  # another database's run 1
        wire.BatchMessage(run_id + 1, 0, token),  # no such run
        wire.BatchMessage(run_id, 9, token),  # no such batch
    ):
        assert tasks.handle_batch(FakeTask, message) == 0
    assert store.get(wire.payload_key(wire.BatchMessage(run_id, 0, token)))  # not another's
    assert tasks.handle_batch(FakeTask, wire.BatchMessage(run_id, 0, token)) == 3
    assert tasks.handle_batch(FakeTask, wire.BatchMessage(run_id, 1, token)) == 3
    store.set(wire.payload_key(wire.BatchMessage(run_id, 1, token)),
              wire.pack_payload(blobs[:3], [None] * 3))
    assert tasks.handle_batch(FakeTask, wire.BatchMessage(run_id, 1, token)) == 0  # finished
    assert store.keys() == []
    with engine.connect() as conn:
        stored = conn.execute(text(
            "SELECT path, batch_seq FROM predictions WHERE error IS NULL")).all()
    assert sorted(tuple(r) for r in stored) == sorted((p, i // 3) for i, p in enumerate(paths))


class RedeliveredTask:
    class request:  # noqa: N801 - Celery's attribute name
        retries = 0
        delivery_info: dict = {"redelivered": True}


def test_only_counted_deaths_make_a_batch_poison_and_a_batch_too_large_is_dropped(
    monkeypatch, classifier, sample_dir, tmp_path
):
    """A redelivered flag counts nothing: the batch is scored. Three deaths counted against
    it (as the Celery main process counts them) make it poison. A recorded batch above
    DIGITSCORE_MAX_BATCH_IMAGES is dropped unscored and stays queued."""
    monkeypatch.setenv(defaults.BROKER_URL_ENV, "memory://")
    from worker import tasks

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    monkeypatch.setattr(tasks, "SETTINGS", replace(tasks.SETTINGS, database_url=url))
    engine = get_engine(url)
    model_id = save_model(engine, classifier)
    files = sorted((sample_dir / "valid" / "3").glob("*.png"))[:9]
    paths = [f"3/{f.name}" for f in files]
    with engine.begin() as conn:
        run_id, token = queries.create_run(conn, model_id, str(sample_dir / "valid"), "celery")
        for seq in range(3):
            batch_life.record_batch(conn, run_id, seq, paths[3 * seq: 3 * seq + 3], 0)
    store = fakeredis.FakeRedis()
    monkeypatch.setattr(tasks, "payload_store", lambda: store)
    for seq in range(3):
        store.set(wire.payload_key(wire.BatchMessage(run_id, seq, token)), wire.pack_payload(
            [f.read_bytes() for f in files[3 * seq: 3 * seq + 3]], [None] * 3))
    for _ in range(3):  # three worker processes died holding batch 1
        batch_life.count_failed_delivery(engine, run_id, 1, token, "died")
    assert tasks.handle_batch(RedeliveredTask, wire.BatchMessage(run_id, 0, token)) == 3
    assert tasks.handle_batch(RedeliveredTask, wire.BatchMessage(run_id, 1, token)) == 3
    monkeypatch.setattr(tasks, "SETTINGS", replace(tasks.SETTINGS, max_batch_images=2))
    assert tasks.handle_batch(FakeTask, wire.BatchMessage(run_id, 2, token)) == 0
    assert store.keys() == []
    with engine.connect() as conn:
        errors = dict(conn.execute(text(
            "SELECT batch_seq, COUNT(error) FROM predictions GROUP BY batch_seq")).all())
        batches = conn.execute(text(
            "SELECT seq, status, deliveries FROM batches ORDER BY seq")).all()
    assert errors == {0: 0, 1: 3}
    assert [tuple(b) for b in batches] == [(0, "done", 1), (1, "failed", 4), (2, "queued", 0)]
