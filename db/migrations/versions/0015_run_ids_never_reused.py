"""Run ids are never reused: on SQLite ``runs.id`` becomes ``INTEGER PRIMARY KEY
AUTOINCREMENT``, so a run whose row was deleted by hand cannot lend its id, and the batches
and rows it left behind, to the next submit. PostgreSQL's sequence never hands a number out
twice already, so there nothing changes.

SQLite cannot add AUTOINCREMENT to a table: ``runs`` is rebuilt: a new empty table, the old
one's rows kept aside, the old table dropped, the new one renamed and filled. Its columns are
read from the database, so the rebuild keeps whatever earlier migrations gave it; the views
(which SQLite checks when a table is renamed) and the indexes of ``runs`` are dropped and
created again as they were.
The foreign keys into ``runs`` are checked at commit (``defer_foreign_keys``): dropping
``runs`` counts every row that refers to a run as broken, and putting the run back mends
it, so the rows a hand-deleted run left behind are neither counted nor removed.

Revision ID: 0015
Revises: 0011
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0011"
branch_labels = None
depends_on = None


def _schema_sql(conn, where: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        sa.text(f"SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL AND {where}")
    )
    return [(name, sql) for name, sql in rows]


def _rebuild_runs(conn, autoincrement: bool) -> None:
    views = _schema_sql(conn, "type = 'view'")
    indexes = _schema_sql(conn, "type = 'index' AND tbl_name = 'runs'")
    for name, _ in views:
        conn.execute(sa.text(f'DROP VIEW "{name}"'))
    metadata = sa.MetaData()  # the tables runs refers to are reflected into it too
    old = sa.Table("runs", metadata, autoload_with=conn)
    new = sa.Table(
        "runs_rebuilt",
        metadata,
        *[c._copy() for c in old.columns],
        *[
            sa.ForeignKeyConstraint(list(fk.column_keys), [e.target_fullname for e in fk.elements])
            for fk in old.foreign_key_constraints
        ],
        sqlite_autoincrement=autoincrement,
    )
    for column in new.columns:
        column.index = column.unique = None  # the indexes are copied as they were, below
    new.create(conn)
    names = ", ".join(f'"{c.name}"' for c in old.columns)
    conn.execute(sa.text(f"CREATE TEMP TABLE runs_saved AS SELECT {names} FROM runs"))
    conn.execute(sa.text("PRAGMA defer_foreign_keys = ON"))
    conn.execute(sa.text("DROP TABLE runs"))  # each row referring to a run counts as broken
    conn.execute(sa.text("ALTER TABLE runs_rebuilt RENAME TO runs"))
    # ... and is mended when its run comes back
    conn.execute(sa.text(f"INSERT INTO runs ({names}) SELECT {names} FROM runs_saved"))
    conn.execute(sa.text("DROP TABLE runs_saved"))
    if autoincrement:
        _skip_used_ids(conn)
    for _, sql in indexes + views:
        conn.execute(sa.text(sql))


def _skip_used_ids(conn) -> None:
    """Start the next run id past every run id any table holds, so a run deleted by hand
    before this migration cannot lend its id to the next submit either."""
    inspector = sa.inspect(conn)
    tables = [
        t
        for t in inspector.get_table_names()
        if t != "runs" and "run_id" in {c["name"] for c in inspector.get_columns(t)}
    ]
    used = " UNION ALL ".join(
        ["SELECT MAX(id) AS n FROM runs", *[f'SELECT MAX(run_id) FROM "{t}"' for t in tables]]
    )
    top = conn.execute(sa.text(f"SELECT MAX(n) FROM ({used}) AS used")).scalar() or 0
    conn.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = 'runs'"))
    conn.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('runs', :n)"), {"n": top})


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":
        _rebuild_runs(conn, autoincrement=True)


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":
        _rebuild_runs(conn, autoincrement=False)
