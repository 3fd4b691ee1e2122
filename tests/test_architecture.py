"""The house rules of the layout: imports point one way, and enqueuing needs no torch."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGES = ("core", "db", "worker", "producer")
#: What each package may import of the others.
ALLOWED = {
    "core": set(),
    "db": {"core"},
    "worker": {"core", "db"},
    "producer": {"core", "db"},
}


def imported_packages(path: Path) -> set[str]:
    """The project packages a module imports anywhere in it (top level or in a function)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    bad = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package] - {package})
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_import_check_sees_a_wrong_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from producer.cli import cli\n")
    assert imported_packages(module) == {"producer"}


@pytest.mark.integration
def test_submit_to_a_broker_never_imports_torch(broker_env, sample_dir, model_db):
    """`producer submit DIR` with a broker set runs in a process that never loads torch."""
    code = (
        "import sys, json\n"
        "from producer.cli import cli\n"
        "try:\n"
        "    cli(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    print(json.dumps({'exit': e.code, 'torch': 'torch' in sys.modules}))\n"
    )
    env = {**os.environ, **broker_env, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, "submit", str(sample_dir / "valid"),
         "--database-url", model_db],
        env=env, capture_output=True, text=True, timeout=120,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"exit": 0, "torch": False}, out.stderr


@pytest.mark.parametrize("script", ["main", "cli"])
def test_the_console_script_freezes_the_imported_objects_before_exit(script):
    """``producer`` (``producer.cli:main``, as pyproject.toml installs it) freezes the objects
    its imports made after every other exit handler, so the interpreter's last collections
    skip them; the bare click group does not, which shows the check can fail."""
    entry = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines()
                 if line.startswith("producer ="))
    assert entry.split("=", 1)[1].strip().strip('"') == "producer.cli:main"
    probe = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count()))\n"
        f"from producer.cli import {script}\n"
        f"{script}(['runs', '--help'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    frozen = int(proc.stdout.rsplit("frozen at exit:", 1)[1])
    assert frozen > 10_000 if script == "main" else frozen == 0
