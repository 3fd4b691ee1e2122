"""Counts kept per batch, so that the writers of a run share no row: each batch's counts go
on its ``batches`` row and in ``batch_counts`` and ``batch_failures``, written with its rows;
``run_counts`` and ``run_failures`` become views summing them, and the view ``run_totals``
sums a run's counts at any moment (``runs`` holds them once the run is settled as done). A
run also keeps its least confident images (``run_unsure``). ``predictions`` loses its
surrogate key ``id``, its foreign key to ``runs`` and its index on (run_id, batch_seq): each
cost every row of a COPY, and a batch's rows are written only with its done mark.

Existing batches get the counts of their rows, existing runs their least confident images.

Revision ID: 0010
Revises: 0014
Create Date: 2026-12-02
"""

import importlib.util
import json
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0014"
branch_labels = None
depends_on = None

PREDICTORS = ("l1", "l2", "sgd")
PAIRS = (("l1", "l2"), ("l1", "sgd"), ("l2", "sgd"))
BATCH_COUNTS = (
    "n_scored", "n_failed", "n_labelled", "n_correct_l1", "n_correct_l2", "n_correct_sgd",
    "n_agree", "n_agree_l1_l2", "n_agree_l1_sgd", "n_agree_l2_sgd",
)
KEPT = 100

RUN_COUNTS = (
    "CREATE VIEW run_counts AS SELECT run_id, predictor, label, predicted, SUM(n) AS n "
    "FROM batch_counts WHERE label IS NOT NULL GROUP BY run_id, predictor, label, predicted"
)
RUN_FAILURES = (
    "CREATE VIEW run_failures AS SELECT run_id, error, SUM(n) AS n FROM batch_failures "
    "GROUP BY run_id, error"
)
RUN_TOTALS = (
    "CREATE VIEW run_totals AS SELECT run_id, "
    "SUM(CASE WHEN status = 'queued' THEN 1 ELSE 0 END) AS n_queued_batches, "
    + "".join(f"SUM({c}) AS {c}, " for c in BATCH_COUNTS)
    + ", ".join(
        f"CAST(SUM(n_correct_{p}) AS DOUBLE PRECISION) / NULLIF(SUM(n_labelled), 0) "
        f"AS accuracy_{p}" for p in PREDICTORS
    )
    + " FROM batches GROUP BY run_id"
)


def _views_0002():
    """Migration 0002's module, whose views over ``predictions`` are rebuilt with it."""
    path = Path(__file__).with_name("0002_views.py")
    spec = importlib.util.spec_from_file_location("digitscore_migration_0002", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch_columns() -> None:
    with op.batch_alter_table("batches") as batch:
        for name in BATCH_COUNTS:
            batch.add_column(sa.Column(name, sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("prob_sgd_bins", sa.JSON))


def _count_tables() -> None:
    key = sa.ForeignKeyConstraint(["run_id", "batch_seq"], ["batches.run_id", "batches.seq"])
    op.create_table(
        "batch_counts",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("batch_seq", sa.Integer, nullable=False),
        sa.Column("predictor", sa.String(10), nullable=False),
        sa.Column("label", sa.Text),
        sa.Column("predicted", sa.Text, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        key,
    )
    op.create_index("ix_batch_counts_run", "batch_counts", ["run_id", "batch_seq"])
    op.create_table(
        "batch_failures",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("batch_seq", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(["run_id", "batch_seq"], ["batches.run_id", "batches.seq"]),
    )
    op.create_index("ix_batch_failures_run", "batch_failures", ["run_id", "batch_seq"])
    op.create_table(
        "run_unsure",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("path", sa.Text, primary_key=True),
        sa.Column("prob_sgd", sa.Float, nullable=False),
    )
    op.create_index("ix_run_unsure_rank", "run_unsure", ["run_id", "prob_sgd", "path"])


_OF_BATCH = "FROM predictions p WHERE 1 = 1"


def _fill_counts(conn) -> None:
    """Each batch's counts from its rows, as db/counts.py counts them. Rows of a batch never
    recorded (written by hand) get a ``done`` batch of no paths to be counted in."""
    conn.execute(sa.text(
        "INSERT INTO batches (run_id, seq, paths, n_images, n_bytes, status, deliveries, "
        "enqueued_at, finished_at) SELECT run_id, batch_seq, '[]', COUNT(*), 0, 'done', 0, "
        "MIN(scored_at), MAX(scored_at) FROM predictions p WHERE NOT EXISTS (SELECT 1 FROM "
        "batches b WHERE b.run_id = p.run_id AND b.seq = p.batch_seq) GROUP BY run_id, batch_seq"
    ))
    for p in PREDICTORS:
        conn.execute(sa.text(
            "INSERT INTO batch_counts (run_id, batch_seq, predictor, label, predicted, n) "
            f"SELECT p.run_id, p.batch_seq, '{p}', p.label, p.pred_{p}, COUNT(*) {_OF_BATCH} "
            f"AND p.error IS NULL AND p.pred_{p} IS NOT NULL "
            f"GROUP BY p.run_id, p.batch_seq, p.label, p.pred_{p}"
        ))
    conn.execute(sa.text(
        "INSERT INTO batch_failures (run_id, batch_seq, error, n) SELECT p.run_id, "
        f"p.batch_seq, p.error, COUNT(*) {_OF_BATCH} AND p.error IS NOT NULL "
        "GROUP BY p.run_id, p.batch_seq, p.error"
    ))
    scored = "p.error IS NULL"
    sums = {
        "n_scored": scored, "n_failed": "p.error IS NOT NULL",
        "n_labelled": f"{scored} AND p.label IS NOT NULL",
        **{f"n_correct_{p}": f"{scored} AND p.pred_{p} = p.label" for p in PREDICTORS},
        "n_agree": f"{scored} AND p.pred_l1 = p.pred_l2 AND p.pred_l2 = p.pred_sgd",
        **{f"n_agree_{a}_{b}": f"{scored} AND p.pred_{a} = p.pred_{b}" for a, b in PAIRS},
    }
    # bin i: floor(prob_sgd * 10) = i, and 1.0 in the last (db/counts.py)
    bins = [f"p.prob_sgd * 10 >= {i} AND p.prob_sgd * 10 < {i + 1}" for i in range(9)]
    bins.append("p.prob_sgd * 10 >= 9")
    columns = [f"SUM(CASE WHEN {w} THEN 1 ELSE 0 END)" for w in [*sums.values(), *bins]]
    found = conn.execute(sa.text(
        f"SELECT p.run_id, p.batch_seq, {', '.join(columns)} {_OF_BATCH} "
        "GROUP BY p.run_id, p.batch_seq"
    )).all()
    names = list(sums)
    update = sa.text(
        f"UPDATE batches SET {', '.join(f'{n} = :{n}' for n in names)}, prob_sgd_bins = :bins "
        "WHERE run_id = :run AND seq = :seq"
    )
    for run_id, seq, *values in found:
        counts = dict(zip(names, (int(v) for v in values[: len(names)]), strict=True))
        bins_json = json.dumps([int(v) for v in values[len(names):]])
        conn.execute(update, {**counts, "bins": bins_json, "run": run_id, "seq": seq})
    conn.execute(sa.text(
        "INSERT INTO run_unsure (run_id, path, prob_sgd) SELECT run_id, path, prob_sgd FROM "
        "(SELECT run_id, path, prob_sgd, ROW_NUMBER() OVER (PARTITION BY run_id ORDER BY "
        "prob_sgd, path) AS n FROM predictions WHERE prob_sgd IS NOT NULL) AS ranked "
        f"WHERE n <= {KEPT}"
    ))


def _lean_predictions(conn, views) -> None:
    """``predictions`` without ``id``, its foreign key and ``ix_predictions_run_batch``:
    altered in place on PostgreSQL, rebuilt on SQLite (which cannot drop a key)."""
    if conn.dialect.name == "postgresql":
        op.drop_index("ix_predictions_run_batch", table_name="predictions")
        conn.execute(sa.text(
            "ALTER TABLE predictions DROP CONSTRAINT IF EXISTS predictions_run_id_fkey"
        ))
        op.drop_column("predictions", "id")
        return
    op.create_table(
        "predictions_0010",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("batch_seq", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        *[sa.Column(c, sa.Text) for c in ("label", "pred_l1", "pred_l2", "pred_sgd")],
        *[sa.Column(c, sa.Float) for c in ("dist_l1", "dist_l2", "prob_sgd")],
        sa.Column("error", sa.Text),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id", "path", name="uq_predictions_run_path"),
    )
    columns = ("run_id, batch_seq, path, label, pred_l1, pred_l2, pred_sgd, dist_l1, "
               "dist_l2, prob_sgd, error, scored_at")
    conn.execute(sa.text(
        f"INSERT INTO predictions_0010 ({columns}) SELECT {columns} FROM predictions"
    ))
    op.drop_table("predictions")
    op.rename_table("predictions_0010", "predictions")
    where = sa.text("error IS NOT NULL")
    op.create_index("ix_predictions_failures", "predictions", ["run_id", "path"],
                    sqlite_where=where, postgresql_where=where)


def upgrade() -> None:
    conn = op.get_bind()
    views = _views_0002()
    _batch_columns()
    _count_tables()
    _fill_counts(conn)
    op.drop_table("run_counts")
    op.drop_table("run_failures")
    for name in views.VIEWS:
        op.execute(f"DROP VIEW {name}")
    _lean_predictions(conn, views)
    views.upgrade()
    op.execute(RUN_COUNTS)
    op.execute(RUN_FAILURES)
    op.execute(RUN_TOTALS)


def _predictions_with_id(conn) -> None:
    """``predictions`` as migration 0006 left it (ids numbered afresh)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("ALTER TABLE predictions ADD COLUMN id SERIAL PRIMARY KEY"))
        conn.execute(sa.text(
            "ALTER TABLE predictions ADD CONSTRAINT predictions_run_id_fkey FOREIGN KEY "
            "(run_id) REFERENCES runs (id)"
        ))
    else:
        op.create_table(
            "predictions_0006",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
            sa.Column("batch_seq", sa.Integer, nullable=False),
            sa.Column("path", sa.Text, nullable=False),
            *[sa.Column(c, sa.Text) for c in ("label", "pred_l1", "pred_l2", "pred_sgd")],
            *[sa.Column(c, sa.Float) for c in ("dist_l1", "dist_l2", "prob_sgd")],
            sa.Column("error", sa.Text),
            sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
            sa.UniqueConstraint("run_id", "path", name="uq_predictions_run_path"),
        )
        columns = ("run_id, batch_seq, path, label, pred_l1, pred_l2, pred_sgd, dist_l1, "
                   "dist_l2, prob_sgd, error, scored_at")
        conn.execute(sa.text(
            f"INSERT INTO predictions_0006 ({columns}) SELECT {columns} FROM predictions"
        ))
        op.drop_table("predictions")
        op.rename_table("predictions_0006", "predictions")
        where = sa.text("error IS NOT NULL")
        op.create_index("ix_predictions_failures", "predictions", ["run_id", "path"],
                        sqlite_where=where, postgresql_where=where)
    op.create_index("ix_predictions_run_batch", "predictions", ["run_id", "batch_seq"])


def downgrade() -> None:
    """Back to 0008's tables of counts per run, filled from the counts per batch."""
    conn = op.get_bind()
    views = _views_0002()
    op.create_table(
        "run_counts_0006",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("predictor", sa.String(10), primary_key=True),
        sa.Column("label", sa.Text, primary_key=True),
        sa.Column("predicted", sa.Text, primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
    )
    op.create_table(
        "run_failures_0006",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("error", sa.Text, primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
    )
    op.execute("INSERT INTO run_counts_0006 SELECT run_id, predictor, label, predicted, n "
               "FROM run_counts")
    op.execute("INSERT INTO run_failures_0006 SELECT run_id, error, n FROM run_failures")
    for name in ("run_totals", "run_failures", "run_counts", *views.VIEWS):
        op.execute(f"DROP VIEW {name}")
    op.rename_table("run_counts_0006", "run_counts")
    op.rename_table("run_failures_0006", "run_failures")
    for table in ("batch_counts", "batch_failures", "run_unsure"):
        op.drop_table(table)
    with op.batch_alter_table("batches") as batch:
        for name in (*BATCH_COUNTS, "prob_sgd_bins"):
            batch.drop_column(name)
    _predictions_with_id(conn)
    views.upgrade()
