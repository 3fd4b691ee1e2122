"""The queue as an attacker with write access to Redis would use it, against real worker
processes: malformed messages, messages for runs and batches they do not own, forged
redelivered flags, and passwords in the settings. The worker lives on, no row of any run
changes, no other run's payload is touched and no secret is printed (docs/faults.md,
"Hostile queue")."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from sqlalchemy import text

from core import wire
from db.session import get_engine
from tests.support import wait_for_log

pytestmark = pytest.mark.integration

TABLES = ("models", "runs", "batches", "predictions")


def envelope(
    body: Any,
    queue: str,
    *,
    headers: dict[str, Any] | None = None,
    raw: bytes | None = None,
    redelivered: bool = False,
) -> tuple[str, bytes]:
    """A message as kombu keeps it in Redis (its id, its JSON), with a Celery protocol-2
    header set that ``headers`` overrides (a value of ``None`` drops that header)."""
    msg_id = uuid.uuid4().hex
    base: dict[str, Any] = {
        "lang": "py", "task": wire.TASK_NAME, "id": msg_id, "root_id": msg_id,
        "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
        "timelimit": [None, None], "origin": "attacker",
    }
    for key, value in (headers or {}).items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    delivery_info: dict[str, Any] = {"exchange": queue, "routing_key": queue}
    if redelivered:
        base["redelivered"] = True
        delivery_info["redelivered"] = True
    data = raw if raw is not None else msgpack.packb(body, use_bin_type=True)
    message = {
        "body": base64.b64encode(data).decode("ascii"),
        "content-encoding": "binary",
        "content-type": "application/x-msgpack",
        "headers": base,
        "properties": {
            "correlation_id": msg_id, "delivery_mode": 2, "delivery_info": delivery_info,
            "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    return msg_id, json.dumps(message).encode()


def with_priority(data: bytes, priority: Any) -> bytes:
    """A stored message with its ``priority`` property replaced."""
    message = json.loads(data)
    message["properties"]["priority"] = priority
    return json.dumps(message).encode()


def push(broker_env: dict[str, str], *messages: tuple[str, bytes]) -> list[str]:
    """LPUSH crafted messages onto the workers' queue, in order; their ids."""
    queue = broker_env["DIGITSCORE_QUEUE"]
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    for _, data in messages:
        client.lpush(queue, data)
    return [msg_id for msg_id, _ in messages]


def dump(db_url: str) -> dict[str, list[tuple]]:
    """Every row of every table, in id order."""
    with get_engine(db_url).connect() as conn:
        return {t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY 1, 2, 3"))]
                for t in TABLES}


def payloads(broker_env: dict[str, str]) -> dict[bytes, bytes]:
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    return {k: client.get(k) for k in client.scan_iter(f"{wire.PAYLOAD_PREFIX}*")}


def run_token(db_url: str, run_id: int) -> str:
    with get_engine(db_url).connect() as conn:
        return conn.execute(text("SELECT token FROM runs WHERE id = :r"), {"r": run_id}).scalar()


def done_by_worker(worker, msg_id: str) -> None:
    """Wait until the worker has finished the task of message ``msg_id``."""
    wait_for_log(worker, f"[{msg_id}] succeeded", timeout=60)


def assert_scores_a_real_submit(run_cli, sample_dir: Path, db_url: str, run_id: int) -> None:
    r = run_cli("submit", str(sample_dir / "valid"), "--wait", "--database-url", db_url)
    assert r.exit_code == 0, r.output
    with get_engine(db_url).connect() as conn:
        scored, failed, status = conn.execute(text(
            "SELECT n_scored, n_failed, status FROM runs WHERE id = :r"), {"r": run_id}).one()
        rows = conn.execute(text(
            "SELECT COUNT(*) FROM predictions WHERE run_id = :r AND error IS NULL "
            "AND pred_l1 IS NOT NULL"), {"r": run_id}).scalar()
    assert (scored, failed, status, rows) == (200, 0, "done", 200)


@pytest.fixture
def worker(model_db, broker_env, start_worker):
    proc = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu")
    wait_for_log(proc, "ready.")
    return proc


def test_malformed_messages_are_dropped_and_the_worker_scores_on(
    worker, broker_env, model_db, run_cli, sample_dir
):
    queue = broker_env["DIGITSCORE_QUEUE"]
    token = "0" * 32
    bad = [
        envelope({"not": "a list"}, queue),
        envelope(5, queue),
        envelope([1, 2], queue),
        envelope([[1, 2], {}, {}], queue),  # two arguments
        envelope([["1", 0, token], {}, {}], queue),  # a run id that is text
        envelope([[1, 0, 7], {}, {}], queue),  # a token that is a number
        envelope([[1, 0, token], {"paths": ["/etc/passwd"]}, {}], queue),
        envelope([[1, 0, token], {}, {"callbacks": [{"task": "x"}]}], queue),
        envelope([[1, 0, "x" * 200_000], {}, {}], queue),  # a huge body
        envelope(None, queue, raw=b"\xc1\xc1 not msgpack"),
        envelope([[1, 0, token], {}, {}], queue, headers={"retries": "many"}),
        envelope([[1, 0, token], {}, {}], queue, headers={"eta": "tomorrow"}),
        envelope([[1, 0, token], {}, {}], queue, headers={"timelimit": "forever"}),
        envelope([[1, 0, token], {}, {}], queue, headers={"id": 12}),
    ]
    unknown = [
        envelope([[1, 0, token], {}, {}], queue, headers={"task": "os.system"}),
        envelope(5, queue, headers={"task": "os.system", "id": None}),
        envelope({"task": wire.TASK_NAME, "args": [1, 0, token]}, queue,
                 headers={"task": None}),  # protocol 1
    ]
    not_kombu = [
        b"not json at all",
        b"\xff\xfe",
        b"[" * 200_000,  # deeper than the JSON parser recurses
        json.dumps([1, 2]).encode(),
        json.dumps({"body": "eA==", "headers": {}}).encode(),  # no properties
        envelope([[1, 0, token], {}, {}], queue)[1].replace(b'"base64"', b'"rot13"'),
        # priorities kombu would clamp, or fail on where it restores a message
        *(with_priority(envelope([[1, 0, token], {}, {}], queue)[1], p)
          for p in (10, -1, "high", 2.5, 1e400)),
    ]
    ids = push(broker_env, *bad, *unknown, *(("-", e) for e in not_kombu))[:-len(not_kombu)]
    log = wait_for_log(worker, "dropped: ", count=len(ids) + len(not_kombu), timeout=60)
    assert log.count("that is not JSON was dropped") == 3
    assert log.count("that is not a kombu message was dropped") == 8
    assert log.count("is not one of [0, 1, 2, 3, 4, 5]") == 5
    for msg_id in ids[:-4]:  # the last four are dropped under their delivery tags
        assert f"message {msg_id!r} dropped: " in log
    for reason in ("body is not [args, kwargs, embed]", "body of 200", "unknown task 'os.system'",
                   "body cannot be decoded", "header 'task' is not a string"):
        assert reason in log
    assert worker.poll() is None
    assert "Unrecoverable error" not in log
    assert_scores_a_real_submit(run_cli, sample_dir, model_db, run_id=1)
    assert worker.poll() is None


def finished_by_worker(worker, *msg_ids: str, timeout: float = 60) -> str:
    """Wait until the worker has run the task of each message (whether it returned or
    raised); return its log."""
    deadline = time.monotonic() + timeout
    while True:
        log = Path(worker.log_path).read_text(errors="replace")
        if all(re.search(rf"\[{m}\] (succeeded|raised)", log) for m in msg_ids):
            return log
        assert worker.poll() is None, log[-3000:]
        assert time.monotonic() < deadline, f"tasks not run after {timeout} s:\n{log[-3000:]}"
        time.sleep(0.2)


def queue_without_worker(run_cli, sample_dir: Path, db_url: str, broker_env, *args: str) -> str:
    """Submit the validation digits to a queue of their own that no worker reads: a run whose
    batches are recorded and whose payloads wait in Redis. Returns that queue's name."""
    side = broker_env["DIGITSCORE_QUEUE"] + "-side"
    r = run_cli("submit", str(sample_dir / "valid"), "--database-url", db_url, *args,
                env={"DIGITSCORE_QUEUE": side})
    assert r.exit_code == 0, r.output
    return side


def hand_over(broker_env: dict[str, str], side: str) -> int:
    """Move the genuine messages of the side queue to the workers' queue; how many."""
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    moved = 0
    targets = wire.queue_lists(broker_env["DIGITSCORE_QUEUE"])
    for source, target in zip(wire.queue_lists(side), targets, strict=True):
        while client.rpoplpush(source, target) is not None:
            moved += 1
        client.delete(source)
    return moved


def wait_done(db_url: str, run_id: int, timeout: float = 60) -> None:
    """Poll the run's status, holding no read lock between two looks (SQLite)."""
    deadline = time.monotonic() + timeout
    while True:
        with get_engine(db_url).connect() as conn:
            status = conn.execute(text("SELECT status FROM runs WHERE id = :r"),
                                  {"r": run_id}).scalar()
        if status == "done":
            return
        assert time.monotonic() < deadline, f"run {run_id} not done after {timeout} s"
        time.sleep(0.3)


def test_a_message_for_a_finished_run_or_an_unrecorded_batch_changes_no_row(
    worker, broker_env, model_db, run_cli, sample_dir
):
    assert_scores_a_real_submit(run_cli, sample_dir, model_db, run_id=1)
    queue = broker_env["DIGITSCORE_QUEUE"]
    token = run_token(model_db, 1)
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    # the attacker also writes image bytes where the worker would look for batch 9999's
    digit = sorted((sample_dir / "valid" / "3").glob("*.png"))[0].read_bytes()
    for seq in (9999, 0):
        client.set(wire.payload_key(wire.BatchMessage(1, seq, token)),
                   wire.pack_payload([digit] * 3, [None] * 3))
    client.set("precious", b"not a payload")
    before = dump(model_db)
    ids = push(broker_env,
               envelope([[1, 9999, token], {}, {}], queue),  # an unrecorded batch
               envelope([[1, 0, token], {}, {}], queue),  # a finished batch
               envelope([[1, 0, token], {}, {}], queue, redelivered=True),
               envelope([[2, 0, token], {}, {}], queue))  # a run that does not exist
    log = finished_by_worker(worker, *ids)
    assert "run 1 has no recorded batch 9999" in log
    assert "run 2 is not in this database" in log
    assert dump(model_db) == before
    assert payloads(broker_env) == {}  # each message deleted its own batch's key, no other
    assert client.get("precious") == b"not a payload"
    r = run_cli("status", "1", "--database-url", model_db)
    assert "200/200" in r.output, r.output


def test_a_message_with_another_runs_id_and_a_wrong_token_touches_nothing(
    worker, broker_env, model_db, run_cli, sample_dir
):
    side = queue_without_worker(run_cli, sample_dir, model_db, broker_env,
                                "--batch-size", "50")  # the victim: run 1, 4 batches waiting
    assert_scores_a_real_submit(run_cli, sample_dir, model_db, run_id=2)  # the attacker's
    queue = broker_env["DIGITSCORE_QUEUE"]
    victim_payloads = payloads(broker_env)
    assert len(victim_payloads) == 4
    before = dump(model_db)
    attacker = run_token(model_db, 2)
    ids = push(broker_env, *(
        envelope([[1, seq, token], {}, {}], queue)
        for seq in range(4) for token in (attacker, "f" * 32)
    ), envelope([[2, 0, run_token(model_db, 1)], {}, {}], queue),
        envelope([[1, 99, run_token(model_db, 1)], {}, {}], queue))  # the right token
    log = finished_by_worker(worker, *ids)
    assert log.count("of this database has another token") == 9
    assert "run 1 has no recorded batch 99" in log  # the queued victim is not made done
    assert dump(model_db) == before
    assert payloads(broker_env) == victim_payloads
    # and the victim's own messages still score it whole
    assert hand_over(broker_env, side) == 4
    wait_done(model_db, 1)
    with get_engine(model_db).connect() as conn:
        assert conn.execute(text(
            "SELECT n_scored, n_failed, status FROM runs WHERE id = 1")).one() == (200, 0, "done")
    assert payloads(broker_env) == {}


def test_forged_redelivered_flags_turn_no_image_into_an_error_row(
    worker, broker_env, model_db, run_cli, sample_dir
):
    """Copies of a real batch's message flagged redelivered, sent while its payload is out of
    reach (each copy then fails), count no death: when the payload is back, the genuine
    message scores every image."""
    side = queue_without_worker(run_cli, sample_dir, model_db, broker_env,
                                "--batch-size", "100")
    queue = broker_env["DIGITSCORE_QUEUE"]
    token = run_token(model_db, 1)
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    key = wire.payload_key(wire.BatchMessage(1, 0, token))
    client.rename(key, "hidden")
    ids = push(broker_env, *(envelope([[1, 0, token], {}, {}], queue, redelivered=True)
                             for _ in range(5)))
    log = finished_by_worker(worker, *ids)
    assert all(re.search(rf"\[{m}\] raised .*image bytes are gone", log) for m in ids)
    client.rename("hidden", key)
    assert hand_over(broker_env, side) == 2
    wait_done(model_db, 1)
    with get_engine(model_db).connect() as conn:
        assert conn.execute(text(
            "SELECT n_scored, n_failed, status FROM runs WHERE id = 1")).one() == (200, 0, "done")
        assert conn.execute(text(
            "SELECT seq, status, deliveries FROM batches ORDER BY seq")).all() == [
            (0, "done", 1), (1, "done", 1)]
        assert conn.execute(text(
            "SELECT COUNT(*) FROM predictions WHERE error IS NOT NULL")).scalar() == 0


REDIS_PW = "Sup3r#S3/cret@x"  # reserved characters: percent-escaped in a URL that works
PG_PW = "S3cretQuery"  # in the query string (trust auth takes any password)
SECRETS = ("Sup3r", "S3/cret", "S3%2Fcret", "cret@x", "cret%40x", PG_PW)


@pytest.fixture
def redis_with_reserved_password(tmp_path: Path, redis_server: str):
    """A redis-server of this test's own whose password holds ``#``, ``/`` and ``@``; its
    URL with the password escaped."""
    from urllib.parse import quote

    from tests.tcp_proxy import free_port

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", REDIS_PW],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://:{quote(REDIS_PW, safe='')}@127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
            break
        except redis.RedisError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield url
    proc.kill()
    proc.wait()


def test_no_secret_is_printed_by_a_real_worker_or_the_producer(
    run_cli, sample_dir, postgres_url, redis_with_reserved_password, start_worker, classifier
):
    """A database password in ``?password=``, a Redis password with ``#``, ``/`` and ``@``
    (escaped, so it works; then unescaped, so no parser can take it apart): the worker's
    banner and log, the producer's output and its errors show none of it."""
    from tests.support import save_model

    db_url = f"{postgres_url}?password={PG_PW}"
    save_model(db_url, classifier)
    queue = f"digitscore-test-{uuid.uuid4().hex[:10]}"
    env = {"DIGITSCORE_BROKER_URL": redis_with_reserved_password,
           "DIGITSCORE_DATABASE_URL": db_url, "DIGITSCORE_QUEUE": queue}
    worker = start_worker(env, "--device", "cpu")
    banner = wait_for_log(worker, "ready.")
    assert "database postgresql" in banner and "127.0.0.1" in banner
    outputs = []
    r = run_cli("submit", str(sample_dir / "valid"), "--wait", env=env)
    assert r.exit_code == 0, r.output
    outputs.append(r.output)
    for cmd in (["status", "1"], ["report", "1", "--json"], ["models", "--json"]):
        outputs.append(run_cli(*cmd, env=env).output)
    with get_engine(db_url).connect() as conn:
        assert conn.execute(text("SELECT n_scored FROM runs")).scalar() == 200
    unescaped = redis_with_reserved_password.replace(
        redis_with_reserved_password.split("@127")[0].removeprefix("redis://:"), REDIS_PW)
    bad_env = {**env, "DIGITSCORE_BROKER_URL": unescaped}
    refused = start_worker(bad_env, "--device", "cpu", name="unescaped")
    assert refused.wait(30) == 2
    r = run_cli("submit", str(sample_dir / "valid"), env=bad_env)
    assert r.exit_code != 0 and "cannot be parsed" in r.output, r.output
    outputs.append(r.output)
    logs = [Path(p.log_path).read_text() for p in (worker, refused)]
    assert "cannot be parsed" in logs[1]
    for text_ in [*logs, *outputs]:
        for secret in SECRETS:
            assert secret not in text_


SECRET = "a-secret-of-the-test-4b1e9d27c3"


def test_with_a_secret_only_signed_messages_and_their_own_payloads_are_scored(
    model_db, broker_env, start_worker, run_cli, sample_dir, monkeypatch
):
    """DIGITSCORE_SECRET on the producer and the worker: a real submit is scored; a message
    with no signature or one made with another secret is dropped before Celery reads it, even
    with the run's real token; a queued batch's payload replaced by other image bytes is not
    scored, and is once the producer's bytes are back."""
    monkeypatch.setenv("DIGITSCORE_SECRET", SECRET)
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db,
                           "DIGITSCORE_SECRET": SECRET}, "--device", "cpu")
    assert "signed messages only" in wait_for_log(worker, "ready.")
    side = queue_without_worker(run_cli, sample_dir, model_db, broker_env,
                                "--batch-size", "100")  # run 1: two batches waiting
    queue = broker_env["DIGITSCORE_QUEUE"]
    token = run_token(model_db, 1)
    before = dump(model_db)
    forged = wire.signature_headers(b"another-secret-of-32-characters", wire.BatchMessage(
        1, 0, token), b"payload")
    ids = push(broker_env, envelope([[1, 0, token], {}, {}], queue),
               envelope([[1, 1, token], {}, {}], queue, headers=forged))
    log = wait_for_log(worker, "dropped: ", count=2)
    assert f"message {ids[0]!r} dropped: not signed" in log
    assert f"message {ids[1]!r} dropped: bad signature" in log
    assert dump(model_db) == before
    # someone who read the token writes other digits under batch 0's payload key
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    key = wire.payload_key(wire.BatchMessage(1, 0, token))
    genuine = client.get(key)
    sevens = sorted((sample_dir / "valid" / "7").glob("*.png"))
    client.set(key, wire.pack_payload([sevens[i % 20].read_bytes() for i in range(100)],
                                      [None] * 100))
    boosted = wire.queue_lists(side)[wire.message_priority("normal", 0)]  # batches 0 and 1
    first = client.lrange(boosted, -1, -1)[0]  # batch 0's genuine message, next out
    client.rpush(queue, first)
    wait_for_log(worker, "not those its producer signed")
    assert dump(model_db) == before
    client.set(key, genuine)
    assert hand_over(broker_env, side) == 2
    wait_done(model_db, 1)
    with get_engine(model_db).connect() as conn:
        assert conn.execute(text(
            "SELECT n_scored, n_failed FROM runs WHERE id = 1")).one() == (200, 0)


def test_payloads_and_batches_beyond_the_producers_limits_are_refused(
    model_db, broker_env, start_worker, run_cli, sample_dir
):
    """A queued batch's payload replaced by one holding a 5 MiB blob, or 500,000 items: the
    worker refuses it before decoding anything and writes nothing. A recorded batch larger
    than the worker's DIGITSCORE_MAX_BATCH_IMAGES is dropped unscored. The worker lives on."""
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db,
                           "DIGITSCORE_MAX_BATCH_IMAGES": "150"}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    side = queue_without_worker(run_cli, sample_dir, model_db, broker_env, "--batch-size", "100")
    queue_without_worker(run_cli, sample_dir, model_db, broker_env, "--batch-size", "200")
    token = run_token(model_db, 1)
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    client.set(wire.payload_key(wire.BatchMessage(1, 0, token)),
               wire.pack_payload([b"\0" * (5 * 1024 * 1024)] + [None] * 99, [None] * 100))
    client.set(wire.payload_key(wire.BatchMessage(1, 1, token)),
               wire.pack_payload([None] * 500_000, [None] * 500_000))
    before = dump(model_db)
    assert hand_over(broker_env, side) == 3  # run 1's two batches, run 2's one
    log = wait_for_log(worker, "run 2 batch 0 holds 200 images, more than "
                               "DIGITSCORE_MAX_BATCH_IMAGES=150: dropped unscored")
    log = wait_for_log(worker, "payload is not what a producer writes", count=2)
    assert "exceeds max_bin_len" in log and "exceeds max_array_len" in log
    assert dump(model_db) == before
    assert worker.poll() is None
