"""Which device each worker process scores on, decided without initialising CUDA.

The ``worker`` launcher never touches CUDA itself: it counts GPUs in a throwaway child
process, then starts one Celery worker per device with ``CUDA_VISIBLE_DEVICES`` set to that
one GPU in its environment, before Python (let alone torch) starts in it. Inside, the GPU is
always ``cuda:0``, and CUDA is first touched by a pool process as it starts, never by the
Celery main process that forks the pool. Every process the launcher starts, the counting child
included, has ``PYTORCH_NVML_BASED_CUDA_CHECK=1``: torch then answers ``is_available()`` and
``device_count()`` through NVML, which leaves a later fork usable, instead of through the CUDA
runtime, which does not.

Nothing here imports torch: this module is imported by the launcher.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from core import defaults
from core.errors import DeviceError, GpuError
from core.text import plural

#: The device a worker process scores on, as torch names it inside that process.
DEVICE_ENV = "DIGITSCORE_DEVICE"
#: The device as the launcher's user named it (``cuda:2``): for logs, since inside it is cuda:0.
HOST_DEVICE_ENV = "DIGITSCORE_HOST_DEVICE"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
ORDER_ENV = "CUDA_DEVICE_ORDER"
#: ``cuda:N`` counts GPUs in PCI bus order, as ``nvidia-smi`` does, unless the user chose.
DEFAULT_ORDER = "PCI_BUS_ID"
#: torch answers ``is_available()``/``device_count()`` through NVML with this set to ``1``,
#: so a process that asked can still fork pool processes that use CUDA.
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
#: NVIDIA's container runtime exposes the GPUs this names; ``void``/``none`` mean none.
NVIDIA_VISIBLE_ENV = "NVIDIA_VISIBLE_DEVICES"
#: The device files of NVIDIA GPUs (``/dev/nvidiactl`` and ``/dev/nvidia-uvm`` are not GPUs).
NVIDIA_DEV_GLOB = "/dev/nvidia[0-9]*"
#: The exit status of a Celery worker whose device failed (start-up or a CUDA error in a batch);
#: the launcher passes it on. EX_TEMPFAIL: restarting may well help.
DEVICE_FAILED_EXIT = 75

# Runs in a throwaway child that forks nothing, so it may initialise CUDA: a count from NVML
# alone would not show a driver too old for this build of torch.
_PROBE_TORCH = """\
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    probe = {"torch": torch.__version__, "cuda": torch.version.cuda, "count": 0, "error": None}
    if torch.version.cuda:
        probe["count"] = torch.cuda.device_count()
        if probe["count"]:
            try:
                torch.cuda.init()
            except Exception as e:
                probe["error"] = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    if probe["error"] is None and caught:
        probe["warning"] = str(caught[0].message).strip().splitlines()[0]
print(json.dumps(probe))
"""


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
        env[NVML_CHECK_ENV] = "1"
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


@dataclass(frozen=True)
class TorchGpus:
    """What torch, in a throwaway child, makes of this host's GPUs."""

    torch_version: str
    cuda_version: str | None  # None: a CPU-only build of torch
    count: int
    error: str | None = None  # CUDA could not be initialised although GPUs were counted
    warning: str | None = None  # what torch warned while counting (e.g. the driver is too old)


def probe_torch(
    env: Mapping[str, str] | None = None,
    timeout: float = defaults.GPU_COUNT_TIMEOUT,
) -> TorchGpus:
    """Visible GPUs, counted in a child process so that this one never initialises CUDA.

    A CPU-only build of torch counts 0. A child that fails (torch missing, a broken driver)
    is an error, not 0: a GPU host must not silently fall back to scoring on the CPU.
    """
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault(ORDER_ENV, DEFAULT_ORDER)
    child_env[NVML_CHECK_ENV] = "1"
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE_TORCH],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GpuError(f"counting GPUs took longer than {timeout:.0f} s") from None
    lines = out.stdout.strip().splitlines()
    try:
        probe = json.loads(lines[-1]) if out.returncode == 0 and lines else None
    except ValueError:
        probe = None
    if not isinstance(probe, dict) or not isinstance(probe.get("count"), int):
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise GpuError(f"could not count GPUs with torch: {last}")
    return TorchGpus(
        str(probe.get("torch")),
        probe.get("cuda"),
        probe["count"],
        probe.get("error"),
        probe.get("warning"),
    )


def count_gpus(
    env: Mapping[str, str] | None = None,
    timeout: float = defaults.GPU_COUNT_TIMEOUT,
) -> int:
    """The number of GPUs torch sees (see :func:`probe_torch`)."""
    return probe_torch(env, timeout).count


def nvidia_on_host(
    env: Mapping[str, str] | None = None, dev_glob: str = NVIDIA_DEV_GLOB
) -> str | None:
    """What shows that this host (or container) has NVIDIA GPUs, or ``None``: their device
    files, or NVIDIA's container runtime naming some in ``NVIDIA_VISIBLE_DEVICES``."""
    env = os.environ if env is None else env
    files = sorted(glob.glob(dev_glob))
    if files:
        return ", ".join(files[:4]) + (f" (and {len(files) - 4} more)" if len(files) > 4 else "")
    visible = env.get(NVIDIA_VISIBLE_ENV, "").strip()
    if visible and visible.lower() not in ("void", "none"):
        return f"{NVIDIA_VISIBLE_ENV}={visible}"
    return None


def no_gpu_reason(torch_gpus: TorchGpus, evidence: str | None) -> str | None:
    """Why torch cannot use GPUs this host shows (``None`` when there is no such mismatch)."""
    if torch_gpus.count and torch_gpus.error is None:
        return None
    if torch_gpus.count:  # counted through NVML, but CUDA does not start
        return (
            f"torch {torch_gpus.torch_version} (CUDA {torch_gpus.cuda_version}) counts "
            f"{plural(torch_gpus.count, 'GPU')} but cannot initialise CUDA: {torch_gpus.error}. "
            "The "
            f"NVIDIA driver is likely too old for CUDA {torch_gpus.cuda_version} (see "
            "docs/deployment.md, Run on a GPU cluster: install a torch build for your driver)"
        )
    if evidence is None:
        return None
    if torch_gpus.cuda_version is None:
        return (
            f"this host shows NVIDIA GPUs ({evidence}) but torch {torch_gpus.torch_version} is "
            "a CPU-only build: install a CUDA build of torch (docs/deployment.md, Run on a GPU "
            "cluster)"
        )
    said = f" (torch said: {torch_gpus.warning})" if torch_gpus.warning else ""
    return (
        f"this host shows NVIDIA GPUs ({evidence}) but torch {torch_gpus.torch_version} "
        f"(CUDA {torch_gpus.cuda_version}) counts none{said}. Likely causes: the NVIDIA driver "
        f"is too old for CUDA {torch_gpus.cuda_version}, or this container has no NVIDIA "
        "runtime (`docker run --gpus all`, the NVIDIA Container Toolkit)"
    )


def default_concurrency(n_devices: int, cores: int | None = None) -> int:
    """Pool processes per device so that decoding, which is on the CPU, uses every core this
    process may run on: the cores divided among the devices, at least one each."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, n_devices))


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
