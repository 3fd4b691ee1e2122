"""The ``worker`` launcher as a real process: what it starts, how it relays signals, what it
does when a worker dies.

Most tests put stand-ins for ``celery`` and ``torch`` first on the launcher's PYTHONPATH: the
fake ``python -m celery`` records its command line, environment and the signals it gets; the
fake ``torch`` claims ``FAKE_GPUS`` GPUs. So the GPU paths of the launcher run on a host
without a GPU, and no Redis is needed. The last tests start real Celery workers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support import created, wait_for_log
from worker.cli import exit_status, gpu_problem, main
from worker.devices import TorchGpus, nvidia_on_host

ROOT = Path(__file__).resolve().parent.parent
#: Settings of the shell or container the tests run in that must not reach the launcher.
HOST_SETTINGS = ("NVIDIA_VISIBLE_DEVICES", "DIGITSCORE_CONCURRENCY", "DIGITSCORE_REQUIRE_GPU")
NVIDIA_DEVICE_FILES = nvidia_on_host({})
#: For tests of what the launcher does where the host shows no GPU (or only what they set).
ON_A_HOST_WITHOUT_NVIDIA_GPUS = pytest.mark.skipif(
    NVIDIA_DEVICE_FILES is not None, reason=f"this host has NVIDIA GPUs: {NVIDIA_DEVICE_FILES}"
)

FAKE_CELERY = """\
import json, os, signal, sys, time
from pathlib import Path

out = Path(os.environ["FAKE_CELERY_DIR"])
me = os.environ["DIGITSCORE_HOST_DEVICE"].replace(":", "")


def on_signal(signum, _frame):
    with (out / f"{me}.signals").open("a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    if signum == signal.SIGQUIT or not os.environ.get("FAKE_CELERY_IGNORE_TERM"):
        sys.exit(0)


for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
    signal.signal(s, on_signal)
keys = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "DIGITSCORE_DEVICE", "DIGITSCORE_HOST_DEVICE",
        "PYTORCH_NVML_BASED_CUDA_CHECK")
record = {
    "argv": sys.argv[1:],
    "pid": os.getpid(),
    "session_leader": os.getsid(0) == os.getpid(),
    "env": {k: os.environ.get(k) for k in keys},
}
(out / f"{me}.tmp").write_text(json.dumps(record))
(out / f"{me}.tmp").rename(out / f"{me}.json")
code = os.environ.get("FAKE_CELERY_EXIT_" + me.upper())
if code:
    time.sleep(0.5)
    sys.exit(int(code))
while True:
    time.sleep(0.05)
"""

FAKE_TORCH = """\
import os

if os.environ.get("FAKE_TORCH_BROKEN"):
    raise ImportError("libcuda.so.1: cannot open shared object file")

__version__ = "2.13.0+fake"


class version:
    cuda = os.environ.get("FAKE_TORCH_CUDA", "12.6") or None


class cuda:
    @staticmethod
    def device_count():
        # a query through the CUDA runtime would poison the launcher's later forks
        if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
            raise RuntimeError("device_count() without PYTORCH_NVML_BASED_CUDA_CHECK=1")
        n = int(os.environ.get("FAKE_GPUS", "0"))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            n = min(n, len([e for e in visible.split(",") if e]))
        return n

    @staticmethod
    def is_available():
        return cuda.device_count() > 0

    @staticmethod
    def init():
        if os.environ.get("FAKE_CUDA_INIT_ERROR"):
            raise RuntimeError(os.environ["FAKE_CUDA_INIT_ERROR"])
"""


class Launched:
    def __init__(self, proc: subprocess.Popen, out: Path, log: Path) -> None:
        self.proc, self.out, self.log = proc, out, log

    def record(self, device: str, timeout: float = 60) -> dict:
        """What the fake celery of ``device`` (``cpu``, ``cuda0``) saw, once it has started."""
        path = self.out / f"{device}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                pytest.fail(f"no worker on {device} after {timeout} s:\n{self.stderr()}")
            time.sleep(0.05)
        return json.loads(path.read_text())

    def signals(self, device: str) -> list[str]:
        path = self.out / f"{device}.signals"
        return path.read_text().split() if path.exists() else []

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    """Start ``worker ARGS`` with the fake celery and torch, in a session of its own."""
    fakes = tmp_path / "fakes"
    (fakes / "celery").mkdir(parents=True)
    (fakes / "celery" / "__init__.py").write_text("")
    (fakes / "celery" / "__main__.py").write_text(FAKE_CELERY)
    (fakes / "torch").mkdir()
    (fakes / "torch" / "__init__.py").write_text(FAKE_TORCH)
    started: list[Launched] = []

    database = created(f"sqlite:///{tmp_path / 'launched.db'}")

    def start(*args: str, gpus: int = 0, **env: str) -> Launched:
        out = tmp_path / f"run{len(started)}"
        out.mkdir()
        base = {k: v for k, v in os.environ.items() if k not in HOST_SETTINGS}
        full_env = {
            **base,
            "PYTHONPATH": f"{fakes}{os.pathsep}{ROOT}",
            "FAKE_GPUS": str(gpus),
            "FAKE_CELERY_DIR": str(out),
            "DIGITSCORE_BROKER_URL": "redis://127.0.0.1:6379/0",  # the fake celery reads none
            # the launcher refuses a database that does not exist
            "DIGITSCORE_DATABASE_URL": database,
            **env,
        }
        log = out / "launcher.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from worker.cli import main; main()", *args],
                env=full_env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(Launched(proc, out, log))
        return started[-1]

    yield start
    for launched in started:
        for record in launched.out.glob("*.json"):
            _kill(json.loads(record.read_text())["pid"])
        _kill(launched.proc.pid)
        launched.proc.wait(10)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(check: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------- what the launcher starts


def test_one_pinned_worker_per_visible_gpu_with_the_exact_command_line(launch):
    w = launch("--concurrency", "2", "--", "--without-gossip", gpus=8, CUDA_VISIBLE_DEVICES="6,4")
    for index, physical in ((0, "6"), (1, "4")):
        record = w.record(f"cuda{index}")
        expected = [sys.executable, "-m", "celery", "--app", "worker.tasks", "worker", "--queues"]
        expected += ["digitscore", "--concurrency", "2", "--pool", "prefork", "--hostname"]
        expected += [f"digitscore-cuda{index}-{w.proc.pid}@%h", "--loglevel", "INFO"]
        expected += ["--without-gossip"]
        assert record["argv"] == expected[3:]  # what follows `python -m celery`
        assert record["env"] == {
            "CUDA_VISIBLE_DEVICES": physical,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "DIGITSCORE_DEVICE": "cuda:0",
            "DIGITSCORE_HOST_DEVICE": f"cuda:{index}",
            "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
        }
        assert record["session_leader"]
    assert not (w.out / "cpu.json").exists()
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait() == 0
    assert w.signals("cuda0") == w.signals("cuda1") == ["SIGTERM"]
    assert "2 pool processes per device" in w.stderr()


@ON_A_HOST_WITHOUT_NVIDIA_GPUS
def test_no_gpu_means_one_worker_on_the_cpu(launch):
    w = launch("--concurrency", "1", gpus=0)
    assert w.record("cpu")["env"]["CUDA_VISIBLE_DEVICES"] == ""
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait() == 0
    assert "started the worker on cpu" in w.stderr()
    assert "1 pool process per device" in w.stderr()


def test_two_launchers_on_one_host_name_their_cpu_workers_apart(launch):
    launched = [launch("--device", "cpu") for _ in range(2)]
    names = [w.record("cpu")["argv"][w.record("cpu")["argv"].index("--hostname") + 1]
             for w in launched]
    for w in launched:
        w.proc.send_signal(signal.SIGTERM)
        assert w.wait() == 0
    assert names == [f"digitscore-cpu-{w.proc.pid}@%h" for w in launched]
    assert names[0] != names[1]
def test_concurrency_defaults_to_the_cores_per_device(launch):
    cores = len(os.sched_getaffinity(0))
    w = launch(gpus=2)
    for device in ("cuda0", "cuda1"):
        argv = w.record(device)["argv"]
        assert argv[argv.index("--concurrency") + 1] == str(max(1, cores // 2))
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait() == 0
    w = launch("--device", "cuda:1", DIGITSCORE_CONCURRENCY="3", gpus=2)
    argv = w.record("cuda1")["argv"]
    assert argv[argv.index("--concurrency") + 1] == "3"
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait() == 0


@ON_A_HOST_WITHOUT_NVIDIA_GPUS
@pytest.mark.parametrize(
    ("env", "cause"),
    [
        ({}, "driver is too old for CUDA 12.6, or this container has no NVIDIA runtime"),
        ({"FAKE_TORCH_CUDA": ""}, "is a CPU-only build"),
    ],
)
def test_a_host_showing_nvidia_gpus_that_torch_cannot_count_exits_2_naming_the_cause(
    launch, env, cause
):
    w = launch(gpus=0, NVIDIA_VISIBLE_DEVICES="all", **env)
    assert w.wait(60) == 2
    assert "NVIDIA_VISIBLE_DEVICES=all" in w.stderr() and cause in w.stderr()
    assert "--device cpu" in w.stderr()
    assert not list(w.out.glob("*.json"))  # no silent worker on the CPU


def test_gpus_counted_where_cuda_does_not_start_exit_2_naming_the_error(launch):
    error = "The NVIDIA driver on your system is too old (found version 12040)."
    w = launch("--device", "cuda:0", gpus=2, FAKE_CUDA_INIT_ERROR=error)
    assert w.wait(60) == 2
    assert error in w.stderr() and "counts 2 GPUs but cannot initialise CUDA" in w.stderr()
    assert not list(w.out.glob("*.json"))


@ON_A_HOST_WITHOUT_NVIDIA_GPUS
@pytest.mark.parametrize(
    ("args", "env"),
    [(["--require-gpu"], {}), ([], {"DIGITSCORE_REQUIRE_GPU": "1"})],
)
def test_require_gpu_makes_no_gpu_an_error(launch, args, env):
    w = launch(*args, gpus=0, **env)
    assert w.wait(60) == 2
    assert "--require-gpu: torch sees no GPU" in w.stderr()
    assert not list(w.out.glob("*.json"))


def test_require_gpu_starts_the_gpu_workers(launch):
    w = launch("--require-gpu", gpus=1)
    assert w.record("cuda0")["env"]["DIGITSCORE_DEVICE"] == "cuda:0"
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait() == 0


def test_a_gpu_problem_is_reported_only_where_the_host_shows_gpus_or_cuda_fails():
    cpu_build = TorchGpus("2.13.0+cpu", None, 0)
    assert gpu_problem(None, lambda: "/dev/nvidia0") is None  # --device cpu: not asked
    assert gpu_problem(cpu_build, lambda: None) is None  # a CPU host: the CPU it is
    assert "CPU-only build" in (gpu_problem(cpu_build, lambda: "/dev/nvidia0") or "")
    assert gpu_problem(TorchGpus("2.13.0", "12.6", 8), lambda: "/dev/nvidia0") is None
    broken = TorchGpus("2.13.0", "13.0", 8, error="driver too old")
    assert "driver too old" in (gpu_problem(broken, lambda: None) or "")


def test_gpus_that_cannot_be_counted_exit_1_and_start_nothing(launch):
    w = launch(FAKE_TORCH_BROKEN="1")
    assert w.wait(60) == 1
    assert "could not count GPUs" in w.stderr() and "--device cpu" in w.stderr()
    assert "libcuda.so.1" in w.stderr()
    assert not list(w.out.glob("*.json"))


def test_passwords_are_never_printed(launch):
    w = launch(
        "--device",
        "cpu",
        DIGITSCORE_BROKER_URL="redis://:broker-pw@queue:6379/0",
        DIGITSCORE_DATABASE_URL="postgresql://digitscore:db-pw@db/digitscore",
    )
    record = w.record("cpu")
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait() == 0
    text = w.stderr()
    assert "redis://:***@queue:6379/0" in text
    assert "postgresql+psycopg://digitscore:***@db/digitscore" in text
    assert "broker-pw" not in text + json.dumps(record)
    assert "db-pw" not in text + json.dumps(record)


# ---------------------------------------------------------------- signals and deaths


def test_ctrl_c_reaches_each_worker_once_and_stops_it_warmly(launch):
    w = launch(gpus=2)
    w.record("cuda0"), w.record("cuda1")
    os.killpg(w.proc.pid, signal.SIGINT)  # as a terminal does: to the whole foreground group
    assert w.wait() == 0
    assert w.signals("cuda0") == w.signals("cuda1") == ["SIGTERM"]
    assert "SIGINT: stopping the workers warmly" in w.stderr()


def test_a_second_signal_stops_the_workers_coldly(launch):
    w = launch("--device", "cpu", FAKE_CELERY_IGNORE_TERM="1")
    w.record("cpu")
    w.proc.send_signal(signal.SIGINT)
    assert _wait_until(lambda: w.signals("cpu") == ["SIGTERM"])
    assert w.proc.poll() is None  # the worker is still finishing its batch
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait() == 0
    assert w.signals("cpu") == ["SIGTERM", "SIGQUIT"]
    assert "stopping the workers coldly" in w.stderr()


def test_one_worker_dying_stops_the_others_and_the_launcher_exits_with_its_status(launch):
    w = launch(gpus=2, FAKE_CELERY_EXIT_CUDA1="3")
    w.record("cuda0")
    assert w.wait() == 3
    assert w.signals("cuda0") == ["SIGTERM"]
    assert "the worker on cuda:1" in w.stderr() and "status 3" in w.stderr()
    assert not _alive(w.record("cuda0")["pid"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_get_sigterm_when_the_launcher_is_killed(launch):
    w = launch("--device", "cpu")
    pid = w.record("cpu")["pid"]
    w.proc.kill()
    w.wait()
    assert _wait_until(lambda: w.signals("cpu") == ["SIGTERM"])
    assert _wait_until(lambda: not _alive(pid))


def test_exit_status_of_a_killed_child_is_128_plus_the_signal():
    assert exit_status(-9) == 137 and exit_status(-15) == 143
    assert exit_status(0) == 0 and exit_status(3) == 3


# ---------------------------------------------------------------- usage, with no service


def test_help_documents_signals_and_exit_status_without_any_service(monkeypatch):
    monkeypatch.setenv("DIGITSCORE_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    assert "--device cpu|cuda:N" in r.output and "--concurrency" in r.output
    assert "SIGQUIT" in r.output and "128+N" in r.output


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--concurrency", "0"], {}, "--concurrency"),
        (["--device", "tpu"], {}, "unknown device 'tpu'"),
        (["--device", "cpu"], {"DIGITSCORE_VISIBILITY_TIMEOUT": "ten"}, "VISIBILITY_TIMEOUT"),
        (["--device", "cpu"], {"DIGITSCORE_DATABASE_URL": "nonsense"}, "not a database URL"),
        (["--device", "cpu"], {"DIGITSCORE_BROKER_URL": ""}, "no broker: set"),
        (["--device", "cpu"], {"DIGITSCORE_VISIBILITY_TIMEOUT": "1"}, "no room below it"),
        (["--device", "cpu", "--require-gpu"], {}, "contradicts --require-gpu"),
        (["--device", "cpu"], {"DIGITSCORE_SECRET": "short"}, "shorter than 16 characters"),
        (["--device", "cpu"], {"DIGITSCORE_MAX_BATCH_IMAGES": "0"}, "positive number of images"),
        (["--device", "cpu"], {"DIGITSCORE_BROKER_URL": "redis://:Sup3r#S3cret@127.0.0.1:6379/0"},
         "cannot be parsed: percent-escape"),
    ],
)
def test_usage_errors_exit_2_before_anything_starts(args, env, message):
    r = CliRunner().invoke(
        main, args, env={"DIGITSCORE_BROKER_URL": "redis://127.0.0.1:6379/0", **env}
    )
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "started the worker" not in r.output
    assert "Sup3r" not in r.output and "S3cret" not in r.output


# ---------------------------------------------------------------- real Celery workers


def _celery_pid(proc: subprocess.Popen) -> int:
    log = wait_for_log(proc, "ready.")
    return int(re.search(r"started the worker on cpu: pid (\d+)", log).group(1))


def _pool_pids(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.integration
def test_ctrl_c_stops_a_real_worker_warmly_once(broker_env, sqlite_url, start_worker):
    proc = start_worker({**broker_env, "DIGITSCORE_DATABASE_URL": created(sqlite_url)},
                        "--device", "cpu")
    celery = _celery_pid(proc)
    os.killpg(proc.pid, signal.SIGINT)  # the launcher's whole process group, as a terminal does
    assert proc.wait(60) == 0  # celery exits 1 on SIGINT, 0 on the SIGTERM the launcher sends
    log = Path(proc.log_path).read_text()
    assert log.count("Warm shutdown") == 1 and "Cold shutdown" not in log
    assert not _alive(celery)


@pytest.mark.integration
def test_a_killed_real_worker_makes_the_launcher_exit_137(broker_env, sqlite_url, start_worker):
    proc = start_worker(
        {**broker_env, "DIGITSCORE_DATABASE_URL": created(sqlite_url)},
        "--device",
        "cpu",
        "--concurrency",
        "2",
    )
    celery = _celery_pid(proc)
    pool = _pool_pids(celery)
    assert len(pool) == 2
    os.kill(celery, signal.SIGKILL)
    assert proc.wait(30) == 137
    assert "the worker on cpu" in Path(proc.log_path).read_text()
    assert _wait_until(lambda: not any(_alive(p) for p in pool))  # no orphaned pool process
