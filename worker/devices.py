"""Which device each worker process scores on, decided without initialising CUDA.

The ``worker`` launcher never touches CUDA itself: it counts GPUs in a throwaway child
process, then starts one Celery worker per device with ``CUDA_VISIBLE_DEVICES`` set to that
one GPU in its environment, before Python (let alone torch) starts in it. Inside, the GPU is
always ``cuda:0``, and CUDA is first touched by a pool process when it loads a model, never
by the Celery main process that forks the pool.

Nothing here imports torch: this module is imported by the launcher.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from core.errors import DeviceError, GpuError

#: The device a worker process scores on, as torch names it inside that process.
DEVICE_ENV = "DIGITSCORE_DEVICE"
#: The device as the launcher's user named it (``cuda:2``): for logs, since inside it is cuda:0.
HOST_DEVICE_ENV = "DIGITSCORE_HOST_DEVICE"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
ORDER_ENV = "CUDA_DEVICE_ORDER"
#: ``cuda:N`` counts GPUs in PCI bus order, as ``nvidia-smi`` does, unless the user chose.
DEFAULT_ORDER = "PCI_BUS_ID"
#: Seconds the throwaway child may take to import torch and count GPUs.
COUNT_TIMEOUT = 120.0

_COUNT_GPUS = "import torch\nprint(torch.cuda.device_count() if torch.cuda.is_available() else 0)\n"


@dataclass(frozen=True)
class DeviceSpec:
    """A device as the user named it: ``cpu`` or ``cuda:N``, N counted on this host."""

    kind: str
    index: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def node(self) -> str:
        """The device in a Celery node name: ``cpu``, ``cuda0``."""
        return self.name.replace(":", "")

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The environment of the worker process pinned to this device.

        ``CUDA_VISIBLE_DEVICES`` of ``base`` is honoured: if the launcher itself sees only
        GPUs ``2,3``, then ``cuda:1`` is the entry ``3``. A CPU worker sees no GPU at all.
        """
        env = dict(base)
        env.setdefault(ORDER_ENV, DEFAULT_ORDER)
        env[HOST_DEVICE_ENV] = self.name
        if self.kind == "cuda":
            env[VISIBLE_ENV] = physical_gpu(self.index or 0, base.get(VISIBLE_ENV))
            env[DEVICE_ENV] = "cuda:0"
        else:
            env[VISIBLE_ENV] = ""  # a CPU worker must not grab a GPU by accident
            env[DEVICE_ENV] = "cpu"
        return env


def physical_gpu(index: int, visible: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry of the launcher's GPU number ``index``."""
    if visible is None:
        return str(index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        raise DeviceError(f"cuda:{index} is not among {VISIBLE_ENV}={visible!r}")
    return entries[index]


def parse_device(text: str) -> DeviceSpec:
    """``cpu``, ``cuda:N`` or ``cuda`` (meaning ``cuda:0``), in any case."""
    clean = text.strip().lower()
    if clean == "cpu":
        return DeviceSpec("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", clean)
    if not m:
        raise DeviceError(f"unknown device {text!r}: use cpu or cuda:N (N = 0, 1, ...)")
    return DeviceSpec("cuda", int(m.group(1) or 0))


def parse_devices(texts: Sequence[str]) -> list[DeviceSpec]:
    """Every ``--device``, each at most once (a second process is ``--concurrency``)."""
    specs: list[DeviceSpec] = []
    for text in texts:
        spec = parse_device(text)
        if spec in specs:
            raise DeviceError(
                f"{spec.name} is given twice: use --concurrency N for more processes on one device"
            )
        specs.append(spec)
    return specs


def needs_gpu_count(specs: Sequence[DeviceSpec]) -> bool:
    """Only the default (every GPU) and ``cuda:N`` need to know how many GPUs there are."""
    return not specs or any(s.kind == "cuda" for s in specs)


def count_gpus(env: Mapping[str, str] | None = None, timeout: float = COUNT_TIMEOUT) -> int:
    """Visible GPUs, counted in a child process so that this one never initialises CUDA.

    A CPU-only build of torch counts 0. A child that fails (torch missing, a broken driver)
    is an error, not 0: a GPU host must not silently fall back to scoring on the CPU.
    """
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault(ORDER_ENV, DEFAULT_ORDER)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _COUNT_GPUS],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GpuError(f"counting GPUs took longer than {timeout:.0f} s") from None
    lines = out.stdout.split()
    if out.returncode != 0 or not lines or not lines[-1].isdigit():
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise GpuError(f"could not count GPUs with torch: {last}")
    return int(lines[-1])


def resolve_devices(specs: Sequence[DeviceSpec], gpu_count: int) -> list[DeviceSpec]:
    """The devices to start workers on: as requested (checked against ``gpu_count``), or one
    per GPU, or the CPU when there is none."""
    if not specs:
        if gpu_count == 0:
            return [DeviceSpec("cpu")]
        return [DeviceSpec("cuda", i) for i in range(gpu_count)]
    for spec in specs:
        if spec.kind == "cuda" and (spec.index or 0) >= gpu_count:
            if gpu_count == 0:
                seen = "no GPU is visible; use --device cpu, or check the driver and torch build"
            else:
                seen = (
                    f"only cuda:0..cuda:{gpu_count - 1} are visible; omit --device to use every GPU"
                )
            raise DeviceError(f"device {spec.name} is not on this host: {seen}")
    return list(specs)


def current_device() -> str:
    """The device this worker process scores on (set by the launcher; ``cuda:0`` on a GPU)."""
    return os.environ.get(DEVICE_ENV, "cpu")


def describe_current_device() -> str:
    """For the log line of each worker process: ``cuda:0 (host cuda:2, CUDA_VISIBLE_DEVICES=2)``."""
    device = current_device()
    host = os.environ.get(HOST_DEVICE_ENV)
    if device == "cpu" or host is None:
        return device
    return f"{device} (host {host}, {VISIBLE_ENV}={os.environ.get(VISIBLE_ENV, '')})"
