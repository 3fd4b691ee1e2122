"""The one home of what tests share that is not a fixture (fixtures are in conftest.py): the
services' addresses, real digit files and hostile ones, a model in a database, runs submitted
and their rows read back, and waits on real workers.

No test module imports another test module; they import this.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from PIL import Image
from sqlalchemy import Engine, text

from core.classifier import Classifier
from db import queries
from db.model_store import TrainingRecord, save_classifier
from db.session import dispose_engines, get_engine, make_engine, upgrade_schema
from tests.tcp_proxy import free_port, xdist_index

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "DIGITSCORE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE_URL = os.environ.get("DIGITSCORE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
#: The first of the Redis databases the tests' queues and payloads use (one per concurrent
#: checkout): each pytest-xdist process takes this one plus its index, as a test's teardown
#: deletes every payload key of its database and some tests count them all.
REDIS_FIRST_DB = int(os.environ.get("DIGITSCORE_TEST_REDIS_DB", "9"))
REDIS_DB = REDIS_FIRST_DB + xdist_index()
IN_CI = os.environ.get("CI", "").lower() == "true"
REQUIRE_GPU = os.environ.get("DIGITSCORE_TEST_REQUIRE_GPU") == "1"
#: Loads tests/fault_injection.py into a started worker (``start_worker(env, *FAULTS)``).
FAULTS = ("--", "--include", "tests.fault_injection")
PREDICTION_COLUMNS = ("pred_l1", "pred_l2", "pred_sgd", "dist_l1", "dist_l2", "prob_sgd")


def service_missing(what: str) -> None:
    """Skip locally, fail under CI."""
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but is not available")
    pytest.skip(f"{what} not available")


@lru_cache(maxsize=1)
def gpu_count() -> int:
    """GPUs torch sees, counted in a child process (as the launcher counts them)."""
    from worker.devices import count_gpus

    return count_gpus()


# ---------------------------------------------------------------- models and runs


def created(url: str) -> str:
    """``url`` with an empty digitscore schema in it: a worker refuses a database that does
    not exist."""
    engine = make_engine(url)
    upgrade_schema(engine)
    engine.dispose()
    return url


def save_model(db: Engine | str, classifier: Classifier, train_dir: str = "train") -> int:
    """Store a trained classifier (the session's, usually) as a model version in ``db``, an
    engine or a URL; returns its id. Far quicker than ``producer train`` where a test needs
    a model, not training."""
    record = TrainingRecord(train_dir, 800, 200, 20, 0.5, 256, 42, 0.9, 0.9, 0.9)
    engine = get_engine(db) if isinstance(db, str) else db
    with engine.begin() as conn:
        model_id = save_classifier(conn, classifier, record)
    if isinstance(db, str):
        dispose_engines()
    return model_id


def score_and_store(engine, classifier, run_id, seq, paths, blobs, errors=None) -> int:
    """Score a batch in this process and store its rows, as the embedded producer does."""
    from core.scoring import score_images
    from db.batch_life import store_batch

    return store_batch(engine, run_id, seq, score_images(classifier, paths, blobs, errors))


def submit_embedded(engine: Engine, classifier: Classifier, model_id: int, root: Path) -> int:
    """Score ``root`` in this process (no broker), in batches of 64; returns the run id."""
    from producer.submit import EmbeddedSender, submit_directory

    sub = submit_directory(
        engine, root, model_id, EmbeddedSender(engine, classifier), batch_size=64
    )
    assert sub.status == "done"
    return sub.run_id


def submit(run_cli: Callable[..., Result], directory: Path, db_url: str, *extra: str) -> Result:
    """``producer submit DIRECTORY --database-url DB_URL ...`` through the CLI runner."""
    return run_cli("submit", str(directory), "--database-url", db_url, *extra)


def cli_command(*args: str) -> list[str]:
    """The producer CLI as a separate process (the console script's code)."""
    return [sys.executable, "-c", "from producer.cli import cli; cli()", *args]


def query(db_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    with get_engine(db_url).connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text(sql), params)]
    dispose_engines()
    return rows


def run_row(db_url: str, run_id: int = 1) -> dict[str, Any]:
    """The run's row, its counts summed from its batches until it is settled as done."""
    with get_engine(db_url).connect() as conn:
        return queries.get_run(conn, run_id)


def predictions(db_url: str, run_id: int = 1) -> dict[str, dict[str, Any]]:
    """Every prediction row of a run, by stored path; fails on a duplicate path."""
    rows = query(db_url, "SELECT * FROM predictions WHERE run_id = :r", r=run_id)
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "two rows for one path"
    return by_path


def prediction_rows(engine: Engine, run_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM predictions WHERE run_id = :r ORDER BY path"), {"r": run_id}
        ).mappings()
        return [dict(r) for r in rows]


def scored_labelled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["error"] is None and r["label"] is not None]


#: A run's counts and accuracies recomputed by SQL from its ``predictions`` rows.
RECOMPUTE = """
SELECT
  COUNT(*) FILTER (WHERE error IS NULL)                         AS n_scored,
  COUNT(*) FILTER (WHERE error IS NOT NULL)                     AS n_failed,
  COUNT(*) FILTER (WHERE error IS NULL AND label IS NOT NULL)   AS n_labelled,
  COUNT(*) FILTER (WHERE error IS NULL AND pred_l1 = label)     AS n_correct_l1,
  COUNT(*) FILTER (WHERE error IS NULL AND pred_l2 = label)     AS n_correct_l2,
  COUNT(*) FILTER (WHERE error IS NULL AND pred_sgd = label)    AS n_correct_sgd,
  AVG(CASE WHEN pred_l1 = label THEN 1.0 ELSE 0.0 END)
      FILTER (WHERE error IS NULL AND label IS NOT NULL)        AS accuracy_l1,
  AVG(CASE WHEN pred_l2 = label THEN 1.0 ELSE 0.0 END)
      FILTER (WHERE error IS NULL AND label IS NOT NULL)        AS accuracy_l2,
  AVG(CASE WHEN pred_sgd = label THEN 1.0 ELSE 0.0 END)
      FILTER (WHERE error IS NULL AND label IS NOT NULL)        AS accuracy_sgd
FROM predictions WHERE run_id = :run
"""


def assert_run_complete(
    db_url: str, scored: set[str], failed: set[str], n_skipped: int, run_id: int = 1
) -> dict[str, dict[str, Any]]:
    """Exactly one row per image, scored or failed as expected, and the run's counts right."""
    rows = predictions(db_url, run_id)
    assert set(rows) == scored | failed
    really_failed = {p for p, r in rows.items() if r["error"] is not None}
    assert really_failed == failed, {p: rows[p]["error"] for p in really_failed ^ failed}
    for p in scored:
        assert all(rows[p][c] is not None for c in PREDICTION_COLUMNS), rows[p]
    for p in failed:
        assert all(rows[p][c] is None for c in PREDICTION_COLUMNS), rows[p]
    run = run_row(db_url, run_id)
    counts = (run["status"], run["n_images"], run["n_scored"], run["n_failed"], run["n_skipped"])
    assert counts == ("done", len(rows), len(scored), len(failed), n_skipped)
    return rows


def assert_exactly_once(db_url: str, files: int, run_id: int = 1) -> None:
    """One row per file, no path twice, and the run's counts add up to them."""
    ((n, distinct),) = [tuple(r.values()) for r in query(
        db_url, "SELECT COUNT(*) AS n, COUNT(DISTINCT path) AS d FROM predictions "
        "WHERE run_id = :r", r=run_id)]
    run = run_row(db_url, run_id)
    assert (n, distinct, run["n_images"]) == (files, files, files)
    assert run["n_scored"] + run["n_failed"] == files


def wait_done(db_url: str, timeout: float, run_id: int = 1) -> dict[str, Any]:
    """The run's row once it is done; a failure after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = run_row(db_url, run_id)
        if run["status"] == "done":
            return run
        time.sleep(0.1)
    pytest.fail(f"run {run_id} not done after {timeout} s: {run_row(db_url, run_id)}")


def wait_scored(db_url: str, at_least: int, timeout: float = 60, run_id: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while run_row(db_url, run_id)["n_scored"] < at_least:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {at_least} scored after {timeout} s: {run_row(db_url)}")
        time.sleep(0.1)


# ---------------------------------------------------------------- real workers and servers


def wait_for_log(proc: subprocess.Popen, text: str, timeout: float = 60, count: int = 1) -> str:
    """Wait until a started worker's log holds ``text`` (``count`` times); return the log."""
    deadline = time.monotonic() + timeout
    while True:
        log = Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
        if log.count(text) >= count:
            return log
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode} before {text!r}:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in the worker log after {timeout} s:\n{log[-3000:]}")
        time.sleep(0.1)


def pool_children(launcher: subprocess.Popen) -> list[int]:
    """The Celery pool processes under a started `worker` (launcher → celery → pool)."""
    def children(pid: int) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    return [child for master in children(launcher.pid) for child in children(master)]


def submit_in_background(db_url: str, source: Path, env: dict, *args: str) -> subprocess.Popen:
    """``producer submit SOURCE`` as a process of its own, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import cli; cli()", "submit", str(source),
         "--database-url", db_url, *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


class RedisServer:
    """A real redis-server of this test's own (nothing on disk), that it may kill and restart
    without disturbing anyone else's Redis."""

    def __init__(self, workdir: Path, *options: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.options = options
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping()
                return
            except Exception:
                time.sleep(0.05)
        pytest.fail("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------- files, real and hostile


def digit_files(sample_dir: Path, label: str, n: int) -> list[Path]:
    """The first n real validation digits of one class (PNG files written by sample-data)."""
    files = sorted((sample_dir / "valid" / label).glob("*.png"))[:n]
    assert len(files) == n
    return files


def copy_digits(sample_dir: Path, dest: Path, per_class: int = 5) -> list[str]:
    """Copy real 3s and 7s into dest/3 and dest/7; returns their relative POSIX paths."""
    rels = []
    for label in ("3", "7"):
        (dest / label).mkdir(parents=True, exist_ok=True)
        for src in digit_files(sample_dir, label, per_class):
            shutil.copyfile(src, dest / label / src.name)
            rels.append(f"{label}/{src.name}")
    return rels


def gray(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img).copy()


SCRIPT_NAME = (
    "<script>alert(1)</script>.png"  # a path: folder "<script>alert(1)<", file "script>.png"
)
IMG_NAME = "<img src=x onerror=alert(1)>.png"  # a real 7 filed under 3/: confidently wrong
GONE_NAME = "gone.png"  # a real 7 filed under 3/, deleted after scoring


def odd_source_dir(sample_dir: Path, dest: Path) -> Path:
    """The 200 validation digits plus a corrupt file, an unlabelled digit, and two real 7s
    filed under 3/ (one with an HTML-looking name, one to be deleted after scoring)."""
    shutil.copytree(sample_dir / "valid", dest)
    a_seven = sorted((dest / "7").glob("*.png"))[0]
    shutil.copy(a_seven, dest / "3" / IMG_NAME)
    shutil.copy(a_seven, dest / "3" / GONE_NAME)
    (dest / "3" / "broken.png").write_bytes(b"not a png at all")
    script_dir = dest / SCRIPT_NAME.split("/")[0]
    script_dir.mkdir()
    (script_dir / SCRIPT_NAME.split("/")[1]).write_bytes(b"<script>alert(1)</script>")
    (dest / "unlabelled").mkdir()
    shutil.copy(sorted((dest / "3").glob("0*.png"))[0], dest / "unlabelled" / "a_three.png")
    return dest


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int, bit_depth: int) -> bytes:
    """A real, valid grayscale PNG of all-black pixels, declared width x height: its IDAT
    inflates to height * (1 + row bytes), yet the file is small."""
    row_bytes = (width * bit_depth + 7) // 8
    packer = zlib.compressobj(9)
    row = bytes(1 + row_bytes)  # filter type 0, then black pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bytes_name(directory: Path, name: bytes) -> bytes:
    """An os.fsencode-level path: directory joined with a name that may not be UTF-8."""
    return os.path.join(os.fsencode(directory), name)


# Names that are valid UTF-8: each must be stored exactly as the file system spells it.
STRANGE = [
    "with space.png",
    "ünïcødé 数字 ٣.png",
    "new\nline.png",
    "tab\there.png",
    "quote'single\"double.png",
    "<script>alert(1)</script>.png",  # a folder "<script>alert(1)<" and a file "script>.png"
    "<img src=x onerror=alert(2)>.png",
    "esc\x1b[31mred\x1b[0m.png",
    "x'); DROP TABLE runs; --.png",
    "right-to-left \u202egnp.exe.png",
    "back\\slash.png",
]
# Names that are not UTF-8 (written with os.fsencode-level bytes) and how they are stored.
UNDECODABLE = {b"caf\xe9.png": "caf\\xe9.png", b"\xff\xfe.png": "\\xff\\xfe.png"}
# A file really named like the escape of another file's undecodable name.
COLLIDING = (b"dup\xff.png", "dup\\xff.png")


def write_named(folder: Path, data: bytes, seven: bytes) -> dict[str, bytes]:
    """Every strange name in folder, holding data (the colliding pair's real-name twin holds
    seven instead, to tell the two apart); returns stored name -> the bytes it must hold."""
    folder.mkdir(parents=True, exist_ok=True)
    stored: dict[str, bytes] = {}
    for name in STRANGE:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
        stored[name] = data
    for raw, escaped in UNDECODABLE.items():
        with open(bytes_name(folder, raw), "wb") as f:
            f.write(data)
        stored[escaped] = data
    raw, literal = COLLIDING
    with open(bytes_name(folder, raw), "wb") as f:
        f.write(data)
    (folder / literal).write_bytes(seven)
    stored[literal] = seven  # the real name keeps its spelling ...
    stored[literal + " (name not UTF-8)"] = data  # ... the undecodable one is marked
    return stored


def start_producer(*args: str, env: dict[str, str] | None = None, preexec_fn=None):
    return subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import cli; cli()", *args],
        env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def batches_recorded(db_url: str) -> int:
    with get_engine(db_url).connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM batches")).scalar() or 0)


def pause_mid_submit(db_url: str, n: int, producer: subprocess.Popen, timeout: float = 60):
    """Once the producer has recorded ``n`` batches, stop it (SIGSTOP) so that the fault the
    test then injects strikes mid-submit however fast the submit runs; ``resume_producer``
    lets it go on into the fault."""
    deadline = time.monotonic() + timeout
    while batches_recorded(db_url) < n:
        if producer.poll() is not None:
            pytest.fail(f"the producer ended before {n} batches: {producer.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {n} batches after {timeout} s")
        time.sleep(0.01)
    producer.send_signal(signal.SIGSTOP)
    assert producer.poll() is None, "the producer finished before the fault"


def resume_producer(producer: subprocess.Popen) -> None:
    producer.send_signal(signal.SIGCONT)


def submit_and_watch(source, db_url: str, env: dict[str, str], *args: str):
    """Run ``producer submit SOURCE --wait ARGS`` with its output piped (not a terminal);
    return its exit status and each line of stdout and of stderr with the seconds since the
    start."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import cli; cli()", "submit", str(source),
         "--wait", "--database-url", db_url, *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out: list[tuple[float, str]] = []
    err: list[tuple[float, str]] = []

    def read(stream, lines: list[tuple[float, str]]) -> None:
        for line in stream:
            lines.append((time.monotonic() - start, line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=pair) for pair in
               ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    proc.wait(timeout=120)
    for reader in readers:
        reader.join()
    return proc.returncode, out, err


# ---------------------------------------------------------------- cancelled and deleted runs


def rows_by_table(db_url: str | Engine, run_id: int) -> dict[str, int]:
    """How many rows of run ``run_id`` each table with a ``run_id`` column holds, and
    ``runs`` its own row: what a delete must leave at 0."""
    from sqlalchemy import inspect

    engine = get_engine(db_url) if isinstance(db_url, str) else db_url
    with engine.connect() as conn:
        # a run's partition of ``predictions`` (PostgreSQL) is counted through its parent
        tables = [t for t in inspect(conn).get_table_names()
                  if "run_id" in {c["name"] for c in inspect(conn).get_columns(t)}
                  and not t.startswith("predictions_run_")]
        counts = {t: int(conn.execute(text(f'SELECT COUNT(*) FROM "{t}" WHERE run_id = :r'),
                                      {"r": run_id}).scalar_one()) for t in tables}
        counts["runs"] = int(conn.execute(text("SELECT COUNT(*) FROM runs WHERE id = :r"),
                                          {"r": run_id}).scalar_one())
    return counts


def payload_keys(broker_url: str, run_id: int) -> list[bytes]:
    """The payload keys of run ``run_id`` in the test's Redis."""
    import redis

    return list(redis.Redis.from_url(broker_url).scan_iter(f"digitscore:payload:{run_id}:*"))


def wait_reading_stdin(pid: int, timeout: float = 30) -> None:
    """Wait until process ``pid`` is blocked reading its standard input (Linux: its
    ``/proc/PID/syscall`` is ``read`` of fd 0): a signal sent then interrupts that read,
    where one sent a moment earlier would be seen only after it."""
    deadline = time.monotonic() + timeout
    while not Path(f"/proc/{pid}/syscall").read_text().startswith("0 0x0 "):
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} is not reading its standard input")
        time.sleep(0.01)


def queued_messages(client: Any, queue: str) -> int:
    """The messages waiting in ``queue``: in its own list and kombu's priority lists."""
    from core.wire import queue_lists

    return sum(client.llen(name) for name in queue_lists(queue))


def drop_queue(client: Any, queue: str) -> None:
    """Lose every message waiting in ``queue`` (its priority lists too), as a Redis that
    lost its data would."""
    from core.wire import queue_lists

    client.delete(*queue_lists(queue))


def add_model(engine: Engine, classes: list[str]) -> int:
    """A model row (no real weights: these tests store rows they make up)."""
    names = ", ".join(f'"{c}"' for c in classes)
    with engine.begin() as conn:
        return int(conn.execute(text(
            "INSERT INTO models (created_at, train_dir, classes, height, width, n_train, "
            "n_valid, loss, epochs, lr, batch_size, seed, ideal_images, sgd_weights, sgd_bias) "
            "VALUES (:at, 't', :c, 28, 28, 1, 1, 'x', 1, 1, 1, 1, :b, :b, :b) RETURNING id"
        ), {"at": "2026-11-24 10:00:00", "c": f"[{names}]", "b": b""}).scalar_one())


def new_run(engine: Engine, model_id: int) -> int:
    """A new run of the model, as a broker's submit creates it."""
    with engine.begin() as conn:
        run_id, _ = queries.create_run(conn, model_id, "/src", "celery")
    return run_id
