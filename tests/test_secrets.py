"""Passwords in broker and database URLs never appear in output, logs or error messages."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from db.session import get_engine
from tests.support import wait_for_log
from tests.tcp_proxy import free_port

pytestmark = pytest.mark.integration

REDIS_PW = "redis-Pa55-word"
PG_PW = "pg-Pa55-word"  # trust auth accepts any password, so the URL still works


@pytest.fixture
def redis_with_password(tmp_path: Path, redis_server: str):
    import redis

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", REDIS_PW],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://:{REDIS_PW}@127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
            break
        except Exception:
            time.sleep(0.05)
    yield url
    proc.kill()
    proc.wait()


def test_passwords_stay_out_of_worker_logs_and_producer_output(
    run_cli, sample_dir, postgres_url, redis_with_password, start_worker
):
    db_url = postgres_url.replace("postgres@", f"postgres:{PG_PW}@")
    env = {"DIGITSCORE_BROKER_URL": redis_with_password, "DIGITSCORE_DATABASE_URL": db_url}
    outputs = []
    r = run_cli("train", str(sample_dir / "train"), "--epochs", "2", env=env)
    assert r.exit_code == 0, r.output
    outputs.append(r.output)
    worker = start_worker(env, "--device", "cpu")
    wait_for_log(worker, "ready.")
    r = run_cli("submit", str(sample_dir / "valid"), "--wait", env=env)
    assert r.exit_code == 0, r.output
    outputs.append(r.output)
    for cmd in (["runs"], ["status", "1"], ["report", "1", "--json"], ["models", "--json"]):
        outputs.append(run_cli(*cmd, env=env).output)
    with get_engine(db_url).connect() as conn:
        assert conn.execute(text("SELECT n_scored FROM runs")).scalar() == 200
    # a wrong password: the error names the server but not the password
    bad = redis_with_password.replace(REDIS_PW, "wrong-" + REDIS_PW)
    r = run_cli("submit", str(sample_dir / "valid"), env={**env, "DIGITSCORE_BROKER_URL": bad})
    assert r.exit_code != 0
    outputs.append(r.output)
    log = Path(worker.log_path).read_text()
    assert "127.0.0.1" in log  # the log does name the servers...
    for text_ in [log, *outputs]:
        assert REDIS_PW not in text_ and PG_PW not in text_  # ...but never a password
