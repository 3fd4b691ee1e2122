"""What the ``worker`` launcher checks of its broker and its database before any worker
starts, so that a setting no batch could survive is refused once, with exit 2 and what to
do, instead of every batch being lost one by one later. A broker or a database that does
not answer yet is no such setting: the workers wait for it, and the launcher says so.

The launcher imports neither torch nor celery: these checks use redis-py and SQLAlchemy.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from core import defaults
from core.errors import WrongDatabase
from core.text import first_line, mask_url
from core.wire import check_eviction_policy

#: Seconds the launcher waits for the broker to answer its checks.
CHECK_TIMEOUT = 3.0


def check_broker(url: str, allow_eviction: bool = False) -> str | None:
    """:class:`core.errors.RedisPolicyError` for a Redis that may evict queued batches; else
    a line to show (the risk accepted with ``DIGITSCORE_ALLOW_EVICTION=1``, or that the
    broker could not be asked yet: the workers wait for it), or ``None``."""
    import redis

    if urlsplit(url).scheme not in ("redis", "rediss"):
        return None
    client = redis.Redis.from_url(
        url, socket_connect_timeout=CHECK_TIMEOUT, socket_timeout=CHECK_TIMEOUT
    )
    try:
        return check_eviction_policy(client, mask_url(url), allow_eviction)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        return (
            f"the broker {mask_url(url)} does not answer yet ({first_line(e)}): the workers "
            f"wait for it; its maxmemory-policy is not checked ({defaults.ALLOW_EVICTION_ENV})"
        )
    finally:
        client.close()


#: How PostgreSQL says, at connect time, that the database is not there.
_NO_SUCH_DATABASE = re.compile(r'database "[^"]*" does not exist')


def check_database(url: str) -> str | None:
    """:class:`WrongDatabase` for a database that does not exist (a SQLite file that is not
    there is not created) or holds tables but no digitscore schema this release knows; else
    a line to show when it does not answer yet, or ``None``. An empty database is fine: the
    first worker or producer to use it creates the schema."""
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import DBAPIError

    from db.session import driver_reason, known_revisions, make_engine, normalize_url

    parsed = normalize_url(url)
    shown = mask_url(parsed)
    path = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and path not in ("", ":memory:"):
        if not os.path.exists(path):
            raise WrongDatabase(
                f"the database {shown} does not exist (no file {os.path.abspath(path)!r}): "
                f"set {defaults.DATABASE_URL_ENV} to the database the producer writes to"
            )
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            version = None
            if "alembic_version" in tables:
                version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError as e:
        reason = driver_reason(e)
        if _NO_SUCH_DATABASE.search(reason):
            raise WrongDatabase(
                f"the database {shown} does not exist: create it, or set "
                f"{defaults.DATABASE_URL_ENV} to the database the producer writes to"
            ) from None
        return (f"the database {shown} does not answer yet ({reason}): the workers wait "
                "for it, each batch staying queued")
    finally:
        engine.dispose()
    if tables and version not in known_revisions():
        what = (f"its schema is revision {version!r}, which this release does not know"
                if version else "tables " + ", ".join(sorted(tables)[:5]) + " but no digitscore "
                "schema")
        raise WrongDatabase(
            f"the database {shown} is not a digitscore database ({what}): set "
            f"{defaults.DATABASE_URL_ENV} to the database the producer writes to"
        )
    return None
