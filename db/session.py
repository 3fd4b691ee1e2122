"""Engines and sessions: SQLite tuned for several writing processes, PostgreSQL via psycopg 3."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import StaticPool

from core import defaults
from core.errors import DatabaseUnavailable, DatabaseURLError
from core.text import first_line, mask_url

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Any 64-bit number of our own: serialises schema upgrades of processes starting at once.
_PG_MIGRATION_LOCK = 7_300_173_020_001


#: The databases digitscore runs on, and the driver each URL scheme means.
SUPPORTED = "sqlite:///PATH, postgresql://USER@HOST/DB (psycopg 3)"


def normalize_url(url: str) -> URL:
    """Parse a database URL; bare ``postgresql://`` means the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise DatabaseURLError(
            f"not a database URL: {mask_url(url)}; use {SUPPORTED}"
        ) from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite"):
        raise DatabaseURLError(
            f"unsupported database {parsed.drivername!r} in {mask_url(url)}: use {SUPPORTED}"
        )
    return parsed


def url_for_workers(url: URL | str) -> str:
    """The database URL as a worker elsewhere must be given it, password masked: a SQLite
    file's relative path made absolute (a worker resolves it from its own directory)."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(str(parsed.database))
        if not path.is_absolute():
            parsed = parsed.set(database=str(path.resolve()))
    return mask_url(parsed)


def make_engine(url: str) -> Engine:
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    memory = parsed.database in (None, "", ":memory:")
    if memory:
        engine = create_engine(
            parsed, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        timeout = defaults.SQLITE_BUSY_TIMEOUT_MS / 1000
        engine = create_engine(parsed, connect_args={"timeout": timeout})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
        # Let SQLAlchemy, not the driver, open transactions, so that we can make them IMMEDIATE.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={defaults.SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # pragma: no cover - trivial
        # Deferred: a read takes no write lock, so polls and reports never queue the
        # writers. A transaction whose first statement writes takes the write lock there,
        # under the busy timeout; one that reads and then writes would fail at once with
        # "database is locked" if another writer committed between, so those open with
        # IMMEDIATE (the execution option ``sqlite_immediate``).
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


# A migration's own ids, as Alembic's script template writes them.
_REVISION_LINE = re.compile(
    r"""^(revision|down_revision)\s*=\s*(?:"([^"]*)"|'([^']*)'|(None))\s*$""", re.M
)


def known_revisions() -> set[str]:
    """Every revision this digitscore's migrations know (from their ``revision`` lines)."""
    found = (_REVISION_LINE.findall(path.read_text())
             for path in (MIGRATIONS / "versions").glob("*.py"))
    return {m[1] or m[2] for lines in found for m in lines if m[0] == "revision"}


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    """The newest migration's revision, read from the files' ``revision`` and
    ``down_revision`` lines without importing Alembic; ``None`` when that cannot be told
    (then Alembic itself decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        found = {m[0]: m[1] or m[2] or None for m in _REVISION_LINE.findall(path.read_text())}
        if "revision" not in found:
            continue
        if "down_revision" not in found or found["revision"] is None:
            return None  # a merge of several parents, or something unusual
        revisions.add(found["revision"])
        if found["down_revision"] is not None:
            parents.add(found["down_revision"])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def schema_is_current(engine: Engine) -> bool:
    """Whether the database is at :func:`head_revision` already: one cheap query."""
    head = head_revision()
    if head is None:
        return False
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
            return list(versions) == [head]
    except DBAPIError:  # no such table yet (or no database: Alembic will say so)
        return False


def upgrade_schema(engine: Engine) -> None:
    """Create or migrate the schema to the newest Alembic revision (safe to run concurrently);
    a database already there costs one query and no import of Alembic."""
    if schema_is_current(engine):
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # Alembic logs each migration it runs with its docstring, at INFO: not for a worker's log
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with read_then_write(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    log.info("database schema %s is at revision %s", mask_url(engine.url), head_revision())


@contextmanager
def read_then_write(engine: Engine) -> Iterator[Connection]:
    """A transaction that reads before it writes: on SQLite it takes the write lock at its
    start (``BEGIN IMMEDIATE``), so that no writer can commit between its read and its
    write; elsewhere a plain transaction."""
    with engine.connect() as conn, conn.execution_options(sqlite_immediate=True).begin():
        yield conn


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose reads all see one commit, so that a report of a running run adds
    up: ``REPEATABLE READ`` on PostgreSQL, where each statement would otherwise see the
    newest commit; SQLite's deferred transaction reads one snapshot from its first read on."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        yield conn


_engines: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """One engine per URL per process, with the schema brought up to date on first use."""
    key = normalize_url(url).render_as_string(hide_password=False)
    engine = _engines.get(key)
    if engine is None:
        engine = make_engine(url)
        try:
            upgrade_schema(engine)
        except DBAPIError as e:
            engine.dispose()
            raise DatabaseUnavailable(
                f"cannot open the database {mask_url(url)}: {driver_reason(e)}; check "
                f"--database-url / {defaults.DATABASE_URL_ENV}"
            ) from e
        _engines[key] = engine
    return engine


def driver_reason(e: DBAPIError) -> str:
    """The first line of the database driver's own message, any URL in it masked."""
    return first_line(e.orig if e.orig is not None else e)


def dispose_engines(close: bool = True) -> None:
    """Forget every engine (between tests, or after a fork). In a forked child pass
    ``close=False``: the pooled connections are the parent's too, and closing them here
    would end them for the parent as well."""
    for engine in _engines.values():
        engine.dispose(close=close)
    _engines.clear()

