"""Devices: parsing, resolution against a GPU count, the environment and command line of each
worker, moving batches to the device, and CUDA never initialised before a fork.

This module doubles as a probe loaded into a real worker with
``worker -- --include tests.test_devices`` when ``DIGITSCORE_TEST_CUDA_PROBE=1``: it then
logs, from the Celery main process and from each pool process, whether CUDA was initialised.
So it touches no CUDA at import: GPU tests ask for the ``cuda_gpu`` fixture.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import text

from core.scoring import to_device
from db.session import get_engine
from tests.support import gpu_count, wait_for_log
from worker.cli import celery_command
from worker.devices import (
    DEVICE_ENV,
    HOST_DEVICE_ENV,
    DeviceError,
    DeviceSpec,
    GpuError,
    count_gpus,
    current_device,
    describe_current_device,
    needs_gpu_count,
    parse_device,
    parse_devices,
    resolve_devices,
)

PROBE_ENV = "DIGITSCORE_TEST_CUDA_PROBE"
ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- the probe (in real workers)


def _install_cuda_probe() -> None:
    from celery.signals import task_postrun, worker_process_init, worker_ready, worker_shutdown

    log = logging.getLogger("digitscore.probe")

    def main_process(**_kwargs: object) -> None:
        log.warning(
            "probe main pid=%s cuda_initialized=%s nvml_check=%s",
            os.getpid(),
            torch.cuda.is_initialized(),
            os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"),
        )

    def pool_process(**_kwargs: object) -> None:
        # torch marks a child forked from a process that had initialised CUDA
        log.warning("probe pool pid=%s bad_fork=%s", os.getpid(), torch.cuda._is_in_bad_fork())

    def after_task(**_kwargs: object) -> None:
        log.warning(
            "probe task pid=%s cuda_initialized=%s device=%s visible=%r",
            os.getpid(),
            torch.cuda.is_initialized(),
            os.environ.get(DEVICE_ENV),
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )

    worker_ready.connect(main_process, weak=False)
    worker_shutdown.connect(main_process, weak=False)
    worker_process_init.connect(pool_process, weak=False)
    task_postrun.connect(after_task, weak=False)


if os.environ.get(PROBE_ENV) == "1":
    _install_cuda_probe()


# ---------------------------------------------------------------- parsing and resolution


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("cpu", "cpu"),
        ("CPU", "cpu"),
        (" cuda:1 ", "cuda:1"),
        ("cuda", "cuda:0"),
        ("cuda:12", "cuda:12"),
    ],
)
def test_parse_device_accepts_cpu_and_cuda_n(text, name):
    assert parse_device(text).name == name


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:0,1", "mps", ""])
def test_parse_device_rejects_anything_else_saying_what_is_accepted(text):
    with pytest.raises(DeviceError, match="use cpu or cuda:N"):
        parse_device(text)


def test_a_device_given_twice_points_to_concurrency():
    with pytest.raises(DeviceError, match="cuda:1 is given twice.*--concurrency"):
        parse_devices(["cuda:1", "cpu", "CUDA:1"])
    assert [s.name for s in parse_devices(["cuda:1", "cpu"])] == ["cuda:1", "cpu"]


def test_no_device_means_every_gpu_or_the_cpu():
    assert resolve_devices([], 0) == [DeviceSpec("cpu")]
    assert resolve_devices([], 2) == [DeviceSpec("cuda", 0), DeviceSpec("cuda", 1)]
    assert needs_gpu_count([]) and needs_gpu_count(parse_devices(["cpu", "cuda:0"]))
    assert not needs_gpu_count(parse_devices(["cpu"]))


def test_requested_devices_are_checked_against_the_gpus_of_this_host():
    assert resolve_devices(parse_devices(["cuda:1", "cpu"]), 2) == [
        DeviceSpec("cuda", 1),
        DeviceSpec("cpu"),
    ]
    with pytest.raises(DeviceError, match=r"cuda:3 is not on this host.*cuda:0\.\.cuda:1"):
        resolve_devices(parse_devices(["cuda:0", "cuda:3"]), 2)
    with pytest.raises(DeviceError, match="cuda:0 is not on this host: no GPU.*--device cpu"):
        resolve_devices(parse_devices(["cuda:0"]), 0)


# ---------------------------------------------------------------- environment and command line


def test_a_gpu_worker_sees_only_its_gpu_and_calls_it_cuda_0():
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    env = DeviceSpec("cuda", 2).environment(base)
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert env[DEVICE_ENV] == "cuda:0"
    assert env[HOST_DEVICE_ENV] == "cuda:2"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # numbered as nvidia-smi numbers them
    assert env["PATH"] == "/bin"
    assert base == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}  # not modified


def test_gpu_numbers_are_relative_to_the_launchers_own_visible_devices():
    base = {"CUDA_VISIBLE_DEVICES": "5,GPU-8d2f", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    assert DeviceSpec("cuda", 0).environment(base)["CUDA_VISIBLE_DEVICES"] == "5"
    env = DeviceSpec("cuda", 1).environment(base)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-8d2f"
    assert env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"  # the user's choice is kept
    assert DeviceSpec("cuda", 1).environment({})["CUDA_VISIBLE_DEVICES"] == "1"


def test_a_cpu_worker_sees_no_gpu():
    env = DeviceSpec("cpu").environment({"CUDA_VISIBLE_DEVICES": "0,1"})
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env[DEVICE_ENV] == "cpu"
    assert env[HOST_DEVICE_ENV] == "cpu"


def test_a_worker_process_describes_its_device_for_the_log(monkeypatch):
    for key, value in DeviceSpec("cuda", 2).environment({}).items():
        monkeypatch.setenv(key, value)
    assert current_device() == "cuda:0"
    assert describe_current_device() == "cuda:0 (host cuda:2, CUDA_VISIBLE_DEVICES=2)"
    for key, value in DeviceSpec("cpu").environment({}).items():
        monkeypatch.setenv(key, value)
    assert current_device() == describe_current_device() == "cpu"


def test_celery_command_line_is_exact():
    cmd = celery_command(
        DeviceSpec("cuda", 1), 3, "digits", ["--without-mingle"], python="py", launcher_pid=42
    )
    assert cmd == [
        "py", "-m", "celery", "--app", "worker.tasks", "worker",
        "--queues", "digits",
        "--concurrency", "3",
        "--pool", "prefork",
        "--hostname", "digitscore-cuda1-42@%h",
        "--loglevel", "INFO",
        "--without-mingle",
    ]  # fmt: skip
    assert celery_command(DeviceSpec("cpu"), 1, "q") == [
        sys.executable, "-m", "celery", "--app", "worker.tasks", "worker", "--queues", "q",
        "--concurrency", "1", "--pool", "prefork", "--hostname", f"digitscore-cpu-{os.getpid()}@%h",
        "--loglevel", "INFO",
    ]  # fmt: skip


# ---------------------------------------------------------------- counting GPUs


def test_gpus_are_counted_in_a_child_that_sees_the_same_devices():
    expected = torch.cuda.device_count()  # through NVML here (tests/conftest.py)
    assert count_gpus() == expected
    assert count_gpus({**os.environ, "CUDA_VISIBLE_DEVICES": ""}) == 0


def test_a_broken_torch_is_an_error_not_zero_gpus(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('libcuda.so.1: broken')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with pytest.raises(GpuError, match="libcuda.so.1: broken"):
        count_gpus(env)


# ---------------------------------------------------------------- no device query at import

#: Every torch call that asks the CUDA runtime about devices (and so poisons later forks).
_FORBID_CUDA_QUERIES = """\
import torch

def forbidden(*_args, **_kwargs):
    raise AssertionError("a CUDA device query at import")

for name in ("is_available", "device_count", "init", "_lazy_init"):
    setattr(torch.cuda, name, forbidden)
if hasattr(torch._C, "_cuda_getDeviceCount"):
    torch._C._cuda_getDeviceCount = forbidden
"""


def test_the_modules_loaded_into_a_celery_main_process_query_no_device_at_import():
    code = _FORBID_CUDA_QUERIES + (
        "import worker.tasks, tests.test_devices, tests.fault_injection, tests.conftest\n"
        "print('imported')\n"
    )
    env = {**os.environ, "DIGITSCORE_BROKER_URL": "redis://127.0.0.1:6379/0",
           "DIGITSCORE_TEST_CUDA_PROBE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "imported"


def test_the_forbidden_queries_are_caught():
    code = _FORBID_CUDA_QUERIES + "torch.cuda.is_available()\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and "a CUDA device query at import" in out.stderr


def test_every_worker_queries_devices_through_nvml():
    assert DeviceSpec("cuda", 0).environment({})["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert DeviceSpec("cpu").environment({})["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"


# ---------------------------------------------------------------- the launcher process


def test_importing_the_launcher_imports_neither_torch_nor_celery():
    code = (
        "import sys, worker.cli, worker.devices; "
        "print(sorted(m for m in ('torch', 'celery') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_a_gpu_this_host_lacks_exits_2_naming_it_and_starts_no_celery(tmp_path):
    if gpu_count() > 3:
        pytest.skip("this host has a cuda:3")
    # a stand-in `celery` package that leaves a mark if the launcher ever starts it
    fake = tmp_path / "fake" / "celery"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(f"open({str(tmp_path / 'started')!r}, 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}",
           "DIGITSCORE_BROKER_URL": "redis://127.0.0.1:6379/0"}
    out = subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", "--device", "cuda:3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert out.returncode == 2, out.stderr
    assert "cuda:3" in out.stderr and "not on this host" in out.stderr
    assert not (tmp_path / "started").exists()
    assert "started the worker" not in out.stderr


# ---------------------------------------------------------------- moving batches to the device


def test_to_device_on_cpu_neither_pins_nor_copies():
    cuda_before = torch.cuda.is_initialized()
    stack = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    tensor = to_device(stack, torch.device("cpu"))
    assert tensor.device.type == "cpu"
    assert not tensor.is_pinned()
    assert tensor.data_ptr() == stack.ctypes.data  # the numpy buffer itself: no copy was made
    assert torch.cuda.is_initialized() == cuda_before  # a CPU batch never touches CUDA


def test_to_device_on_cuda_copies_once_without_pinning(monkeypatch, cuda_gpu):
    calls: list[str] = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        calls.append(f"to non_blocking={kwargs.get('non_blocking', False)}")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda *a, **k: pytest.fail("pinned"))
    monkeypatch.setattr(torch.Tensor, "to", to)
    stack = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    tensor = to_device(stack, torch.device("cuda:0"))
    monkeypatch.undo()
    assert tensor.device == torch.device("cuda:0")
    assert calls == ["to non_blocking=False"]
    assert torch.equal(tensor.cpu(), torch.from_numpy(stack))


# ---------------------------------------------------------------- real worker processes


def _score_through_a_real_worker(run_cli, sample_dir, sqlite_url, broker_env, start_worker, device):
    r = run_cli("train", str(sample_dir / "train"), "--epochs", "1", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    env = {**broker_env, "DIGITSCORE_DATABASE_URL": sqlite_url, PROBE_ENV: "1"}
    proc = start_worker(env, "--device", device, "--", "--include", "tests.test_devices")
    wait_for_log(proc, "ready.")
    r = run_cli("submit", str(sample_dir / "valid"), "--wait", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    assert "200 images" in r.stdout
    wait_for_log(proc, "probe task")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0
    return Path(proc.log_path).read_text(errors="replace")


@pytest.mark.integration
def test_a_cpu_worker_logs_its_device_and_never_initialises_cuda(
    run_cli, sample_dir, sqlite_url, broker_env, start_worker
):
    log = _score_through_a_real_worker(
        run_cli, sample_dir, sqlite_url, broker_env, start_worker, "cpu"
    )
    assert "scores on cpu" in log
    assert "loaded model 1 onto cpu" in log
    assert log.count("probe main") == 2  # when ready (after the fork) and at shutdown
    assert log.count("nvml_check=1") == 2  # device queries in it would not poison the fork
    assert "cuda_initialized=True" not in log
    assert "probe pool" in log and "bad_fork=True" not in log
    assert "probe task" in log and "device=cpu visible=''" in log


@pytest.mark.integration
def test_a_gpu_worker_initialises_cuda_only_in_its_pool_process(
    run_cli, sample_dir, sqlite_url, broker_env, start_worker, cuda_gpu
):
    log = _score_through_a_real_worker(
        run_cli, sample_dir, sqlite_url, broker_env, start_worker, "cuda:0"
    )
    assert "scores on cuda:0" in log
    main_lines = [line for line in log.splitlines() if "probe main" in line]
    assert len(main_lines) == 2 and all("cuda_initialized=False" in x for x in main_lines)
    assert all("nvml_check=1" in x for x in main_lines)
    assert "bad_fork=False" in log and "bad_fork=True" not in log
    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    assert f"cuda_initialized=True device=cuda:0 visible={first_gpu!r}" in log


@pytest.mark.integration
def test_a_run_on_cuda_scores_like_the_cpu_within_the_stated_bound(
    run_cli, sample_dir, sqlite_url, broker_env, start_worker, cuda_gpu
):
    """The same 200 images, scored by a real worker on cuda:0 (run 1) and in this process on
    the CPU (run 2): distances and probabilities within bench/gpu_compare.py's bounds."""
    from bench.gpu_compare import BOUNDS

    _score_through_a_real_worker(
        run_cli, sample_dir, sqlite_url, broker_env, start_worker, cuda_gpu
    )
    r = run_cli("submit", str(sample_dir / "valid"), "--database-url", sqlite_url,
                env={"DIGITSCORE_BROKER_URL": ""})  # no broker: scored here, on the CPU
    assert r.exit_code == 0, r.output
    query = ("SELECT path, pred_l1, pred_l2, pred_sgd, dist_l1, dist_l2, prob_sgd "
             "FROM predictions WHERE run_id = :r AND error IS NULL ORDER BY path")
    with get_engine(sqlite_url).connect() as conn:
        gpu, cpu = (conn.execute(text(query), {"r": run}).all() for run in (1, 2))
    assert len(gpu) == len(cpu) == 200
    assert [g[0] for g in gpu] == [c[0] for c in cpu]
    flipped = sum(g[i] != c[i] for g, c in zip(gpu, cpu, strict=True) for i in (1, 2, 3))
    distance = max(abs(g[i] - c[i]) for g, c in zip(gpu, cpu, strict=True) for i in (4, 5))
    prob = max(abs(g[6] - c[6]) for g, c in zip(gpu, cpu, strict=True))
    assert distance <= BOUNDS["max_distance_diff"]
    assert prob <= BOUNDS["max_prob_diff"]
    assert flipped / (3 * len(cpu)) <= BOUNDS["flipped_fraction"]
