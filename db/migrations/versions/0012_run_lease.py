"""A run knows its live submitter, and a batch how often it was re-sent.

``runs.lease_holder`` (``pid@host``) and ``runs.lease_until`` are set by the ``submit`` or
``resume`` sending the run, renewed every few seconds, cleared when it ends; so ``status``
tells a submit still sending from one that was interrupted, and ``resume`` refuses while
another process sends. ``batches.resends`` counts the re-sends of a batch found lost by a
healer (``producer heal``, ``--wait``), which space them out.

Existing runs have no lease (nothing sends them now) and batches no re-send.

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("lease_holder", sa.String(300), nullable=True))
    op.add_column("runs", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "batches",
        sa.Column("resends", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("resends")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("lease_holder")
