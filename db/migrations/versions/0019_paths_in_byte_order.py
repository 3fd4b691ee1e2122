"""On PostgreSQL, the ``path`` columns of ``predictions`` and of the runs' kept lists
(``run_mistakes``, ``run_unsure``) compare by their bytes (``COLLATE "C"``), as SQLite's
text and Python's ``sorted`` do: ``ORDER BY path`` lists the same paths in the same order on
both databases, whatever the server's locale, and the kept lists' ties, which Python cuts
first (db/mistakes.py), fall as the server cuts them. Bytes also compare faster than a
locale's rules, which a finished run's unique index (db/queries.index_run_rows) is sorted by
(docs/performance.md). SQLite is unchanged.

The views over ``predictions`` (migration 0002) depend on its ``path`` and are rebuilt.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-03
"""

from alembic import context, op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

TABLES = ("predictions", "run_mistakes", "run_unsure")


def _collate(collation: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    views = context.script.get_revision("0002").module  # its views, as it made them
    for name in views.VIEWS:
        op.execute(f"DROP VIEW {name}")
    for table in TABLES:  # a partitioned table's partitions and indexes follow it
        op.execute(f"ALTER TABLE {table} ALTER COLUMN path TYPE text COLLATE {collation}")
    views.upgrade()


def upgrade() -> None:
    _collate('"C"')


def downgrade() -> None:
    _collate('"default"')
