"""Each batch keeps why its last delivery failed, so that a batch given up on (poison) says
why in its images' error rows: a model that cannot be loaded, a scoring error, or a worker
process that died holding it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("last_failure", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("last_failure")
