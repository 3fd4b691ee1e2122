"""Which device each worker process scores on, decided without initialising CUDA.

The ``worker`` launcher never touches CUDA itself: it counts GPUs in a throwaway child
process, then starts one Celery worker per device with ``CUDA_VISIBLE_DEVICES`` set to that
one GPU in its environment, before Python (let alone torch) starts in it. Inside, the GPU is
always ``cuda:0``, and CUDA is first touched by a pool process when it loads a model, never
by the Celery main process that forks the pool.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

DEVICE_ENV = "DIGITSCORE_DEVICE"
_COUNT_GPUS = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"


class DeviceError(ValueError):
    pass


@dataclass(frozen=True)
class DeviceSpec:
    """A device as the user named it (``cpu`` or ``cuda:N``, N counted on this host)."""

    kind: str
    index: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """The environment of the worker process pinned to this device."""
        env = dict(base)
        if self.kind == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(self.index)
            env[DEVICE_ENV] = "cuda:0"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker must not grab a GPU by accident
            env[DEVICE_ENV] = "cpu"
        return env


def parse_device(text: str) -> DeviceSpec:
    text = text.strip().lower()
    if text == "cpu":
        return DeviceSpec("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not m:
        raise DeviceError(f"unknown device {text!r}: use cpu or cuda:N")
    return DeviceSpec("cuda", int(m.group(1) or 0))


def count_gpus() -> int:
    """Visible GPUs, counted in a child process so that this one never initialises CUDA."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _COUNT_GPUS],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return int(out.stdout.strip() or 0)
    except (subprocess.SubprocessError, ValueError):
        return 0


def resolve_devices(requested: tuple[str, ...], gpu_count: int) -> list[DeviceSpec]:
    """The devices to start workers on: as requested (checked against ``gpu_count``), or one
    per GPU, or the CPU when there is none."""
    if not requested:
        if gpu_count == 0:
            return [DeviceSpec("cpu")]
        return [DeviceSpec("cuda", i) for i in range(gpu_count)]
    specs = [parse_device(t) for t in requested]
    for spec in specs:
        if spec.kind == "cuda" and spec.index is not None and spec.index >= gpu_count:
            seen = "no GPU" if gpu_count == 0 else f"only cuda:0..cuda:{gpu_count - 1}"
            raise DeviceError(f"device {spec.name} is not on this host ({seen} visible)")
    return specs


def current_device() -> str:
    """The device this worker process scores on (set by the launcher)."""
    return os.environ.get(DEVICE_ENV, "cpu")
