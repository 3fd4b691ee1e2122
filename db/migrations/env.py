"""Alembic environment: runs on the connection digitscore hands it (db.session.upgrade_schema)."""

from alembic import context
from sqlalchemy import create_engine

from db.models import metadata

config = context.config
target_metadata = metadata


def legacy_renames(connection) -> None:
    """On SQLite, a table rebuilt by a batch migration (create a copy, drop, rename) keeps the
    views over it: with SQLite's modern ALTER TABLE the rename re-checks every view, and fails
    on a view over the table just dropped ("error in view ...: no such table")."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("PRAGMA legacy_alter_table = ON")


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        legacy_renames(connection)
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("migrate with db.session.upgrade_schema, or set sqlalchemy.url")
    with create_engine(url).connect() as conn:
        legacy_renames(conn)
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


run()
