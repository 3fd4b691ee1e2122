"""Writing a batch's prediction rows in bulk: COPY on PostgreSQL, one prepared ``executemany``
on SQLite, and only the rows whose path the run does not have yet.

SQLAlchemy's generic multi-row ``INSERT ... RETURNING`` spent most of a PostgreSQL worker's
time in the driver parsing a statement of 6,000 placeholders per batch (a profile of two
workers on 50,000 digits: 45% of samples in ``psycopg._queries``). The caller must hold the
run's row lock (``SELECT ... FOR UPDATE``, or SQLite's write lock), so that no other writer
adds a path of this run between the look-up of existing paths and the write.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from db.models import Prediction

#: The keys of a prediction row as the batch function makes it, in the order written.
ROW_KEYS = (
    "path", "label", "pred_l1", "pred_l2", "pred_sgd", "dist_l1", "dist_l2", "prob_sgd", "error",
)
COLUMNS = ("run_id", "batch_seq", *ROW_KEYS, "scored_at")
_row_values = itemgetter(*ROW_KEYS)
_COLUMN_LIST = ", ".join(COLUMNS)
#: Paths looked up per statement on SQLite (it allows 32,766 parameters).
_SQLITE_LOOKUP = 500


def existing_paths(conn: Connection, run_id: int, paths: Sequence[str]) -> set[str]:
    """The paths among ``paths`` that already have a row in run ``run_id``."""
    if not paths:
        return set()
    if conn.dialect.name == "postgresql":
        sql = "SELECT path FROM predictions WHERE run_id = %(run)s AND path = ANY(%(paths)s)"
        return set(conn.exec_driver_sql(sql, {"run": run_id, "paths": list(paths)}).scalars())
    found: set[str] = set()
    for start in range(0, len(paths), _SQLITE_LOOKUP):
        chunk = list(paths[start : start + _SQLITE_LOOKUP])
        marks = ", ".join("?" * len(chunk))
        sql = f"SELECT path FROM predictions WHERE run_id = ? AND path IN ({marks})"
        found.update(conn.exec_driver_sql(sql, (run_id, *chunk)).scalars())
    return found


def insert_new_rows(
    conn: Connection,
    run_id: int,
    batch_seq: int,
    rows: Sequence[dict[str, Any]],
    scored_at: datetime,
) -> list[dict[str, Any]]:
    """Write the rows whose path run ``run_id`` has no row for yet (the first of any repeated
    path); returns those rows. Rows already there are left as they are."""
    existing = existing_paths(conn, run_id, [r["path"] for r in rows])
    new: list[dict[str, Any]] = []
    for row in rows:
        if row["path"] not in existing:
            existing.add(row["path"])
            new.append(row)
    if not new:
        return new
    if conn.dialect.name == "postgresql":
        _copy(conn, run_id, batch_seq, new, scored_at)
    else:
        # the timestamp exactly as SQLAlchemy stores it on this database (text on SQLite)
        column_type = Prediction.__table__.c.scored_at.type.dialect_impl(conn.dialect)
        to_db = column_type.bind_processor(conn.dialect)
        at = to_db(scored_at) if to_db else scored_at
        params = [(run_id, batch_seq, *_row_values(r), at) for r in new]
        marks = ", ".join("?" * len(COLUMNS))
        conn.exec_driver_sql(
            f"INSERT INTO predictions ({_COLUMN_LIST}) VALUES ({marks}) "
            "ON CONFLICT (run_id, path) DO NOTHING",
            params,
        )
    return new


def _copy(
    conn: Connection,
    run_id: int,
    batch_seq: int,
    rows: Sequence[dict[str, Any]],
    scored_at: datetime,
) -> None:
    """COPY the rows into ``predictions`` through the connection's own psycopg cursor, inside
    the transaction the caller began. A driver error is raised as SQLAlchemy raises it for
    any statement (a lost server is an ``OperationalError``, which the task retries)."""
    statement = f"COPY predictions ({_COLUMN_LIST}) FROM STDIN"
    dbapi = conn.connection.driver_connection
    try:
        with dbapi.cursor() as cursor, cursor.copy(statement) as copy:
            for r in rows:
                copy.write_row((run_id, batch_seq, *_row_values(r), scored_at))
    except conn.dialect.loaded_dbapi.Error as e:
        lost = conn.dialect.is_disconnect(e, dbapi, None)
        if lost:
            conn.invalidate(e)
        raise DBAPIError.instance(
            statement, None, e, conn.dialect.loaded_dbapi.Error,
            connection_invalidated=lost, dialect=conn.dialect,
        ) from e
