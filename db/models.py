"""The tables users query with SQL: SQLAlchemy Core ``Table`` objects on one ``MetaData``,
each named after its table. This is a public interface: see docs/schema.md.

Change it only through a new Alembic migration in db/migrations/versions, and keep
docs/schema.md true to it in the same commit.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from core.defaults import PRIORITIES

RUN_STATUSES = ("queued", "running", "done", "cancelled")
BATCH_STATUSES = ("queued", "done", "failed", "split", "cancelled")


def utcnow() -> datetime:
    return datetime.now(UTC)


metadata = MetaData()

#: A trained model version: ideal images and SGD weights as float32 little-endian bytes.
models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("train_dir", Text, nullable=False),
    Column("classes", Text, nullable=False),  # JSON list of class names, index = class index
    Column("height", Integer, nullable=False),
    Column("width", Integer, nullable=False),
    Column("n_train", Integer, nullable=False),
    Column("n_valid", Integer, nullable=False),
    Column("loss", String(40), nullable=False),
    Column("epochs", Integer, nullable=False),
    Column("lr", Float, nullable=False),
    Column("batch_size", Integer, nullable=False),
    Column("seed", Integer, nullable=False),
    Column("accuracy_l1", Float),
    Column("accuracy_l2", Float),
    Column("accuracy_sgd", Float),
    Column("ideal_images", LargeBinary, nullable=False),  # K x H x W float32 LE
    Column("sgd_weights", LargeBinary, nullable=False),  # (H*W) x K float32 LE
    Column("sgd_bias", LargeBinary, nullable=False),  # K float32 LE
    # how the SGD model was trained (migration 0008; NULL for models trained before it)
    Column("weight_decay", Float),
    Column("best_epoch", Integer),  # the epoch whose weights were kept
    Column("learning_curve", Text),  # JSON list, one object per epoch
)

#: One submission of a directory. Its counts, accuracies, status and finished_at are settled
#: when its last batch is stored (db/runs.py); while it runs, ``run_totals`` sums its batches.
runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False, index=True),
    Column("source_dir", Text, nullable=False),
    Column("backend", String(20), nullable=False),  # 'embedded' or 'celery'
    Column("status", String(20), nullable=False, default="queued"),
    Column("n_images", Integer),  # NULL until the walk is complete
    Column("n_skipped", Integer, nullable=False, default=0),
    Column("n_scored", Integer, nullable=False, default=0),
    Column("n_failed", Integer, nullable=False, default=0),
    Column("accuracy_l1", Float),
    Column("accuracy_l2", Float),
    Column("accuracy_sgd", Float),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("submitted_at", DateTime(timezone=True)),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    # scored rows with a label, and of those the ones each predictor got right (migration
    # 0003, which added them after the columns above)
    Column("n_labelled", Integer, nullable=False, default=0, server_default="0"),
    Column("n_correct_l1", Integer, nullable=False, default=0, server_default="0"),
    Column("n_correct_l2", Integer, nullable=False, default=0, server_default="0"),
    Column("n_correct_sgd", Integer, nullable=False, default=0, server_default="0"),
    # random, 32 hex digits; every message for the run carries it (migration 0004, which
    # gave existing runs one; the column is nullable only because SQLite cannot add it as
    # NOT NULL without rebuilding the table under its views)
    Column("token", String(32), index=True, unique=True),
    # 'bytes' (the producer sent each batch's image bytes through Redis) or 'paths' (workers
    # read the files from source_dir themselves); migration 0007
    Column("send_mode", String(10), nullable=False, default="bytes", server_default="bytes"),
    # the process sending the run now ('pid@host') and until when its lease holds unless
    # renewed; NULL when nothing sends it (migration 0012)
    Column("lease_holder", String(300)),
    Column("lease_until", DateTime(timezone=True)),
    # 'high', 'normal' or 'low': the order workers take its batches in (migration 0017)
    Column("priority", String(10), nullable=False, default="normal", server_default="normal"),
    # an id is never handed out twice, even after a run's row is deleted (migration 0015)
    CheckConstraint(f"priority IN {PRIORITIES}", name="ck_runs_priority"),
    sqlite_autoincrement=True,
)

#: A path, compared by its bytes on PostgreSQL too (migration 0019), as on SQLite and in Python.
PATH = Text().with_variant(Text(collation="C"), "postgresql")

#: A batch of images as the producer sent it; what ``producer resume`` re-sends.
batches = Table(
    "batches",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("seq", Integer, nullable=False),  # 0, 1, 2... within the run
    Column("paths", JSON, nullable=False),  # relative paths, in message order
    Column("n_images", Integer, nullable=False),
    Column("n_bytes", Integer, nullable=False),
    Column("status", String(20), nullable=False, default="queued"),
    Column("deliveries", Integer, nullable=False, default=0),
    Column("last_failure", Text),  # why its last failed delivery failed (0009)
    # deliveries stopped by the task time limit (migration 0011): the next one splits it
    Column("time_limited", Integer, nullable=False, default=0, server_default="0"),
    Column("enqueued_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("finished_at", DateTime(timezone=True)),
    # a batch of one archive's members: the archive and where each member is in it
    # (core/archives.py; migration 0014); NULL for loose files
    Column("members", JSON),
    # what the batch's rows count, written with them (migration 0010): 0 until stored
    *[Column(name, Integer, nullable=False, default=0, server_default="0") for name in (
        "n_scored", "n_failed", "n_labelled", "n_correct_l1", "n_correct_l2", "n_correct_sgd",
        "n_agree", "n_agree_l1_l2", "n_agree_l1_sgd", "n_agree_l2_sgd",
    )],
    Column("prob_sgd_bins", JSON),  # rows per tenth of prob_sgd; NULL until first stored
    # times a healer found it lost and sent it again (migration 0012)
    Column("resends", Integer, nullable=False, default=0, server_default="0"),
    UniqueConstraint("run_id", "seq", name="uq_batches_run_seq"),
)

#: One row per submitted image: its predictions, or the reason it could not be scored. Rows
#: are written only with their batch's ``done``/``failed`` mark (db/batch_life.py), so it keeps
#: no surrogate key and no foreign key (migration 0010): each costs every row of a COPY. On
#: PostgreSQL it is partitioned by run, and a run's unique (run_id, path) index is its
#: partition's, built when the run is finished (migration 0018, db/queries.index_run_rows).
predictions = Table(
    "predictions",
    metadata,
    Column("run_id", Integer, nullable=False),
    Column("batch_seq", Integer, nullable=False),
    Column("path", PATH, nullable=False),
    Column("label", Text),
    Column("pred_l1", Text),
    Column("pred_l2", Text),
    Column("pred_sgd", Text),
    Column("dist_l1", Float),
    Column("dist_l2", Float),
    Column("prob_sgd", Float),
    Column("error", Text),
    Column("scored_at", DateTime(timezone=True), nullable=False, default=utcnow),
    UniqueConstraint("run_id", "path", name="uq_predictions_run_path").ddl_if(dialect="sqlite"),
    # the failed rows of a run in path order (migration 0006)
    Index(
        "ix_predictions_failures", "run_id", "path",
        sqlite_where=text("error IS NOT NULL"), postgresql_where=text("error IS NOT NULL"),
    ),
    postgresql_partition_by="LIST (run_id)",
)

#: A Celery worker (one device's process group) that writes to this database: registered
#: when it starts, seen again every heartbeat, counted after every batch it stores.
workers = Table(
    "workers",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(255), nullable=False, unique=True),  # Celery node name
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),  # the Celery main process
    Column("device", String(40), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    Column("stopped_at", DateTime(timezone=True)),
    Column("batches", Integer, nullable=False, default=0),
    Column("images", Integer, nullable=False, default=0),
    Column("last_batch_at", DateTime(timezone=True)),
    # which secret the worker checks signatures with: core/wire.secret_fingerprint (16 hex
    # digits, never the secret) or 'none'; NULL for workers registered before migration 0011
    Column("signing", String(16)),
)

#: How many of a batch's scored rows with ``label`` (NULL: unlabelled) a predictor called
#: ``predicted``, written with the batch's rows (migration 0010). The view ``run_counts``
#: sums the labelled cells per run.
batch_counts = Table(
    "batch_counts",
    metadata,
    Column("run_id", Integer, nullable=False),
    Column("batch_seq", Integer, nullable=False),
    Column("predictor", String(10), nullable=False),
    Column("label", Text),
    Column("predicted", Text, nullable=False),
    Column("n", Integer, nullable=False),
    ForeignKeyConstraint(["run_id", "batch_seq"], ["batches.run_id", "batches.seq"]),
    Index("ix_batch_counts_run", "run_id", "batch_seq"),
)

#: How many of a batch's rows have ``error`` as their reason (migration 0010); the view
#: ``run_failures`` sums them per run.
batch_failures = Table(
    "batch_failures",
    metadata,
    Column("run_id", Integer, nullable=False),
    Column("batch_seq", Integer, nullable=False),
    Column("error", Text, nullable=False),
    Column("n", Integer, nullable=False),
    ForeignKeyConstraint(["run_id", "batch_seq"], ["batches.run_id", "batches.seq"]),
    Index("ix_batch_failures_run", "run_id", "batch_seq"),
)

#: One of a run's most confident mistakes by a predictor: while the run is running, a
#: superset of its ``defaults.MISTAKES_KEPT`` surest; exactly those once it is done
#: (migration 0006; 0010 made it a superset while running).
run_mistakes = Table(
    "run_mistakes",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("predictor", String(10), primary_key=True),
    Column("path", PATH, primary_key=True),
    # dist_l1, dist_l2 or -prob_sgd of the row: smaller is surer
    Column("rank_key", Float, nullable=False),
    Index("ix_run_mistakes_rank", "run_id", "predictor", "rank_key", "path"),
)

#: One of a run's least confident scored images (smallest ``prob_sgd``), kept like
#: ``run_mistakes`` (migration 0010).
run_unsure = Table(
    "run_unsure",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("path", PATH, primary_key=True),
    Column("prob_sgd", Float, nullable=False),
    Index("ix_run_unsure_rank", "run_id", "prob_sgd", "path"),
)
