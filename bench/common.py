"""What every measurement needs: the model, databases, and peak memory from ``/proc``."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch

from core.classifier import Classifier
from core.labelled import LabelledImages
from core.training import fit
from db.model_store import TrainingRecord, load_classifier, save_classifier
from db.session import dispose_engines, get_engine
from producer.sample_data import load_digits

ROOT = Path(__file__).resolve().parent.parent
EPOCHS, LR, BATCH, SEED = 5, 0.5, 256, 42


#: The admin URL of the machine's PostgreSQL (a bench creates a fresh database and drops it).
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def add_data_options(p: argparse.ArgumentParser) -> None:
    """The options every database bench takes: where its image sets are cached, and
    PostgreSQL's admin URL."""
    p.add_argument("--data-dir", type=Path,
                   default=Path(tempfile.gettempdir()) / "digitscore-bench")
    p.add_argument("--postgres-url", default=POSTGRES_ADMIN_URL,
                   help="an admin URL: a fresh database is created and dropped")


def train_classifier() -> Classifier:
    """Both models trained on the 5,000 shipped digits (all ten classes)."""
    images, labels = load_digits()
    data = LabelledImages(
        torch.from_numpy(images), torch.from_numpy(labels), tuple(map(str, range(10))), 0
    )
    return fit(data, epochs=EPOCHS, lr=LR, batch_size=BATCH, seed=SEED)


def store_model(url: str, clf: Classifier) -> int:
    """Create the schema at ``url`` and save ``clf`` as a model version; returns its id."""
    record = TrainingRecord("bench", len(load_digits()[1]), 0, EPOCHS, LR, BATCH, SEED,
                            None, None, None)
    with get_engine(url).begin() as conn:
        model_id = save_classifier(conn, clf, record)
    dispose_engines()
    return model_id


def export_model(clf: Classifier, path: Path) -> Path:
    """The model as the plain script reads it: an ``.npz`` of plain float32 arrays and the
    class names (no pickle)."""
    import numpy as np

    np.savez(path, classes=np.array(clf.classes), ideals=clf.ideals.numpy(),
             weights=clf.weights.numpy(), bias=clf.bias.numpy())
    return path


def load_model(url: str, model_id: int) -> Classifier:
    with get_engine(url).connect() as conn:
        return load_classifier(conn, model_id)


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); yields its SQLAlchemy URL."""
    import psycopg

    name = f"digitscore_bench_{uuid.uuid4().hex[:10]}"
    plain = admin_url.replace("+psycopg", "")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rpartition("/")[0]
    try:
        yield f"{base}/{name}"
    finally:
        dispose_engines()
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_reachable(admin_url: str) -> bool:
    try:
        import psycopg

        with psycopg.connect(admin_url.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:
        return False


def redis_reachable(url: str) -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except Exception:
        return False


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident set size (``VmHWM``) in MiB, or ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    """The direct children of a process (Linux ``/proc``)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def as_utc(value: datetime | str) -> datetime:
    """A timestamp read back from either database, as an aware UTC datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
