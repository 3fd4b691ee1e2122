"""Runs keep their confusion counts (``run_counts``) and their failures by reason
(``run_failures``), added to by each batch's commit like the counts of ``runs``, so that a
report reads a few hundred numbers instead of every row of the run. Partial indexes on
``predictions`` hold each predictor's mistakes, surest first, and the failed rows, so that the
HTML report's top N and the first failures are read without scanning the run.

Existing runs get the counts of their rows.

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None

MISTAKE = "error IS NULL AND label IS NOT NULL AND pred_{p} <> label"
CONFIDENCE = {"l1": "dist_l1", "l2": "dist_l2", "sgd": "prob_sgd DESC"}


def _partial(name: str, columns: list, where: str) -> None:
    """An index over only the rows that meet ``where``, on both databases."""
    clause = sa.text(where)
    op.create_index(
        name, "predictions", columns, sqlite_where=clause, postgresql_where=clause
    )


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
    _partial("ix_predictions_failures", ["run_id", "path"], "error IS NOT NULL")
    for p, confidence in CONFIDENCE.items():
        _partial(
            f"ix_predictions_mistakes_{p}", ["run_id", sa.text(confidence), "path"],
            MISTAKE.format(p=p),
        )


def downgrade() -> None:
    for p in CONFIDENCE:
        op.drop_index(f"ix_predictions_mistakes_{p}", table_name="predictions")
    op.drop_index("ix_predictions_failures", table_name="predictions")
    op.drop_table("run_failures")
    op.drop_table("run_counts")
