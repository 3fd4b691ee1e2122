"""On PostgreSQL, ``predictions`` is partitioned by run: each run's rows are a table of
their own, ``predictions_run_<id>``, made when the run is created (db/queries.create_run).
A run's unique (run_id, path) index is built when the run is finished, in one sort, instead
of growing with every row the run's writers COPY in (docs/performance.md, issue 23); the
partial index of failed rows is the parent's and so every partition's.

Existing rows move into their run's partition, and each partition gets its unique index at
once. SQLite is unchanged: it has no partitions.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-02
"""

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

COLUMNS = ("run_id, batch_seq, path, label, pred_l1, pred_l2, pred_sgd, dist_l1, dist_l2, "
           "prob_sgd, error, scored_at")
TABLE = (
    "CREATE TABLE {name} (run_id INTEGER NOT NULL, batch_seq INTEGER NOT NULL, "
    "path TEXT NOT NULL, label TEXT, pred_l1 TEXT, pred_l2 TEXT, pred_sgd TEXT, "
    "dist_l1 FLOAT, dist_l2 FLOAT, prob_sgd FLOAT, error TEXT, "
    "scored_at TIMESTAMP WITH TIME ZONE NOT NULL){tail}"
)
FAILURES = ("CREATE INDEX ix_predictions_failures ON {name} (run_id, path) "
            "WHERE error IS NOT NULL")


def _views_0002():
    """Migration 0002's module, whose views over ``predictions`` are rebuilt with it."""
    path = Path(__file__).with_name("0002_views.py")
    spec = importlib.util.spec_from_file_location("digitscore_migration_0002", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _views_dropped():
    """Drop the views over ``predictions``; return migration 0002's module, to rebuild them."""
    views = _views_0002()
    for name in views.VIEWS:
        op.execute(f"DROP VIEW {name}")
    return views


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    views = _views_dropped()
    op.execute("ALTER TABLE predictions RENAME TO predictions_0017")
    op.execute("ALTER TABLE predictions_0017 DROP CONSTRAINT uq_predictions_run_path")
    op.execute("DROP INDEX ix_predictions_failures")
    op.execute(TABLE.format(name="predictions", tail=" PARTITION BY LIST (run_id)"))
    op.execute(FAILURES.format(name="predictions"))
    run_ids = conn.execute(sa.text(
        "SELECT id FROM runs UNION SELECT DISTINCT run_id FROM predictions_0017"
    )).scalars().all()
    for run_id in run_ids:
        name = f"predictions_run_{int(run_id)}"
        op.execute(f"CREATE TABLE {name} (LIKE predictions INCLUDING DEFAULTS)")
        op.execute(f"ALTER TABLE predictions ATTACH PARTITION {name} FOR VALUES IN ({run_id})")
    op.execute(f"INSERT INTO predictions ({COLUMNS}) SELECT {COLUMNS} FROM predictions_0017")
    op.execute("DROP TABLE predictions_0017")
    for run_id in run_ids:
        name = f"predictions_run_{int(run_id)}"
        op.execute(f"CREATE UNIQUE INDEX {name}_path ON {name} (run_id, path)")
    views.upgrade()


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    views = _views_dropped()
    op.execute(TABLE.format(name="predictions_0018", tail=""))
    op.execute(f"INSERT INTO predictions_0018 ({COLUMNS}) SELECT {COLUMNS} FROM predictions")
    op.execute("DROP TABLE predictions")  # and every partition with it
    op.execute("ALTER TABLE predictions_0018 RENAME TO predictions")
    op.execute("ALTER TABLE predictions ADD CONSTRAINT uq_predictions_run_path "
               "UNIQUE (run_id, path)")
    op.execute(FAILURES.format(name="predictions"))
    views.upgrade()
