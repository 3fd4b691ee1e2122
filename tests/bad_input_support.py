"""Helpers shared by the bad-input tests (test_bad_images, test_file_names, test_walk): a model
stored in a fresh database, real digits written to disk, and the rows a run left behind."""

from __future__ import annotations

import os
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import Result
from PIL import Image
from sqlalchemy import text

from core.classifier import Classifier
from db.model_store import TrainingRecord, save_classifier
from db.session import dispose_engines, get_engine

PREDICTION_COLUMNS = ("pred_l1", "pred_l2", "pred_sgd", "dist_l1", "dist_l2", "prob_sgd")


def store_model(db_url: str, classifier: Classifier) -> int:
    """Save the session's trained classifier as a model version in the database at db_url."""
    record = TrainingRecord("train", 800, 0, 20, 0.5, 256, 42, None, None, None)
    with get_engine(db_url).begin() as conn:
        model_id = save_classifier(conn, classifier, record)
    dispose_engines()
    return model_id


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


def submit(run_cli: Callable[..., Result], directory: Path, db_url: str, *extra: str) -> Result:
    return run_cli("submit", str(directory), "--database-url", db_url, *extra)


def query(db_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    with get_engine(db_url).connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text(sql), params)]
    dispose_engines()
    return rows


def predictions(db_url: str, run_id: int = 1) -> dict[str, dict[str, Any]]:
    """Every prediction row of a run, by stored path; fails on a duplicate path."""
    rows = query(db_url, "SELECT * FROM predictions WHERE run_id = :r", r=run_id)
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "two rows for one path"
    return by_path


def run_row(db_url: str, run_id: int = 1) -> dict[str, Any]:
    (row,) = query(db_url, "SELECT * FROM runs WHERE id = :r", r=run_id)
    return row


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


def cli_command(*args: str) -> list[str]:
    """The producer CLI as a separate process (the console script's code)."""
    return [sys.executable, "-c", "from producer.cli import cli; cli()", *args]


def bytes_name(directory: Path, name: bytes) -> bytes:
    """An os.fsencode-level path: directory joined with a name that may not be UTF-8."""
    return os.path.join(os.fsencode(directory), name)
