"""A run has a priority: ``high``, ``normal`` or ``low`` (``submit --priority``), the order
in which workers take its batches from the queue (core/wire.message_priority). A CHECK keeps
the column to those three words.

Existing runs are ``normal`` runs, which is what their messages were sent as.

Revision ID: 0017
Revises: 0015
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0015"
branch_labels = None
depends_on = None

CHECK = "priority IN ('high', 'normal', 'low')"


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":  # SQLite adds a column with its CHECK, or not at all
        conn.execute(sa.text(
            "ALTER TABLE runs ADD COLUMN priority VARCHAR(10) DEFAULT 'normal' NOT NULL "
            f"CONSTRAINT ck_runs_priority CHECK ({CHECK})"
        ))
        return
    op.add_column(
        "runs", sa.Column("priority", sa.String(10), nullable=False, server_default="normal")
    )
    op.create_check_constraint("ck_runs_priority", "runs", CHECK)


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":  # a column's own CHECK goes with it; no rebuild of runs
        conn.execute(sa.text("ALTER TABLE runs DROP COLUMN priority"))
        return
    op.drop_constraint("ck_runs_priority", "runs", type_="check")
    op.drop_column("runs", "priority")
