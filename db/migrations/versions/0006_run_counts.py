"""Runs keep their confusion counts (``run_counts``), their failures by reason
(``run_failures``) and their 100 most confident mistakes per predictor (``run_mistakes``),
kept by each batch's commit like the counts of ``runs``, so that a report reads a few hundred
numbers and rows instead of every row of the run. A partial index on ``predictions`` holds
the failed rows, so that the first failures are read without scanning the run.

Existing runs get the counts and mistakes of their rows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

KEPT = 100
#: each predictor's rank key: smaller is surer
RANK_KEY = {"l1": "dist_l1", "l2": "dist_l2", "sgd": "-prob_sgd"}


def _partial(name: str, columns: list, where: str) -> None:
    """An index over only the rows that meet ``where``, on both databases."""
    clause = sa.text(where)
    op.create_index(name, "predictions", columns, sqlite_where=clause, postgresql_where=clause)


def upgrade() -> None:
    op.create_table(
        "run_counts",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("predictor", sa.String(10), primary_key=True),
        sa.Column("label", sa.Text, primary_key=True),
        sa.Column("predicted", sa.Text, primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
    )
    op.create_table(
        "run_failures",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("error", sa.Text, primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
    )
    # the run_confusion view of migration 0002 is exactly these counts
    op.execute(
        "INSERT INTO run_counts (run_id, predictor, label, predicted, n) "
        "SELECT run_id, predictor, label, predicted, n FROM run_confusion "
        "WHERE predicted IS NOT NULL"
    )
    op.execute(
        "INSERT INTO run_failures (run_id, error, n) SELECT run_id, error, COUNT(*) "
        "FROM predictions WHERE error IS NOT NULL GROUP BY run_id, error"
    )
    op.create_table(
        "run_mistakes",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("predictor", sa.String(10), primary_key=True),
        sa.Column("path", sa.Text, primary_key=True),
        sa.Column("rank_key", sa.Float, nullable=False),
    )
    op.create_index(
        "ix_run_mistakes_rank", "run_mistakes", ["run_id", "predictor", "rank_key", "path"]
    )
    for p, key in RANK_KEY.items():
        op.execute(
            "INSERT INTO run_mistakes (run_id, predictor, path, rank_key) "
            f"SELECT run_id, '{p}', path, rank_key FROM (SELECT run_id, path, {key} AS rank_key, "
            f"ROW_NUMBER() OVER (PARTITION BY run_id ORDER BY {key}, path) AS n "
            "FROM predictions WHERE error IS NULL AND label IS NOT NULL "
            f"AND pred_{p} <> label AND {key} IS NOT NULL) AS ranked WHERE n <= {KEPT}"
        )
    _partial("ix_predictions_failures", ["run_id", "path"], "error IS NOT NULL")


def downgrade() -> None:
    op.drop_index("ix_predictions_failures", table_name="predictions")
    op.drop_table("run_mistakes")
    op.drop_table("run_failures")
    op.drop_table("run_counts")
