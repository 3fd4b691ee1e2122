"""Runs count their labelled rows and each predictor's right answers, so that a batch's
commit keeps the accuracies exact by adding its own rows' counts (no aggregate over the run).

Existing runs get the counts of their rows, and their accuracies are set from them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COUNTS = ("n_labelled", "n_correct_l1", "n_correct_l2", "n_correct_sgd")
_LABELLED = (
    "SELECT COUNT(*) FROM predictions p WHERE p.run_id = runs.id "
    "AND p.error IS NULL AND p.label IS NOT NULL"
)


def upgrade() -> None:
    for name in COUNTS:
        op.add_column("runs", sa.Column(name, sa.Integer, nullable=False, server_default="0"))
    rights = ", ".join(
        f"n_correct_{p} = ({_LABELLED} AND p.pred_{p} = p.label)" for p in ("l1", "l2", "sgd")
    )
    op.execute(f"UPDATE runs SET n_labelled = ({_LABELLED}), {rights}")
    accuracies = ", ".join(
        f"accuracy_{p} = CAST(n_correct_{p} AS DOUBLE PRECISION) / n_labelled"
        for p in ("l1", "l2", "sgd")
    )
    op.execute(f"UPDATE runs SET {accuracies} WHERE n_labelled > 0")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for name in COUNTS:
            batch.drop_column(name)
