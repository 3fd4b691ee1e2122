"""Shared fixtures: real digit files, databases (in-memory SQLite, a fresh PostgreSQL database
per session), Redis, and real ``worker`` processes.

A test that needs a service skips when it is missing, except under CI (``CI=true``), where it
fails: CI must never go green by skipping. A test that needs a GPU (fixture ``cuda_gpu``) skips
without one, and fails instead under ``DIGITSCORE_TEST_REQUIRE_GPU=1`` (bench/gpu_check.sh).

Nothing here or in a test module touches CUDA at import: the test modules are also loaded into
the Celery main process of real workers, which must fork with CUDA untouched. Device queries in
this process go through NVML (``PYTORCH_NVML_BASED_CUDA_CHECK=1``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from core.labelled import LabelledImages, load_labelled
from core.training import fit
from db.session import dispose_engines, make_engine, upgrade_schema
from producer.cli import cli
from producer.sample_data import write_sample
from tests.support import (
    PG_ADMIN_URL,
    REDIS_BASE_URL,
    REDIS_DB,
    REDIS_FIRST_DB,
    REQUIRE_GPU,
    ROOT,
    RedisServer,
    gpu_count,
    save_model,
    service_missing,
)

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


#: Fixtures of tests that start processes and mostly wait on them (seconds each).
_WAITING_FIXTURES = {"start_worker", "broker_env", "own_redis"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the GPU kit's module first, then the tests marked ``slow``, then the tests that
    start workers, then the rest (each group in file order). Under pytest-xdist
    (pyproject.toml's ``-n``, ``--dist load``) tests go to the processes in this order as
    they free up: the kit's dry run, minutes long and mostly waiting on pip and its own
    worker, overlaps with everything else, and short tests fill the end instead of a long
    one starting last."""
    def group(item: pytest.Item) -> int:
        if item.nodeid.startswith("tests/test_gpu_kit.py"):
            return 0
        if item.get_closest_marker("slow") is not None:
            return 1
        return 2 if _WAITING_FIXTURES & set(getattr(item, "fixturenames", ())) else 3

    items.sort(key=group)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Score on one thread, as a worker's pool process does: a matrix product's last bits
    depend on how many threads split it, and tests compare scores bit for bit."""
    import torch

    torch.set_num_threads(1)
@pytest.fixture
def cuda_gpu() -> str:
    """``cuda:0``, or a skip naming why (a failure under DIGITSCORE_TEST_REQUIRE_GPU=1)."""
    if gpu_count() == 0:
        why = "no CUDA GPU on this host: this test runs when the suite runs on a GPU host"
        if REQUIRE_GPU:
            pytest.fail(f"DIGITSCORE_TEST_REQUIRE_GPU=1: {why}")
        pytest.skip(why)
    return "cuda:0"


@pytest.fixture(autouse=True)
def _fresh_engines() -> Iterator[None]:
    yield
    dispose_engines()


@pytest.fixture(autouse=True)
def _no_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their own broker and database; the developer's shell must not leak in."""
    for var in ("DIGITSCORE_BROKER_URL", "DIGITSCORE_DATABASE_URL", "DIGITSCORE_QUEUE",
                "DIGITSCORE_SECRET"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------- real digit files


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped 3s and 7s as PNG files: ``train/{3,7}/*.png`` (800), ``valid/...`` (200)."""
    root = tmp_path_factory.mktemp("mnist")
    write_sample(root, [3, 7])
    return root


@pytest.fixture(scope="session")
def train_data(sample_dir: Path) -> LabelledImages:
    return load_labelled(sample_dir / "train")


@pytest.fixture(scope="session")
def valid_data(sample_dir: Path, train_data: LabelledImages) -> LabelledImages:
    return load_labelled(sample_dir / "valid", train_data.classes)


@pytest.fixture(scope="session")
def classifier(train_data: LabelledImages):
    return fit(train_data, epochs=20, lr=0.5, batch_size=256, seed=42)


# ---------------------------------------------------------------- databases


@pytest.fixture
def memory_engine():
    engine = make_engine("sqlite://")
    upgrade_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'digitscore.db'}"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), connect_timeout=3):
            pass
    except Exception:
        service_missing(f"PostgreSQL at {PG_ADMIN_URL}")
    return PG_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"digitscore_test_{uuid.uuid4().hex[:12]}"
    admin = postgres_server.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = postgres_server.rpartition("/")
    yield f"{base}/{name}"
    dispose_engines()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'digitscore.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def model_db(sqlite_url: str, classifier) -> str:
    """A SQLite database holding the session's trained model (id 1)."""
    save_model(sqlite_url, classifier)
    return sqlite_url


@pytest.fixture
def any_model_db(any_db_url: str, classifier) -> str:
    """SQLite, then PostgreSQL, each holding the session's trained model (id 1)."""
    save_model(any_db_url, classifier)
    return any_db_url


# ---------------------------------------------------------------- Redis and workers


@pytest.fixture(scope="session")
def redis_server() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_BASE_URL, socket_connect_timeout=2).ping()
    except Exception:
        service_missing(f"Redis at {REDIS_BASE_URL}")
    try:
        redis.Redis.from_url(f"{REDIS_BASE_URL}/{REDIS_DB}").ping()
    except redis.ResponseError as e:  # "DB index is out of range": Redis has 16 by default
        pytest.fail(f"Redis database {REDIS_DB} ({e}): this test process takes "
                    f"DIGITSCORE_TEST_REDIS_DB={REDIS_FIRST_DB} plus its xdist index; choose "
                    "a lower DIGITSCORE_TEST_REDIS_DB or fewer processes (-n)")
    return REDIS_BASE_URL


@pytest.fixture
def broker_env(redis_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A broker URL and a queue of this test's own, so tests never see each other's tasks."""
    queue = f"digitscore-test-{uuid.uuid4().hex[:10]}"
    env = {"DIGITSCORE_BROKER_URL": f"{redis_server}/{REDIS_DB}", "DIGITSCORE_QUEUE": queue}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env
    import redis

    from core.wire import queue_lists

    client = redis.Redis.from_url(env["DIGITSCORE_BROKER_URL"])
    client.delete(*queue_lists(queue), *client.scan_iter("digitscore:payload:*"))


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start real ``worker`` processes (the console script's code) with the given env."""
    procs: list[subprocess.Popen] = []

    def start(env: dict[str, str], *args: str, name: str = "w") -> subprocess.Popen:
        log = open(tmp_path / f"worker-{name}-{len(procs)}.log", "wb")  # noqa: SIM115
        # one pool process unless a test asks for more: the default is one per core
        full_env = {**os.environ, "DIGITSCORE_CONCURRENCY": "1", **env,
                    "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-c", "from worker.cli import main; main()", *args],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    # The test has made its checks: kill each worker's whole process group at once rather
    # than stop it warmly, which waits for Celery's shutdown (seconds a worker). Its queue
    # and payloads go with the test's broker_env.
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its Celery processes too, if it is gone
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path, redis_server: str) -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may kill and restart."""
    if shutil.which("redis-server") is None:
        service_missing("redis-server binary")
    server = RedisServer(tmp_path)
    yield server
    server.kill()


# ---------------------------------------------------------------- the CLI


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        runner = CliRunner()
        result = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
        dispose_engines()
        return result

    return invoke
