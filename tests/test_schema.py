"""The schema is a public interface: migrations, models and docs must agree."""

from __future__ import annotations

import re
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from db.models import Base
from db.session import get_engine

DOCS = Path(__file__).resolve().parent.parent / "docs" / "schema.md"


def test_migrations_build_exactly_the_models_schema(any_db_url):
    engine = get_engine(any_db_url)  # first use: alembic upgrade head
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_schema_upgrade_is_idempotent(any_db_url):
    from db.session import dispose_engines, upgrade_schema

    engine = get_engine(any_db_url)
    upgrade_schema(engine)  # a second process starting later does the same
    dispose_engines()
    tables = set(inspect(get_engine(any_db_url)).get_table_names())
    assert {"models", "runs", "batches", "predictions", "alembic_version"} <= tables


def test_every_column_is_documented():
    doc = DOCS.read_text()
    for table in Base.metadata.sorted_tables:
        section = re.search(rf"## `{table.name}`.*?(?=\n## |\Z)", doc, re.S)
        assert section, f"docs/schema.md has no section for {table.name}"
        for column in table.columns:
            assert f"`{column.name}`" in section.group(0), f"{table.name}.{column.name}"


def test_database_password_never_printed(run_cli, tmp_path):
    url = "postgresql://digits:hunter2-secret@127.0.0.1:1/nothing"
    r = run_cli("runs", "--database-url", url)
    assert r.exit_code != 0
    assert "127.0.0.1:1" in r.output and "hunter2-secret" not in r.output
    r = run_cli("runs", env={"DIGITSCORE_DATABASE_URL": url})
    assert "hunter2-secret" not in r.output
