"""What the project says about itself is true: the Python it claims runs its code, the files
it packages exist, every run status it names is one the code writes, and the migration each
column's comment names is the one that adds it."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from sqlalchemy import text

from core.columns import batch_columns
from db import batch_life, cancellation, queries
from db.models import RUN_STATUSES

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "db", "worker", "producer")
#: The Python version each name of ``typing`` first appeared in, of those newer than 3.9.
TYPING_SINCE = {
    "Unpack": (3, 11), "Self": (3, 11), "LiteralString": (3, 11), "Never": (3, 11),
    "assert_never": (3, 11), "reveal_type": (3, 11), "TypeVarTuple": (3, 11),
    "Required": (3, 11), "NotRequired": (3, 11), "dataclass_transform": (3, 11),
    "override": (3, 12), "TypeAliasType": (3, 12), "TypeIs": (3, 13), "ReadOnly": (3, 13),
}
#: Standard modules newer than 3.9 and the version each came with.
MODULE_SINCE = {"tomllib": (3, 11)}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def claimed_python() -> tuple[int, int]:
    match = re.fullmatch(r">=\s*3\.(\d+)", pyproject()["project"]["requires-python"])
    assert match, "requires-python must read >=3.N"
    return 3, int(match.group(1))


def needed_python(source: str) -> tuple[int, int]:
    """The oldest Python that has every ``typing`` name and standard module ``source``
    imports (of those listed above)."""
    needed = (3, 9)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "typing":
            needed = max([needed, *(TYPING_SINCE.get(a.name, (3, 9)) for a in node.names)])
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                node.value.id == "typing"):
            needed = max(needed, TYPING_SINCE.get(node.attr, (3, 9)))
        elif isinstance(node, ast.Import):
            needed = max([needed, *(MODULE_SINCE.get(a.name, (3, 9)) for a in node.names)])
    return needed


def test_needed_python_sees_new_typing_names():
    assert needed_python("from typing import Any, Unpack\n") == (3, 11)
    assert needed_python("import typing\nx: typing.TypeIs\n") == (3, 13)
    assert needed_python("from typing import Any\n") == (3, 9)


def test_the_python_claimed_has_everything_the_code_imports():
    claimed = claimed_python()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            need = needed_python(path.read_text())
            where = path.relative_to(ROOT)
            assert need <= claimed, f"{where} needs Python {need}, {claimed} claimed"
    major, minor = claimed
    assert pyproject()["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert f"Python {major}.{minor}+" in (ROOT / "README.md").read_text()


def test_every_packaged_file_exists():
    for package, patterns in pyproject()["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((ROOT / package).glob(pattern)), f"{package}/{pattern} matches no file"
    for package in pyproject()["tool"]["setuptools"]["packages"]:
        assert (ROOT / package.replace(".", "/") / "__init__.py").exists(), package


def test_every_run_status_is_one_the_code_writes(memory_engine):
    """A run is created ``queued`` (db/queries.create_run), becomes ``running`` when a batch
    is stored and ``done`` when the last is (db/queries.settle_run), or ``cancelled``
    (db/cancellation.cancel_run); the statuses the schema allows and documents are exactly
    those."""
    engine = memory_engine
    with engine.begin() as conn:
        model_id = conn.execute(text(
            "INSERT INTO models (created_at, train_dir, classes, height, width, n_train, "
            "n_valid, loss, epochs, lr, batch_size, seed, ideal_images, sgd_weights, sgd_bias) "
            "VALUES ('2026-12-02 00:00:00', 't', '[\"3\"]', 28, 28, 1, 1, 'x', 1, 1, 1, 1, "
            "x'', x'', x'') RETURNING id")).scalar_one()
        run_id, _ = queries.create_run(conn, model_id, "/d", "celery")
        for seq in (0, 1):
            batch_life.record_batch(conn, run_id, seq, [f"3/{seq}.png"], 0)

    def status() -> str:
        with engine.connect() as conn:
            return str(queries.get_run(conn, run_id)["status"])

    written = {status()}
    for seq in (0, 1):
        rows = batch_life.poison_rows([f"3/{seq}.png"], ["3"], 3)
        batch_life.store_batch(engine, run_id, seq, batch_columns(rows), "failed", 1)
        written.add(status())
    written.add(queries.finish_submission(engine, run_id, 2, 0))
    with engine.begin() as conn:
        run_id, _ = queries.create_run(conn, model_id, "/d", "celery")
    cancellation.cancel_run(engine, run_id)
    written.add(status())
    assert written == set(RUN_STATUSES)
    schema = (ROOT / "docs" / "schema.md").read_text()
    runs_table = schema[schema.index("## `runs`"):schema.index("## `batches`")]
    status_row = next(line for line in runs_table.splitlines() if line.startswith("| `status`"))
    assert set(re.findall(r"`([a-z]+)`", status_row)) - {"status", "n_failed"} == written


def test_the_migration_a_column_comment_names_adds_that_column():
    """A comment in db/models.py naming ``migration NNNN`` just above a column: that
    migration's file mentions the column."""
    lines = (ROOT / "db" / "models.py").read_text().splitlines()
    versions = ROOT / "db" / "migrations" / "versions"
    checked = 0
    for i, line in enumerate(lines):
        named = re.search(r"migration (\d{4})", line)
        if not (named and line.strip().startswith("#")):
            continue
        column = next((re.search(r'Column\("(\w+)"', later) for later in lines[i + 1:i + 3]
                       if "Column(" in later), None)
        if column is None:
            continue
        migration = next(versions.glob(f"{named.group(1)}_*.py")).read_text()
        assert f'"{column.group(1)}"' in migration, (line, column.group(1))
        checked += 1
    assert checked >= 2
