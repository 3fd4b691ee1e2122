"""Shards through real workers: ``--send paths`` batches read from the archive by the worker,
bit for bit the loose files' predictions; nothing outside an archive read by a hostile
member; every member stored once under a SIGKILLed worker and a killed, resumed producer."""

from __future__ import annotations

import io
import os
import shutil
import signal
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import text

from db.session import get_engine
from tests.support import (
    FAULTS,
    assert_exactly_once,
    copy_digits,
    digit_files,
    pool_children,
    predictions,
    run_row,
    save_model,
    submit,
    submit_in_background,
    wait_done,
    wait_for_log,
)

pytestmark = pytest.mark.integration
COMPARED = ("label", "pred_l1", "pred_l2", "pred_sgd", "dist_l1", "dist_l2", "prob_sgd", "error")


def member(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if data else None)


def untouched(path: Path) -> Path:
    """``path`` with an access time in 1970: any read of it moves that (relatime updates an
    access time older than a day), which a control read proves here first."""
    control = path.with_name("control")
    control.write_bytes(b"x")
    os.utime(control, (1, 2))
    control.read_bytes()
    if os.stat(control).st_atime == 1:
        pytest.skip("this file system does not record reads in the access time")
    os.utime(path, (1, 2))
    return path


def test_workers_read_shards_as_the_loose_files_bit_for_bit_and_nothing_outside(
    run_cli, sample_dir, model_db, broker_env, start_worker, tmp_path
):
    loose = tmp_path / "loose"
    rels = copy_digits(sample_dir, loose, per_class=15)
    shards = tmp_path / "data" / "shards"
    assert run_cli("pack", str(loose), str(shards), "--images-per-shard", "12").exit_code == 0
    with zipfile.ZipFile(shards / "all.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for rel in rels:
            zf.write(loose / rel, rel)
    with tarfile.open(shards / "all.tgz", "w:gz") as tf:
        for rel in rels:
            tf.add(loose / rel, rel)
    # a hostile archive: names that lead out, links out, beside a file that must stay unread
    secret = tmp_path / "data" / "outside.png"
    shutil.copyfile(digit_files(sample_dir, "7", 1)[0], secret)
    untouched(secret)
    digit = digit_files(sample_dir, "3", 1)[0].read_bytes()
    with tarfile.open(shards / "evil.tar", "w") as tf:
        member(tf, "../outside.png", digit)
        member(tf, str(secret), digit)
        member(tf, "3/link.png", type=tarfile.SYMTYPE, linkname="../../outside.png")
        member(tf, "3/hard.png", type=tarfile.LNKTYPE, linkname="../outside.png")
    before = sorted(p.name for p in (tmp_path / "data").iterdir())

    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    r = submit(run_cli, loose, model_db, "--send", "paths", "--wait")
    assert r.exit_code == 0, r.output
    r = submit(run_cli, shards, model_db, "--send", "paths", "--batch-size", "8", "--wait")
    assert r.exit_code == 0, r.output
    want = {rel: tuple(row[c] for c in COMPARED) for rel, row in predictions(model_db, 1).items()}
    rows = predictions(model_db, 2)
    for prefix in ("all.zip/", "all.tgz/"):
        got = {p[len(prefix):]: tuple(row[c] for c in COMPARED)
               for p, row in rows.items() if p.startswith(prefix)}
        assert got == want, prefix
    packed = {p.split("/", 1)[1]: tuple(row[c] for c in COMPARED)
              for p, row in rows.items() if p.startswith("shard-")}
    assert packed == want
    # the hostile members: their own bytes scored as data, the links refused, nothing opened
    assert rows["evil.tar/../outside.png"]["error"] is None
    assert rows[f"evil.tar/{secret}"]["error"] is None  # an absolute name, as data
    assert rows["evil.tar/3/link.png"]["error"].endswith("a symbolic link")
    assert rows["evil.tar/3/hard.png"]["error"].endswith("a hard link")
    assert os.stat(secret).st_atime == 1
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == before


def test_every_member_is_stored_once_under_a_killed_worker_and_a_resumed_producer(
    run_cli, classifier, sample_dir, tmp_path, sqlite_url, broker_env, start_worker
):
    save_model(sqlite_url, classifier)
    shards = tmp_path / "shards"
    assert run_cli("pack", str(sample_dir / "valid"), str(shards), "--images-per-shard", "50"
                   ).exit_code == 0
    # the producer, in bytes mode with little room in Redis and no worker, stops part way
    env = {**broker_env, "DIGITSCORE_MAX_QUEUED_BYTES": "20000"}
    producer = submit_in_background(sqlite_url, shards, env, "--batch-size", "10")
    engine = get_engine(sqlite_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(text("SELECT COUNT(*) FROM batches")).scalar() >= 3:
                break
        time.sleep(0.05)
    producer.kill()
    producer.wait()
    assert run_row(sqlite_url)["submitted_at"] is None  # killed mid-walk
    worker_env = {**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url,
                  "DIGITSCORE_VISIBILITY_TIMEOUT": "5", "DIGITSCORE_TEST_TASK_DELAY": "0.3"}
    worker = start_worker(worker_env, "--device", "cpu", *FAULTS)
    wait_for_log(worker, "ready.")
    kills = 0
    while kills < 2:
        wait_for_log(worker, "received", count=kills + 1)
        time.sleep(0.1)
        victims = pool_children(worker)
        if victims:
            os.kill(victims[0], signal.SIGKILL)
            kills += 1
    r = run_cli("resume", "1", "--wait", "--database-url", sqlite_url, env=broker_env)
    assert r.exit_code == 0, r.output
    wait_done(sqlite_url, timeout=60)
    assert_exactly_once(sqlite_url, 200)
    assert run_row(sqlite_url)["n_failed"] == 0


def test_a_shard_batch_stopped_by_the_time_limit_is_split_and_read_from_its_archive(
    run_cli, sample_dir, model_db, broker_env, start_worker, tmp_path
):
    """A batch of 100 members of one tar, on a device too slow for the time limit (20 ms an
    image, a limit of 1 s): split like a batch of loose files, each half keeping its part of
    the archive's record, so that the worker reads its members from the archive: every image
    once, labelled, none failed (before: the halves lost the record, and each of their
    members was an error row, not found as a file)."""
    loose = tmp_path / "loose"
    rels = copy_digits(sample_dir, loose, per_class=50)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "digits.tar", "w") as tf:
        for rel in rels:
            tf.add(loose / rel, rel)
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": model_db, "DIGITSCORE_TEST_IMAGE_DELAY":
           "0.02", "DIGITSCORE_VISIBILITY_TIMEOUT": "2"}  # a task time limit of 1 s
    worker = start_worker(env, "--device", "cpu", *FAULTS)
    wait_for_log(worker, "ready.")
    r = submit(run_cli, data, model_db, "--send", "paths", "--batch-size", "100")
    assert r.exit_code == 0, r.output
    wait_done(model_db, timeout=120)
    assert_exactly_once(model_db, 100)
    assert run_row(model_db)["n_failed"] == 0
    with get_engine(model_db).connect() as conn:
        found = conn.execute(text("SELECT seq, status, n_images, members FROM batches "
                                  "ORDER BY seq")).all()
    assert (found[0].status, found[0].n_images) == ("split", 100)
    assert {b.status for b in found} == {"split", "done"}
    assert all(b.members is not None for b in found)
    rows = predictions(model_db)
    assert sorted(rows) == sorted(f"digits.tar/{rel}" for rel in rels)
    assert all(row["label"] == path.split("/")[1] for path, row in rows.items())
