"""Writing a batch's prediction rows in bulk, only those whose path the run has no row for:
COPY on PostgreSQL (through a staging table when some row may be there already); on SQLite,
multi-row ``INSERT ... VALUES`` statements in a savepoint, or one ``executemany`` of the rows
found new.

Both avoid SQLAlchemy's generic multi-row ``INSERT ... RETURNING``, whose statement of
thousands of placeholders the driver parses per batch. On SQLite the caller must hold the
write lock (every transaction here is ``BEGIN IMMEDIATE``), so that no other writer adds a
path between the look-up of existing paths and the write.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from itertools import chain
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from core.rows import ROW_KEYS, PredictionRow
from db.models import predictions

COLUMNS = ("run_id", "batch_seq", *ROW_KEYS, "scored_at")
_row_values = itemgetter(*ROW_KEYS)
_COLUMN_LIST = ", ".join(COLUMNS)
#: Paths looked up per statement on SQLite (it allows 32,766 parameters).
_SQLITE_LOOKUP = 500


def existing_paths(conn: Connection, run_id: int, paths: Sequence[str]) -> set[str]:
    """The paths among ``paths`` that already have a row in run ``run_id`` (SQLite, where the
    unique index on (run_id, path) serves ``path IN (...)``)."""
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
    rows: Sequence[PredictionRow],
    scored_at: datetime,
) -> list[PredictionRow]:
    """Write the rows whose path run ``run_id`` has no row for yet (the first of any repeated
    path); returns those rows. Rows already there are left as they are."""
    if conn.dialect.name == "postgresql":
        return _copy_new_rows(conn, run_id, batch_seq, rows, scored_at)
    # the timestamp exactly as SQLAlchemy stores it on this database (text on SQLite)
    column_type = predictions.c.scored_at.type.dialect_impl(conn.dialect)
    to_db = column_type.bind_processor(conn.dialect)
    at = to_db(scored_at) if to_db else scored_at
    if len({r["path"] for r in rows}) == len(rows) and _insert_all_new(conn, run_id, batch_seq,
                                                                      rows, at):
        return list(rows)
    existing = existing_paths(conn, run_id, [r["path"] for r in rows])
    new: list[PredictionRow] = []
    for row in rows:
        if row["path"] not in existing:
            existing.add(row["path"])
            new.append(row)
    if new:
        conn.exec_driver_sql(_SQLITE_INSERT, _params(run_id, batch_seq, new, at))
    return new


_SQLITE_INSERT = (
    f"INSERT INTO predictions ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT (run_id, path) DO NOTHING"
)


def _params(
    run_id: int, batch_seq: int, rows: Sequence[PredictionRow], at: Any
) -> list[tuple[Any, ...]]:
    return [(run_id, batch_seq, *_row_values(r), at) for r in rows]


#: Rows per statement of :func:`_insert_all_new`: 256 rows x 12 values, within SQLite's
#: 32,766 parameters.
_MULTI_ROWS = 256


@lru_cache(maxsize=4)
def _multi_row_insert(n_rows: int) -> str:
    """One ``INSERT`` of ``n_rows`` rows (the driver keeps it prepared: the same text)."""
    one = "(" + ", ".join("?" * len(COLUMNS)) + ")"
    return (
        f"INSERT INTO predictions ({_COLUMN_LIST}) VALUES {', '.join([one] * n_rows)} "
        "ON CONFLICT (run_id, path) DO NOTHING"
    )


def _insert_all_new(
    conn: Connection, run_id: int, batch_seq: int, rows: Sequence[PredictionRow], at: Any
) -> bool:
    """SQLite, a batch with no repeated path: insert every row in a savepoint and keep them if
    every one went in (the first delivery of a batch, the common case), which spares looking
    up each path first. If some path was already in the run, undo and return ``False``: the
    caller then writes only the new rows, knowing which they are.

    Rows go in :data:`_MULTI_ROWS` at a time, one multi-row ``INSERT ... VALUES`` each, which
    SQLite steps once per statement where ``executemany`` steps once per row."""
    dbapi = conn.connection.driver_connection
    assert dbapi is not None, "a connection in a transaction has its driver connection"
    conn.exec_driver_sql("SAVEPOINT all_new")
    before = dbapi.total_changes
    for start in range(0, len(rows), _MULTI_ROWS):
        part = _params(run_id, batch_seq, rows[start : start + _MULTI_ROWS], at)
        conn.exec_driver_sql(_multi_row_insert(len(part)), tuple(chain.from_iterable(part)))
    if dbapi.total_changes - before == len(rows):
        conn.exec_driver_sql("RELEASE all_new")
        return True
    conn.exec_driver_sql("ROLLBACK TO all_new")
    conn.exec_driver_sql("RELEASE all_new")
    return False


#: Whether any row of this batch is there (the index on (run_id, batch_seq) answers it).
_BATCH_WRITTEN = (
    "SELECT EXISTS (SELECT 1 FROM predictions WHERE run_id = %s AND batch_seq = %s)"
)
_COPY_DIRECT = f"COPY predictions ({_COLUMN_LIST}) FROM STDIN"
#: A session's staging table: same column types as predictions, emptied at every commit.
_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS incoming_predictions ON COMMIT DELETE ROWS AS "
    f"SELECT 0 AS ord, {_COLUMN_LIST} FROM predictions WITH NO DATA"
)
_COPY = f"COPY incoming_predictions (ord, {_COLUMN_LIST}) FROM STDIN"
_MOVE = (
    f"INSERT INTO predictions ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} "
    "FROM incoming_predictions ORDER BY ord ON CONFLICT (run_id, path) DO NOTHING RETURNING path"
)


def _copy_new_rows(
    conn: Connection,
    run_id: int,
    batch_seq: int,
    rows: Sequence[PredictionRow],
    scored_at: datetime,
) -> list[PredictionRow]:
    """PostgreSQL. The first delivery of a batch (no row of it there yet, no path repeated)
    is COPied straight into ``predictions``, inside a savepoint: should a path of it be in the
    run already (the producer never sends one twice), the unique index refuses the COPY and
    the batch takes the general way. That way COPies the rows into a temporary table, then
    runs one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING path``: the unique
    index finds conflicts whatever the planner thinks (``path = ANY(...)`` made it scan every
    row of the run: O(n) per batch).

    Runs on the connection's own psycopg cursor, inside the caller's transaction; a driver
    error is raised as SQLAlchemy raises it for any statement (a lost server is an
    ``OperationalError``, which the task retries)."""
    dbapi = conn.connection.driver_connection
    assert dbapi is not None, "a connection in a transaction has its driver connection"
    statement = _BATCH_WRITTEN
    try:
        with dbapi.cursor() as cursor:
            cursor.execute(_BATCH_WRITTEN, (run_id, batch_seq))
            (written,) = cursor.fetchone()
            if not written and len({r["path"] for r in rows}) == len(rows):
                statement = _COPY_DIRECT
                try:
                    with dbapi.transaction():  # a savepoint in the caller's transaction
                        with cursor.copy(_COPY_DIRECT) as copy:
                            for r in rows:
                                copy.write_row((run_id, batch_seq, *_row_values(r), scored_at))
                    return list(rows)
                except conn.dialect.loaded_dbapi.IntegrityError:
                    pass  # a path the run has from another batch: the general way below
            statement = _STAGING
            cursor.execute(_STAGING)
            statement = _COPY
            with cursor.copy(_COPY) as copy:
                for i, r in enumerate(rows):
                    copy.write_row((i, run_id, batch_seq, *_row_values(r), scored_at))
            statement = _MOVE
            cursor.execute(_MOVE)
            inserted = {path for (path,) in cursor.fetchall()}
    except conn.dialect.loaded_dbapi.Error as e:
        lost = conn.dialect.is_disconnect(e, dbapi, None)
        if lost:
            conn.invalidate(e)
        raise DBAPIError.instance(
            statement, None, e, conn.dialect.loaded_dbapi.Error,
            connection_invalidated=lost, dialect=conn.dialect,
        ) from e
    new: list[PredictionRow] = []
    for row in rows:
        if row["path"] in inserted:
            inserted.discard(row["path"])
            new.append(row)
    return new
