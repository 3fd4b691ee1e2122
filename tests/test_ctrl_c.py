"""Ctrl-C at any moment of ``producer submit`` (the console script, a real process): exit 130
and no traceback, with the run's id and `producer resume` once the run exists, or "nothing
was submitted" before it does. The early moments count from when the command's own code
begins to run; a Ctrl-C inside Python's own start-up, before any digitscore code, is Python's
(docs/faults.md)."""

from __future__ import annotations

import builtins
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

import producer
from tests.support import ROOT, batches_recorded

pytestmark = pytest.mark.integration


def console_script() -> str:
    script = Path(sys.executable).parent / "producer"
    found = str(script) if script.exists() else shutil.which("producer")
    if found is None:
        pytest.skip("the producer console script is not installed")
    return found


def interrupt(args: list[str], when) -> tuple[int, str]:
    """Start ``producer ARGS``, send SIGINT once ``when(pid, seconds since the start)`` is
    true; its status and output."""
    proc = subprocess.Popen(
        [sys.executable, console_script(), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    start = time.monotonic()
    while not when(proc.pid, time.monotonic() - start):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def running_its_code(pid: int) -> bool:
    """Python has imported its site packages and runs the command's code: it has mapped a
    compiled module of site-packages (SQLAlchemy's, the first the command imports). Seen in
    the process itself, so a start slowed by a loaded machine moves the moment with it."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    site = sysconfig.get_path("platlib") + "/"
    return any(line.split()[-1].startswith(site) and line.endswith(".so")
               for line in maps.splitlines() if "/" in line)


def import_with_ctrl_c(tmp_path, monkeypatch, name: str, body: str) -> float:
    """Import a module ``name`` of ``body`` (which sends this process SIGINT) with the
    command's Ctrl-C handling; the seconds until the KeyboardInterrupt it must raise."""
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(builtins, "__import__", builtins.__import__)  # put back afterwards
    previous = signal.getsignal(signal.SIGINT)
    try:
        producer.take_ctrl_c()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            __import__(name)  # through builtins.__import__, as an import statement goes
        return time.monotonic() - start
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_inside_an_import_is_raised_once_the_import_has_ended(tmp_path, monkeypatch):
    """A module that gets a Ctrl-C in the middle of its import (as numpy's or torch's can)
    is loaded whole, and the KeyboardInterrupt is raised by the import as it ends."""
    import_with_ctrl_c(tmp_path, monkeypatch, "interrupted_module",
                       "import os, signal, time\n"
                       "os.kill(os.getpid(), signal.SIGINT)\n"
                       "time.sleep(0.2)  # the handler runs here, inside the import\n"
                       "loaded_whole = True\n")
    assert sys.modules["interrupted_module"].loaded_whole


def test_a_second_ctrl_c_inside_an_import_is_raised_at_once(tmp_path, monkeypatch):
    """An import that hangs (a file system that stopped answering) can still be stopped."""
    waited = import_with_ctrl_c(tmp_path, monkeypatch, "hanging_module",
                                "import os, signal, time\n"
                                "os.kill(os.getpid(), signal.SIGINT)\n"
                                "time.sleep(0.1)\n"
                                "os.kill(os.getpid(), signal.SIGINT)\n"
                                "time.sleep(10)\n"
                                "loaded_whole = True\n")
    assert waited < 5, waited
    assert "hanging_module" not in sys.modules


def test_ctrl_c_inside_torchs_import_exits_130(sample_dir, model_db):
    """Scoring in the process imports torch, which takes a second or more here: a Ctrl-C
    sent as soon as its library is mapped lands inside that import."""
    args = ["submit", str(sample_dir), "--batch-size", "1", "--database-url", model_db]

    def torch_loading(pid: int, _t: float) -> bool:
        try:
            return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return False

    status, out = interrupt(args, torch_loading)
    assert status == 130, out
    assert "Traceback" not in out and "Error" not in out, out
    assert out.strip().splitlines()[-1] in (
        "stopped before the run was created: nothing was submitted",
        "stopped; run 1 is kept: `producer resume 1` sends the rest",
    ), out


@pytest.mark.parametrize("seconds", [0.2, 1.0])
def test_early_ctrl_c_exits_130_saying_nothing_was_submitted(sample_dir, model_db, seconds):
    args = ["submit", str(sample_dir), "--batch-size", "1", "--database-url", model_db]
    began: list[float] = []  # when the command's own code began to run

    def when(pid: int, t: float) -> bool:
        if not began and running_its_code(pid):
            began.append(t)
        return bool(began) and t >= began[0] + seconds  # 0.2 s and 1 s into the command

    status, out = interrupt(args, when)
    assert status == 130, out
    assert "Traceback" not in out and "Aborted!" not in out, out
    last = out.strip().splitlines()[-1]
    # a slow start may not have created the run by then, a fast one may have
    assert last in (
        "stopped before the command began: nothing was submitted or changed",
        "stopped before the run was created: nothing was submitted",
        "stopped; run 1 is kept: `producer resume 1` sends the rest",
    ), out


def test_ctrl_c_mid_run_exits_130_naming_the_run(sample_dir, model_db):
    args = ["submit", str(sample_dir), "--batch-size", "1", "--database-url", model_db]
    status, out = interrupt(args, lambda _pid, _t: batches_recorded(model_db) >= 5)
    assert status == 130, out
    assert "Traceback" not in out, out
    assert out.strip().splitlines()[-1] == (
        "stopped; run 1 is kept: `producer resume 1` sends the rest")


def waiting_submit(sample_dir, model_db, stdin=None) -> subprocess.Popen:
    """``producer submit --wait`` with a broker and no worker, once it waits (its run line
    printed): the wait goes on until a Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, console_script(), "submit", str(sample_dir / "valid"), "--wait",
         "--database-url", model_db],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=stdin,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("run 1: 200 images"), (line, proc.communicate())
    return proc


def test_ctrl_c_while_waiting_without_a_terminal_says_how_to_cancel(
    sample_dir, model_db, broker_env
):
    proc = waiting_submit(sample_dir, model_db)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "stopped waiting; run 1 goes on: `producer status 1`, `producer cancel 1` stops it")


@pytest.mark.parametrize("answer", ["y", "second Ctrl-C"])
def test_ctrl_c_while_waiting_on_a_terminal_asks_whether_to_cancel(
    sample_dir, model_db, broker_env, answer
):
    import pty

    from tests.support import payload_keys, run_row, wait_reading_stdin

    terminal, child_end = pty.openpty()
    proc = waiting_submit(sample_dir, model_db, stdin=child_end)
    os.close(child_end)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    asked = ""
    while "cancel run 1? [y/N]" not in asked:  # the prompt ends with no newline
        char = proc.stderr.read(1)
        assert char, asked
        asked += char
    if answer == "y":
        os.write(terminal, b"y\n")
    else:
        wait_reading_stdin(proc.pid)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    os.close(terminal)
    assert proc.returncode == 130, asked + err
    assert "Traceback" not in err
    if answer == "y":
        assert "run 1 cancelled: 0/200 images stored" in err, err
        assert run_row(model_db)["status"] == "cancelled"
        assert payload_keys(broker_env["DIGITSCORE_BROKER_URL"], 1) == []
    else:
        assert err.strip().splitlines()[-1] == "stopped waiting; run 1 goes on: `producer status 1`"
        assert run_row(model_db)["status"] == "queued"
