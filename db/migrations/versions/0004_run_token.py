"""Each run gets a random token, which every message for it carries: a worker acts on a
message only when its own database holds that run with that token, so a producer and workers
on different databases can never touch each other's runs.

Existing runs get a token of their own.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("token", sa.String(32), nullable=True))
    conn = op.get_bind()
    runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("token", sa.String))
    for (run_id,) in conn.execute(sa.select(runs.c.id)).all():
        conn.execute(runs.update().where(runs.c.id == run_id).values(token=uuid.uuid4().hex))
    op.create_index("ix_runs_token", "runs", ["token"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_runs_token", table_name="runs")
    op.drop_column("runs", "token")
