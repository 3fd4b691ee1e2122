"""``submit --send paths``: the producer sends only recorded paths and each worker reads the
files from the run's source directory, with the producer's rules, never outside it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from core import defaults
from core.files import OUTSIDE_ROOT, map_prefix, read_batch_below, read_below, read_file
from core.scoring import score_images
from core.settings import SettingError, Settings
from db.session import get_engine
from tests.support import (
    copy_digits,
    digit_files,
    predictions,
    query,
    queued_messages,
    submit,
    wait_done,
    wait_for_log,
    write_named,
)

COMPARED = ("label", "pred_l1", "pred_l2", "pred_sgd", "dist_l1", "dist_l2", "prob_sgd", "error")


def test_read_below_refuses_every_way_out_of_the_root(tmp_path, sample_dir):
    digit = digit_files(sample_dir, "3", 1)[0].read_bytes()
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(digit)
    (tmp_path / "outside.png").write_bytes(digit)
    (root / "link-out.png").symlink_to(tmp_path / "outside.png")
    (root / "link-in.png").symlink_to(root / "a.png")
    (root / "sub" / "up").symlink_to(tmp_path)  # a directory link out: its files are outside
    os.mkfifo(root / "pipe.png")
    real = str(root.resolve())
    for rel in ("../outside.png", str(tmp_path / "outside.png"), "link-out.png",
                "sub/../../outside.png", "sub/up/outside.png"):
        assert read_below(real, rel) == (None, OUTSIDE_ROOT), rel
    for rel in ("a.png", "link-in.png", "sub/../a.png"):
        assert read_below(real, rel) == (digit, None), rel
    # inside, the producer's own answers: missing, a named pipe (never blocking), too large
    for rel in ("missing.png", "pipe.png"):
        assert read_below(real, rel) == read_file(os.path.join(real, rel)), rel
    assert read_below(real, "a.png", max_bytes=10) == (None, "file is larger than 10 bytes")


def test_a_batch_read_below_the_root_answers_as_each_path_resolved_in_full(tmp_path, sample_dir):
    """A batch resolves each folder once and opens plain names without following a final
    link; whatever the mix, every answer is the one the full resolution of that path gives."""
    digit = digit_files(sample_dir, "3", 1)[0].read_bytes()
    root = tmp_path / "root"
    for folder in ("3", "7", "sub/deeper"):
        (root / folder).mkdir(parents=True)
        (root / folder / "a.png").write_bytes(digit)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "a.png").write_bytes(digit)
    (root / "out").symlink_to(tmp_path / "outside")  # a folder link out
    (root / "in").symlink_to(root / "7")  # a folder link in
    (root / "3" / "link-out.png").symlink_to(tmp_path / "outside" / "a.png")
    (root / "3" / "link-in.png").symlink_to(root / "7" / "a.png")
    (root / "3" / "dir.png").mkdir()
    os.mkfifo(root / "7" / "pipe.png")
    real = str(root.resolve())
    rels = ["3/a.png", "out/a.png", "7/a.png", "in/a.png", "3/link-out.png", "3/link-in.png",
            "3/dir.png", "7/pipe.png", "3/missing.png", "sub/deeper/a.png", "sub/../3/a.png",
            "sub/deeper/../../out/a.png", "../outside/a.png", "out/../3/a.png", "3/", "out/a.png"]

    def resolved_in_full(rel: str) -> tuple[bytes | None, str | None]:
        where = os.path.realpath(os.path.join(real, rel))
        if not where.startswith(real + os.sep):
            return None, OUTSIDE_ROOT
        return read_file(where + ("/" if rel.endswith("/") else ""))

    batch = read_batch_below(real, rels)
    assert batch.paths == rels
    assert list(zip(batch.blobs, batch.errors, strict=True)) == [resolved_in_full(r) for r in rels]
    # out/../3/a.png leads out: "out" is resolved (a link out) before ".." applies
    assert batch.blobs.count(digit) == 6 and batch.errors.count(OUTSIDE_ROOT) == 6


def test_read_below_names_loops_nul_bytes_and_folders_that_are_files(tmp_path, sample_dir):
    digit = digit_files(sample_dir, "3", 1)[0].read_bytes()
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(digit)
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "rel").symlink_to("sub")  # relative links, to a folder and through one
    (root / "sub" / "via.png").symlink_to("../rel/a.png")
    (root / "up").symlink_to("../root/sub")  # climbs above the root: refused, never looser
    real = str(root.resolve())
    assert read_below(real, "loop1/a.png") == (
        None, "file could not be read: Too many levels of symbolic links")
    assert read_below(real, "sub/a.png\0") == (
        None, "file could not be read: the name holds a NUL byte")
    assert read_below(real, "sub/a.png/b.png") == (None, "file could not be read: Not a directory")
    assert read_below(real, "rel/via.png") == (digit, None)
    assert read_below(real, real + "/rel/a.png") == (digit, None)
    assert read_below(real, "up/a.png") == (None, OUTSIDE_ROOT)
    assert read_below(real, "sub/") == (None, "directory could not be listed")
    assert read_below(real, "missing/") == (
        None, "directory could not be listed: No such file or directory")


def test_path_map_setting_and_prefix():
    assert Settings.from_env({}).path_map is None
    mapping = Settings.from_env({defaults.PATH_MAP_ENV: "/data/images/=/mnt/images"}).path_map
    assert mapping == ("/data/images", "/mnt/images")
    assert map_prefix("/data/images", mapping) == "/mnt/images"
    assert map_prefix("/data/images/run1", mapping) == "/mnt/images/run1"
    assert map_prefix("/data/images2/run1", mapping) == "/data/images2/run1"  # whole names only
    assert map_prefix("/elsewhere", mapping) == "/elsewhere"
    for bad in ("/data/images", "data=/mnt", "/data=mnt"):
        with pytest.raises(SettingError, match="/producer/prefix=/worker/prefix"):
            Settings.from_env({defaults.PATH_MAP_ENV: bad})


def payload_keys(broker_env: dict[str, str]) -> list[bytes]:
    return list(redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
                .scan_iter("digitscore:payload:*"))


def compared(db_url: str, run_id: int) -> dict[str, tuple]:
    return {path: tuple(row[c] for c in COMPARED)
            for path, row in predictions(db_url, run_id).items()}


@pytest.mark.integration
def test_send_paths_gives_the_same_predictions_as_send_bytes(
    run_cli, sample_dir, model_db, broker_env, start_worker, tmp_path
):
    src = tmp_path / "images"
    copy_digits(sample_dir, src, per_class=20)
    three, seven = (digit_files(sample_dir, d, 1)[0].read_bytes() for d in ("3", "7"))
    write_named(src / "3", three, seven)  # strange and undecodable names
    (src / "7" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (src / "7" / "huge.png").write_bytes(bytes(defaults.MAX_FILE_BYTES + 1))
    os.mkfifo(src / "7" / "pipe.png")
    (src / "notes.txt").write_text("skipped")

    r = submit(run_cli, src, model_db, "--send", "paths", "--batch-size", "16")
    assert r.exit_code == 0, r.output
    assert payload_keys(broker_env) == []  # no image bytes in Redis
    client = redis.Redis.from_url(broker_env["DIGITSCORE_BROKER_URL"])
    (run,) = query(model_db, "SELECT send_mode, n_images FROM runs")
    n_batches = query(model_db, "SELECT COUNT(*) AS n, SUM(n_bytes) AS b FROM batches")[0]
    assert run["send_mode"] == "paths" and (n_batches["b"] == 0)
    assert queued_messages(client, broker_env["DIGITSCORE_QUEUE"]) == n_batches["n"] > 1
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    wait_done(model_db, timeout=60)

    r = submit(run_cli, src, model_db, "--send", "bytes", "--batch-size", "16", "--wait")
    assert r.exit_code == 0, r.output
    by_paths, by_bytes = compared(model_db, 1), compared(model_db, 2)
    assert len(by_paths) == run["n_images"] > 40
    assert by_paths == by_bytes
    errors = {row[-1] for row in by_paths.values()} - {None}
    assert any("named pipe" in e for e in errors) and any("larger than" in e for e in errors)
    assert len([e for e in errors if "larger" not in e and "pipe" not in e]) == 1  # broken.png


@pytest.mark.integration
def test_a_worker_refuses_recorded_paths_outside_the_source_directory(
    run_cli, sample_dir, model_db, broker_env, start_worker, tmp_path
):
    src = tmp_path / "images"
    rels = copy_digits(sample_dir, src, per_class=3)
    escape = tmp_path / "escape.png"  # a real digit, readable, next to the directory
    shutil.copyfile(digit_files(sample_dir, "7", 1)[0], escape)
    (src / "7" / "link-out.png").symlink_to(escape)
    r = submit(run_cli, src, model_db, "--send", "paths")
    assert r.exit_code == 0, r.output
    # what a tampered database could ask of a worker: the same number of paths, some outside
    tampered = ["../escape.png", str(escape), *sorted(rels)[2:], "7/link-out.png"]
    with get_engine(model_db).begin() as conn:
        conn.execute(text("UPDATE batches SET paths = :p"), {"p": json.dumps(tampered)})
    worker = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu")
    wait_for_log(worker, "ready.")
    wait_done(model_db, timeout=60)
    rows = predictions(model_db)
    outside = {"../escape.png", str(escape), "7/link-out.png"}
    assert {p for p, row in rows.items() if row["error"] == OUTSIDE_ROOT} == outside
    assert all(rows[p]["error"] is None for p in sorted(rels)[2:])


@pytest.mark.integration
def test_path_map_lets_workers_read_a_directory_mounted_elsewhere(
    run_cli, sample_dir, model_db, broker_env, start_worker, tmp_path
):
    here, there = tmp_path / "producer-mount", tmp_path / "worker-mount"
    rels = copy_digits(sample_dir, here / "images", per_class=10)
    r = submit(run_cli, here / "images", model_db, "--send", "paths", "--batch-size", "8")
    assert r.exit_code == 0, r.output
    producer_prefix = str(here.resolve())
    here.rename(there)  # the workers' host sees the files at another path
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": model_db}

    unmapped = start_worker(env, "--device", "cpu", name="unmapped")
    log = wait_for_log(unmapped, "not a directory on this host", count=3)
    assert "producer resume 1" in log
    os.killpg(unmapped.pid, signal.SIGTERM)
    unmapped.wait(60)  # a warm shutdown, which can take over 30 s under CI's load (docs/testing.md)
    assert query(model_db, "SELECT COUNT(*) AS n FROM predictions")[0]["n"] == 0

    mapped = start_worker({**env, defaults.PATH_MAP_ENV: f"{producer_prefix}={there}"},
                          "--device", "cpu", name="mapped")
    wait_for_log(mapped, "ready.")
    r = run_cli("resume", "1", "--wait", "--database-url", model_db)
    assert r.exit_code == 0, r.output
    rows = predictions(model_db)
    assert set(rows) == set(rels) and all(row["error"] is None for row in rows.values())


def test_with_no_broker_send_paths_reads_the_files_here(run_cli, sample_dir, model_db):
    r = run_cli("submit", str(sample_dir / "valid"), "--send", "paths",
                "--database-url", model_db)
    assert r.exit_code == 0, r.output
    assert "--send paths needs workers: reading the files in this process" in r.stderr
    (run,) = query(model_db, "SELECT send_mode, status, n_scored FROM runs")
    assert (run["send_mode"], run["status"], run["n_scored"]) == ("bytes", "done", 200)


class FolderSwapper(threading.Thread):
    """Swaps ``folder`` for a symlink to ``outside`` and back, as fast as it can, until
    stopped or ``seconds`` have passed; counts its swaps."""

    def __init__(self, folder: Path, outside: Path, seconds: float) -> None:
        super().__init__(daemon=True)
        self.folder, self.outside, self.seconds = folder, outside, seconds
        self.swaps = 0
        self.stop = threading.Event()

    def run(self) -> None:
        real, link = self.folder.with_name("real"), self.folder.with_name("link")
        link.symlink_to(self.outside, target_is_directory=True)
        deadline = time.monotonic() + self.seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            os.rename(self.folder, real)
            os.rename(link, self.folder)  # the folder is now a link out
            time.sleep(0.0005)  # for a while (and the worker gets a core)
            os.rename(self.folder, link)
            os.rename(real, self.folder)  # and the real folder again
            time.sleep(0.0005)
            self.swaps += 1


@pytest.mark.integration
def test_a_folder_swapped_for_a_link_out_mid_read_never_yields_an_outside_row(
    run_cli, sample_dir, model_db, broker_env, start_worker, tmp_path, classifier
):
    """A worker reads a ``--send paths`` run while a folder of it is swapped, again and again,
    for a symlink to a folder outside holding a 7 under every name of the 3s: each row is the
    3 it names, or an error (the file was not there when read); none is the outside 7."""
    src, outside = tmp_path / "images", tmp_path / "outside"
    threes = digit_files(sample_dir, "3", 1)[0].read_bytes()
    seven = digit_files(sample_dir, "7", 1)[0].read_bytes()
    (src / "3").mkdir(parents=True)
    outside.mkdir()
    names = [f"{i}.png" for i in range(2000)]
    for name in names:
        (src / "3" / name).write_bytes(threes)
        (outside / name).write_bytes(seven)
    r = submit(run_cli, src, model_db, "--send", "paths", "--batch-size", "250")
    assert r.exit_code == 0, r.output
    # the distances each image scores (floats as the database gives them back)
    scored = score_images(classifier, ["3/a.png", "3/b.png"], [threes, seven])
    (three_row, seven_row) = scored.rows()
    three_l1, seven_l1 = float(three_row["dist_l1"]), float(seven_row["dist_l1"])
    assert three_l1 != seven_l1

    swapper = FolderSwapper(src / "3", outside, seconds=30)
    swapper.start()
    start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": model_db}, "--device", "cpu")
    try:
        wait_done(model_db, timeout=60)
    finally:
        swapper.stop.set()
        swapper.join()
    rows = predictions(model_db)
    assert set(rows) == {f"3/{name}" for name in names}
    scored = [row for row in rows.values() if row["error"] is None]
    outside_rows = [row for row in scored if row["dist_l1"] == pytest.approx(seven_l1)]
    assert swapper.swaps > 100 and outside_rows == []
    assert scored and all(row["dist_l1"] == pytest.approx(three_l1) for row in scored)
    errors = {row["error"] for row in rows.values()} - {None}
    assert errors <= {OUTSIDE_ROOT, "file could not be read: No such file or directory"}
