"""Models keep how they were trained: the weight decay, the epoch whose weights were kept (the
best on validation) and the learning curve, one JSON object per epoch.

Existing models get NULL in all three: they were trained without them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("weight_decay", sa.Float, nullable=True))
    op.add_column("models", sa.Column("best_epoch", sa.Integer, nullable=True))
    op.add_column("models", sa.Column("learning_curve", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        for name in ("learning_curve", "best_epoch", "weight_decay"):
            batch.drop_column(name)
