"""The deployment files: docker-compose.yml as `docker-compose config` renders it, and the
Dockerfile. Nothing is built or started (that needs a Docker engine); the compose file is
checked by Compose itself and then by what it resolves to.

`docker-compose` missing skips these tests locally and fails them under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import service_missing

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: Distinctive passwords, so that where they end up in the rendered config can be checked.
SECRETS = {
    "DIGITSCORE_DB_PASSWORD": "db-sentinel-4f1c",
    "DIGITSCORE_REDIS_PASSWORD": "redis-sentinel-9a2e",
    "DIGITSCORE_FLOWER_PASSWORD": "flower-sentinel-77d0",
    "DIGITSCORE_SECRET": "secret-sentinel-5e3b-2c71",
}
_PARSE_YAML = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"


def _compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        service_missing("docker-compose")
    return exe  # type: ignore[return-value]


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **SECRETS, **(env or {})}
    for var in ("DIGITSCORE_BIND", "DIGITSCORE_IMAGES", "DIGITSCORE_TORCH_VARIANT"):
        full_env.pop(var, None)  # the file's own defaults, not the developer's shell
    return subprocess.run(
        [_compose(), "--file", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=120,
    )


def _parse(yaml_text: str) -> dict[str, Any]:
    """YAML to data: with PyYAML when the test environment has it, else with the interpreter
    of Compose v1, a Python program that always has it (Compose v2 answers JSON itself)."""
    try:
        import yaml
    except ImportError:
        exe = _compose()
        shebang = Path(exe).read_text(errors="replace").splitlines()[0]
        python = shebang[2:].strip().split()
        out = subprocess.run(
            [*python, "-c", _PARSE_YAML], input=yaml_text, capture_output=True, text=True
        )
        assert out.returncode == 0, "cannot parse YAML: add pyyaml to the test extra"
        return json.loads(out.stdout)
    return yaml.safe_load(yaml_text)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The compose file as Compose resolves it (v2 writes JSON; v1 only YAML)."""
    version = _run(["version", "--short"]).stdout.strip().lstrip("v")
    if version and not version.startswith("1."):
        out = _run(["config", "--format", "json"])
        assert out.returncode == 0, "docker-compose config failed"
        return json.loads(out.stdout)
    out = _run(["config"])
    assert out.returncode == 0, "docker-compose config failed"
    return _parse(out.stdout)


def _leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, str(i)))
    else:
        yield path, str(node)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Volumes in the long form, whichever form Compose printed."""
    mounts = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            mode = parts[2] if len(parts) > 2 else "rw"
            mounts.append({"source": source, "target": target, "read_only": "ro" in mode})
        else:
            mounts.append(v)
    return mounts


def _argv(value: Any) -> list[str]:
    return value.split() if isinstance(value, str) else list(value or [])


# ---------------------------------------------------------------- tests


def test_compose_file_is_valid():
    out = _run(["config", "-q"])
    assert out.returncode == 0
    assert out.stdout == ""


def test_services_are_present(config):
    assert {"redis", "postgres", "worker", "flower", "producer"} <= set(config["services"])


def test_worker_reserves_every_gpu(config):
    worker = config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] in ("all", -1)  # Compose v2 writes `all` as -1
    assert devices[0]["capabilities"] == ["gpu"]
    assert _argv(worker.get("command")) == ["worker"]
    assert worker.get("init") is True  # an init as PID 1 reaps what the launcher cannot


def test_services_share_the_broker_database_and_visibility_timeout(config):
    services = config["services"]
    worker = _env(services["worker"])
    assert worker["DIGITSCORE_BROKER_URL"].startswith("redis://")
    assert worker["DIGITSCORE_BROKER_URL"].endswith("@redis:6379/0")
    assert worker["DIGITSCORE_DATABASE_URL"].startswith("postgresql+psycopg://digitscore:")
    assert worker["DIGITSCORE_DATABASE_URL"].endswith("@postgres:5432/digitscore")
    assert int(worker["DIGITSCORE_VISIBILITY_TIMEOUT"]) == 600
    assert worker["DIGITSCORE_REQUIRE_GPU"] == "1"  # a GPU service never scores on the CPU
    producer = _env(services["producer"])
    for var in ("DIGITSCORE_BROKER_URL", "DIGITSCORE_DATABASE_URL", "DIGITSCORE_QUEUE"):
        assert producer[var] == worker[var], var
    assert _env(services["flower"])["DIGITSCORE_BROKER_URL"] == worker["DIGITSCORE_BROKER_URL"]
    for name in ("worker", "producer"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"


def test_visibility_timeout_comes_from_the_environment():
    out = _run(["config"], env={"DIGITSCORE_VISIBILITY_TIMEOUT": "1800"})
    assert out.returncode == 0
    assert _env(_parse(out.stdout)["services"]["worker"])["DIGITSCORE_VISIBILITY_TIMEOUT"] == (
        "1800"
    )


def test_postgres_has_a_healthcheck_and_a_named_volume(config):
    postgres = config["services"]["postgres"]
    assert "pg_isready" in " ".join(_argv(postgres["healthcheck"]["test"]))
    (mount,) = [m for m in _mounts(postgres) if m["target"] == "/var/lib/postgresql/data"]
    assert mount["source"] in config["volumes"]  # named, so it outlives the container
    assert _env(postgres)["POSTGRES_PASSWORD"] == SECRETS["DIGITSCORE_DB_PASSWORD"]
    assert "redis-cli" in " ".join(_argv(config["services"]["redis"]["healthcheck"]["test"]))


def test_producer_is_a_one_off_with_the_images_read_only(config):
    producer = config["services"]["producer"]
    assert producer["profiles"] == ["tools"]  # `up` never starts it; `run producer ...` does
    assert _argv(producer["entrypoint"]) == ["producer"]
    assert producer.get("restart") in ("no", None)
    (images,) = [m for m in _mounts(producer) if m["target"] == "/images"]
    assert images["read_only"] is True
    assert "deploy" not in producer  # it needs no GPU


def test_flower_monitors_with_the_apps_own_msgpack_configuration(config):
    flower = config["services"]["flower"]
    command = _argv(flower["command"])
    assert command[:4] == ["celery", "--app", "worker.tasks", "flower"]
    assert flower["image"] == config["services"]["worker"]["image"]
    auth = _env(flower)["FLOWER_BASIC_AUTH"]
    assert auth == f"admin:{SECRETS['DIGITSCORE_FLOWER_PASSWORD']}"


def test_no_pickle_anywhere(config):
    assert "pickle" not in COMPOSE_FILE.read_text().lower()
    assert "pickle" not in json.dumps(config).lower()
    assert "pickle" not in (ROOT / "Dockerfile").read_text().lower()


def test_passwords_live_only_in_environment_variables(config):
    found = {name: [] for name in SECRETS}
    for path, value in _leaves(config["services"]):
        for name, secret in SECRETS.items():
            if secret in value:
                found[name].append(path)
    for name, paths in found.items():
        assert paths, f"{name} is not used"
        for path in paths:
            assert path[1] == "environment", f"{name} appears in {'.'.join(path)}"


def test_every_setting_the_file_reads_is_documented_with_its_default():
    text = COMPOSE_FILE.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    used = set(re.findall(r"\$\{(DIGITSCORE_\w+):-", text))
    assert set(SECRETS) <= used
    for var in used:
        assert re.search(rf"{var}\s+default: \S+", header), f"{var} is not documented"


def test_dockerfile_builds_one_non_root_image_with_a_torch_variant():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if re.match(r"[A-Z]+ ", line)]
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    assert ["ARG", "TORCH_VARIANT=cpu"] in instructions
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert instructions[-1] == ["CMD", '["worker"]']
    assert "flower==" in text
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*" and "!worker/" in ignore and "!tests/" not in ignore


def test_workers_see_the_images_where_the_producer_does(config):
    """``submit /images/... --send paths``: each worker reads the files at the same path."""
    worker, producer = config["services"]["worker"], config["services"]["producer"]
    (w_images,) = [m for m in _mounts(worker) if m["target"] == "/images"]
    (p_images,) = [m for m in _mounts(producer) if m["target"] == "/images"]
    assert w_images["source"] == p_images["source"] and w_images["read_only"] is True
