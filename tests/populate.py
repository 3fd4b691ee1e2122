"""Populating a real database with a run over real digit files, for the report, compare,
HTML and SQL-recipe tests; and reading its prediction rows back for independent checks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from core.classifier import Classifier
from db.model_store import TrainingRecord, save_classifier
from producer.submit import EmbeddedSender, submit_directory

SCRIPT_NAME = (
    "<script>alert(1)</script>.png"  # a path: folder "<script>alert(1)<", file "script>.png"
)
IMG_NAME = "<img src=x onerror=alert(1)>.png"  # a real 7 filed under 3/: confidently wrong
GONE_NAME = "gone.png"  # a real 7 filed under 3/, deleted after scoring


def save_model(engine: Engine, classifier: Classifier, train_dir: str = "train") -> int:
    record = TrainingRecord(train_dir, 800, 200, 20, 0.5, 256, 42, 0.9, 0.9, 0.9)
    with engine.begin() as conn:
        return save_classifier(conn, classifier, record)


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


def submit(engine: Engine, classifier: Classifier, model_id: int, root: Path) -> int:
    sub = submit_directory(
        engine, root, model_id, EmbeddedSender(engine, classifier), batch_size=64
    )
    assert sub.status == "done"
    return sub.run_id


def prediction_rows(engine: Engine, run_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM predictions WHERE run_id = :r ORDER BY path"), {"r": run_id}
        ).mappings()
        return [dict(r) for r in rows]


def scored_labelled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["error"] is None and r["label"] is not None]
