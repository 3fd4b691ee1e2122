"""The worker's intake (worker/intake.py) leans on private parts of Celery and kombu: each is
checked here to exist with the shape the module's docstring names, so that an upgrade that
changes one fails this test instead of a worker in production."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from vine import promise

from core.errors import MessageError


def import_intake(monkeypatch):
    monkeypatch.setenv("DIGITSCORE_BROKER_URL", "memory://")
    from worker import intake

    return intake


def signature(f) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]


def test_every_private_name_the_intake_uses_still_exists_with_its_shape():
    from billiard.einfo import ExceptionWithTraceback
    from celery.worker import state
    from celery.worker.consumer import Consumer
    from celery.worker.request import Request
    from kombu.transport import redis as kombu_redis

    empty = inspect.Parameter.empty
    assert signature(kombu_redis.Channel._brpop_read) == [("self", empty), ("options", empty)]
    assert signature(kombu_redis.Transport._deliver) == [
        ("self", empty), ("message", empty), ("queue", empty)]
    assert signature(Consumer.create_task_handler) == [("self", empty), ("promise", promise)]
    assert signature(Request.on_failure) == [
        ("self", empty), ("exc_info", empty), ("send_failed_event", True), ("return_ok", False)]
    assert signature(Request.on_timeout) == [("self", empty), ("soft", empty), ("timeout", empty)]
    assert Request._already_cancelled is False and Request._already_revoked is False
    assert isinstance(state.should_terminate, (bool, type(None), int))
    assert ExceptionWithTraceback(ValueError("x"), "tb").exc.args == ("x",)


def test_the_docstring_lists_every_private_name_the_module_touches(monkeypatch):
    """Every ``._name`` of a Celery or kombu object the module uses is in its docstring."""
    intake = import_intake(monkeypatch)
    source = inspect.getsource(intake)
    doc = intake.__doc__ or ""
    code = source[source.index('"""', source.index('"""') + 3) + 3:]
    used = set(re.findall(r"\.(_[a-z][a-z_]+)\b", code)) - {"__init__"}
    assert used == {"_brpop_read", "_deliver", "_already_cancelled", "_already_revoked"}
    for name in used:
        assert name in doc, name


def test_the_pins_name_the_minor_versions_tested():
    import celery
    import kombu

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    for name, module in (("celery", celery), ("kombu", kombu)):
        major, minor = module.__version__.split(".")[:2]
        pin = re.search(rf'"{name}(\[redis\])?>=([0-9.]+),<([0-9.]+)"', text)
        assert pin is not None, f"no pin of {name}"
        assert pin.group(2) == f"{major}.{minor}" and pin.group(3) == f"{major}.{int(minor) + 1}"


def test_only_a_pool_process_dying_of_a_batch_counts_as_a_death(monkeypatch):
    from billiard.einfo import ExceptionWithTraceback
    from billiard.exceptions import WorkerLostError
    from celery.exceptions import Terminated
    from celery.worker import state

    intake = import_intake(monkeypatch)

    class Req:
        _already_cancelled = _already_revoked = False

    lost = WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL)")
    assert intake.died_holding(Req, lost)
    assert intake.died_holding(Req, ExceptionWithTraceback(lost, ""))
    assert intake.died_holding(Req, SystemExit(1))
    assert not intake.died_holding(Req, Terminated(15))
    assert not intake.died_holding(Req, MessageError("payload gone"))
    Req._already_revoked = True
    assert not intake.died_holding(Req, SystemExit(1))
    monkeypatch.setattr(state, "should_terminate", True)  # a cold stop: Celery ends the pool
    assert not intake.died_holding(Req, lost)
