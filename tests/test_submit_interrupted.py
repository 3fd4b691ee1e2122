"""A submission that fails part way: one error naming the cause and `producer resume RUN`,
a traceback only under --debug, and a run that resume completes (real SQLite files, a sender
that fails as Redis does under ``maxmemory``). tests/test_submit_faults.py has the real faults."""

from __future__ import annotations

import pytest
from redis.exceptions import OutOfMemoryError
from sqlalchemy import text

from core.errors import SubmitInterrupted
from db.model_store import load_classifier
from db.session import get_engine
from producer.run_commands import status_line
from producer.submit import EmbeddedSender, resume_run, submit_directory

OOM = "OOM command not allowed when used memory > 'maxmemory'."


class FailingSender(EmbeddedSender):
    """Scores in this process, and fails as a full Redis does from its ``fail_at``-th batch."""

    def __init__(self, engine, classifier, fail_at: int) -> None:
        super().__init__(engine, classifier)
        self.fail_at = fail_at
        self.sent = 0

    def send(self, message, batch, priority="normal") -> None:
        self.sent += 1
        if self.sent >= self.fail_at:
            raise OutOfMemoryError(OOM)
        super().send(message, batch, priority)


def rows(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        n, distinct = conn.execute(
            text("SELECT COUNT(*), COUNT(DISTINCT path) FROM predictions")
        ).one()
    return int(n), int(distinct)


def test_a_broker_refusing_writes_stops_with_one_resumable_error(model_db, sample_dir):
    engine = get_engine(model_db)
    with engine.connect() as conn:
        clf = load_classifier(conn, 1)
    source = sample_dir / "valid"
    with pytest.raises(SubmitInterrupted) as caught:
        submit_directory(engine, source, 1, FailingSender(engine, clf, 4), batch_size=10)
    message = str(caught.value)
    assert message == (
        "run 1 stopped part way through submit: OutOfMemoryError: OOM command not allowed "
        "when used memory > 'maxmemory' (run again with --debug for the traceback); the run "
        "is kept: once that is fixed, run `producer resume 1`"
    )
    assert isinstance(caught.value.__cause__, OutOfMemoryError)
    assert rows(engine) == (30, 30)
    with engine.connect() as conn:
        run = dict(conn.execute(text("SELECT * FROM runs")).mappings().one())
    assert "run `producer resume 1` to send the rest" in status_line(run)
    resent, sub = resume_run(engine, 1, EmbeddedSender(engine, clf), batch_size=10)
    assert resent == 1  # the batch recorded but refused; the walk sends the rest
    assert (sub.n_images, sub.status) == (200, "done")
    assert rows(engine) == (200, 200)
    with engine.connect() as conn:
        run = dict(conn.execute(text("SELECT * FROM runs")).mappings().one())
    assert status_line(run) == "run 1 done, priority normal: 200/200 done (200 scored, 0 failed)"


def test_the_cli_prints_one_line_and_debug_shows_the_traceback(
    run_cli, model_db, sample_dir, monkeypatch
):
    original = EmbeddedSender.send

    def full_disk(self, message, batch, priority="normal"):
        if message.seq == 2:
            raise OSError(28, "No space left on device")
        original(self, message, batch, priority)

    monkeypatch.setattr(EmbeddedSender, "send", full_disk)
    args = ("submit", str(sample_dir / "valid"), "--batch-size", "10", "--database-url", model_db)
    r = run_cli(*args)
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    assert r.stderr.splitlines()[-1] == (
        "Error: run 1 stopped part way through submit: OSError: "
        "[Errno 28] No space left on device; the run is kept: once that is fixed, run "
        "`producer resume 1`"
    )
    with pytest.raises(SubmitInterrupted, match="run 2 stopped part way"):
        run_cli("--debug", *args)
    with pytest.raises(SubmitInterrupted, match="run 3 stopped part way"):
        run_cli(*args, env={"DIGITSCORE_DEBUG": "1"})
