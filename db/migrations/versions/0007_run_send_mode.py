"""Each run records how its batches reach the workers: ``bytes`` (through Redis, as every
run before did) or ``paths`` (each worker reads the files from the run's source directory).

Existing runs are ``bytes`` runs.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "runs",
        sa.Column("send_mode", sa.String(10), nullable=False, server_default="bytes"),
    )


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("send_mode")
