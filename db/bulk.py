"""Writing rows in bulk, one way per database: a batch's prediction rows by one binary COPY
on PostgreSQL (its data made from the batch's columns, db/pg_copy.py) and by multi-row
``INSERT ... VALUES`` on SQLite; other small sets of rows by one ``INSERT ... SELECT FROM
unnest(...)`` of arrays on PostgreSQL and the same multi-row ``INSERT`` on SQLite.

Each goes to the driver as it is: SQLAlchemy's handling of each of thousands of parameters
costs more than the statement. The rows are written as they are; which of them belong in
the table is the caller's to decide (db/batch_life.py writes a batch's rows only in the
transaction that marks it ``done`` or ``failed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from itertools import chain, repeat
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from core.columns import BatchColumns
from db.models import predictions
from db.pg_copy import FIELDS, copy_data

_COLUMN_LIST = ", ".join(FIELDS)
_COPY = f"COPY predictions ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)"
#: Parameters one SQLite statement may hold (SQLITE_MAX_VARIABLE_NUMBER since 3.32).
SQLITE_MAX_PARAMETERS = 32_766
#: Rows in one multi-row SQLite statement: the one chunk size of every such statement here,
#: fewer only where their values would pass :data:`SQLITE_MAX_PARAMETERS`.
SQLITE_ROWS = 500


def write_predictions(
    conn: Connection,
    run_id: int,
    batch_seq: int,
    columns: BatchColumns,
    scored_at: datetime,
) -> None:
    """Insert a batch's rows (``columns``) into ``predictions`` in the caller's transaction.
    A path the run already holds makes the unique index refuse the statement
    (``IntegrityError``)."""
    if not columns.paths:
        return
    if conn.dialect.name == "postgresql":
        _copy_rows(conn, copy_data(run_id, batch_seq, columns, scored_at))
        return
    # the timestamp exactly as SQLAlchemy stores it on this database (text on SQLite)
    column_type = predictions.c.scored_at.type.dialect_impl(conn.dialect)
    to_db = column_type.bind_processor(conn.dialect)
    at = to_db(scored_at) if to_db else scored_at
    insert_rows(conn, "predictions", dict.fromkeys(FIELDS, ""),
                list(zip(repeat(run_id), repeat(batch_seq), columns.paths, columns.labels,
                         *columns.answers, *columns.score_lists(), columns.errors, repeat(at))))


def _copy_rows(conn: Connection, data: bytes) -> None:
    """Binary COPY of ``data`` (db/pg_copy.py) in one write, on the connection's own psycopg
    cursor, inside the caller's transaction;
    a driver error is raised as SQLAlchemy raises it for any statement (a lost server is an
    ``OperationalError``, which the task retries; a path stored twice an
    ``IntegrityError``)."""
    dbapi = conn.connection.driver_connection
    assert dbapi is not None, "a connection in a transaction has its driver connection"
    try:
        with dbapi.cursor() as cursor, cursor.copy(_COPY) as copy:
            copy.write(data)
    except conn.dialect.loaded_dbapi.Error as e:
        lost = conn.dialect.is_disconnect(e, dbapi, None)
        if lost:
            conn.invalidate(e)
        raise DBAPIError.instance(
            _COPY, None, e, conn.dialect.loaded_dbapi.Error,
            connection_invalidated=lost, dialect=conn.dialect,
        ) from e


def stored_paths(conn: Connection, run_id: int, paths: Sequence[str]) -> set[str]:
    """The paths among ``paths`` that run ``run_id`` holds a row for: each looked up in the
    unique index on (run_id, path)."""
    if conn.dialect.name == "postgresql":
        return set(conn.exec_driver_sql(
            "SELECT p.path FROM unnest(%s::text[]) AS p(path) WHERE EXISTS "
            "(SELECT 1 FROM predictions x WHERE x.run_id = %s AND x.path = p.path)",
            (list(paths), run_id),
        ).scalars())
    found: set[str] = set()
    step = SQLITE_ROWS - 1  # a parameter per path, and one for the run's id
    for start in range(0, len(paths), step):
        chunk = list(paths[start : start + step])
        marks = ", ".join("?" * len(chunk))
        sql = f"SELECT path FROM predictions WHERE run_id = ? AND path IN ({marks})"
        found.update(conn.exec_driver_sql(sql, (run_id, *chunk)).scalars())
    return found


@lru_cache(maxsize=64)
def _values_sql(table: str, columns: tuple[str, ...], n_rows: int, tail: str) -> str:
    one = "(" + ", ".join(["?"] * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * n_rows)}{tail}"


def insert_rows(
    conn: Connection,
    table: str,
    columns: dict[str, str],
    rows: Sequence[tuple[Any, ...]],
    tail: str = "",
) -> None:
    """Insert ``rows`` (tuples in the order of ``columns``, which maps each column to its
    PostgreSQL type), ``tail`` (an ``ON CONFLICT`` clause) after the statement. On
    PostgreSQL one statement of fixed text, the rows as one array per column through
    ``unnest`` (prepared once by the driver); on SQLite multi-row ``VALUES`` statements of
    :data:`SQLITE_ROWS` rows, which SQLite steps once per statement where
    ``executemany`` steps once per row."""
    if not rows:
        return
    names = tuple(columns)
    if conn.dialect.name == "postgresql":
        arrays = ", ".join(f"%s::{t}[]" for t in columns.values())
        conn.exec_driver_sql(
            f"INSERT INTO {table} ({', '.join(names)}) SELECT * FROM unnest({arrays}){tail}",
            tuple(list(column) for column in zip(*rows, strict=True)),
        )
        return
    step = min(SQLITE_ROWS, SQLITE_MAX_PARAMETERS // len(names))
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        conn.exec_driver_sql(
            _values_sql(table, names, len(part), tail), tuple(chain.from_iterable(part))
        )
