"""Workers register which secret they check signatures with (``workers.signing``: a
fingerprint, never the secret, or 'none'), so a producer can say when the workers of its
queue would drop its messages for their signature; batches count the deliveries the task
time limit stopped (``batches.time_limited``), so that the next delivery splits the batch.

Existing workers get NULL: they registered before they said; existing batches 0.

Revision ID: 0011
Revises: 0012
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workers", sa.Column("signing", sa.String(16), nullable=True))
    op.add_column(
        "batches",
        sa.Column("time_limited", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("signing")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("time_limited")
