"""The tables users query with SQL. This is a public interface: see docs/schema.md.

Change it only through a new Alembic migration in db/migrations/versions, and keep
docs/schema.md true to it in the same commit.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUN_STATUSES = ("queued", "running", "done", "failed")
BATCH_STATUSES = ("queued", "done", "failed")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Model(Base):
    """A trained model version: ideal images and SGD weights as float32 little-endian bytes."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    train_dir: Mapped[str] = mapped_column(Text)
    classes: Mapped[str] = mapped_column(Text)  # JSON list of class names, index = class index
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    n_train: Mapped[int] = mapped_column(Integer)
    n_valid: Mapped[int] = mapped_column(Integer)
    loss: Mapped[str] = mapped_column(String(40))
    epochs: Mapped[int] = mapped_column(Integer)
    lr: Mapped[float] = mapped_column(Float)
    batch_size: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    accuracy_l1: Mapped[float | None] = mapped_column(Float)
    accuracy_l2: Mapped[float | None] = mapped_column(Float)
    accuracy_sgd: Mapped[float | None] = mapped_column(Float)
    ideal_images: Mapped[bytes] = mapped_column(LargeBinary)  # K x H x W float32 LE
    sgd_weights: Mapped[bytes] = mapped_column(LargeBinary)  # (H*W) x K float32 LE
    sgd_bias: Mapped[bytes] = mapped_column(LargeBinary)  # K float32 LE
    # how the SGD model was trained (migration 0008; NULL for models trained before it)
    weight_decay: Mapped[float | None] = mapped_column(Float)
    best_epoch: Mapped[int | None] = mapped_column(Integer)  # the epoch whose weights were kept
    learning_curve: Mapped[str | None] = mapped_column(Text)  # JSON list, one object per epoch


class Run(Base):
    """One submission of a directory; its counts and accuracies are those of its predictions,
    kept up to date by each batch's commit."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    source_dir: Mapped[str] = mapped_column(Text)
    backend: Mapped[str] = mapped_column(String(20))  # 'embedded' or 'celery'
    status: Mapped[str] = mapped_column(String(20), default="queued")
    n_images: Mapped[int | None] = mapped_column(Integer)  # NULL until the walk is complete
    n_skipped: Mapped[int] = mapped_column(Integer, default=0)
    n_scored: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    accuracy_l1: Mapped[float | None] = mapped_column(Float)
    accuracy_l2: Mapped[float | None] = mapped_column(Float)
    accuracy_sgd: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # scored rows with a label, and of those the ones each predictor got right (migration
    # 0003, which added them after the columns above)
    n_labelled: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_correct_l1: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_correct_l2: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_correct_sgd: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # random, 32 hex digits; every message for the run carries it (migration 0004, which
    # gave existing runs one; the column is nullable only because SQLite cannot add it as
    # NOT NULL without rebuilding the table under its views)
    token: Mapped[str | None] = mapped_column(String(32), index=True, unique=True)
    # 'bytes' (the producer sent each batch's image bytes through Redis) or 'paths' (workers
    # read the files from source_dir themselves); migration 0008
    send_mode: Mapped[str] = mapped_column(String(10), default="bytes", server_default="bytes")


class Batch(Base):
    """A batch of images as the producer sent it; what ``producer resume`` re-sends."""

    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("run_id", "seq", name="uq_batches_run_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    seq: Mapped[int] = mapped_column(Integer)  # 0, 1, 2... within the run
    paths: Mapped[list[str]] = mapped_column(JSON)  # relative paths, in message order
    n_images: Mapped[int] = mapped_column(Integer)
    n_bytes: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="queued")
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Prediction(Base):
    """One row per submitted image: its predictions, or the reason it could not be scored."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("run_id", "path", name="uq_predictions_run_path"),
        Index("ix_predictions_run_batch", "run_id", "batch_seq"),
        # the failed rows of a run in path order (migration 0006)
        Index(
            "ix_predictions_failures", "run_id", "path",
            sqlite_where=text("error IS NOT NULL"), postgresql_where=text("error IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    batch_seq: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(Text)
    pred_l1: Mapped[str | None] = mapped_column(Text)
    pred_l2: Mapped[str | None] = mapped_column(Text)
    pred_sgd: Mapped[str | None] = mapped_column(Text)
    dist_l1: Mapped[float | None] = mapped_column(Float)
    dist_l2: Mapped[float | None] = mapped_column(Float)
    prob_sgd: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    scored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Worker(Base):
    """A Celery worker (one device's process group) that writes to this database: registered
    when it starts, seen again every heartbeat, counted after every batch it stores."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)  # Celery node name
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)  # the Celery main process
    device: Mapped[str] = mapped_column(String(40))
    queue: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    batches: Mapped[int] = mapped_column(Integer, default=0)
    images: Mapped[int] = mapped_column(Integer, default=0)
    last_batch_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RunCount(Base):
    """How many of a run's labelled, scored images with ``label`` a predictor called
    ``predicted``: the run's confusion counts, kept by each batch's commit (migration 0006)."""

    __tablename__ = "run_counts"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    predictor: Mapped[str] = mapped_column(String(10), primary_key=True)
    label: Mapped[str] = mapped_column(Text, primary_key=True)
    predicted: Mapped[str] = mapped_column(Text, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)


class RunFailure(Base):
    """How many of a run's rows have ``error`` as their reason (migration 0006)."""

    __tablename__ = "run_failures"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    error: Mapped[str] = mapped_column(Text, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)


class RunMistake(Base):
    """One of a run's most confident mistakes by a predictor (at most
    :data:`db.mistakes.KEPT` per run and predictor; migration 0006)."""

    __tablename__ = "run_mistakes"
    __table_args__ = (
        Index("ix_run_mistakes_rank", "run_id", "predictor", "rank_key", "path"),
    )

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    predictor: Mapped[str] = mapped_column(String(10), primary_key=True)
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    # dist_l1, dist_l2 or -prob_sgd of the row: smaller is surer
    rank_key: Mapped[float] = mapped_column(Float)
