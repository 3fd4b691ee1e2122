"""A worker's device at start-up and after an error, in the Celery processes (imports torch).

- The Celery main process forks the pool: it must never have initialised CUDA, nor asked the
  CUDA runtime about devices, which poisons the fork as surely (``PYTORCH_NVML_BASED_CUDA_CHECK``
  makes torch ask NVML instead).
- Each GPU pool process checks that it is not in a poisoned fork and initialises CUDA as it
  starts, so that a bad GPU stops the worker at start-up, naming itself, instead of failing
  its first batch.
- An error of the device in a batch (a CUDA runtime, cuBLAS or cuDNN error: an illegal
  address, a lost GPU) leaves that process's CUDA context unusable: the batch goes back to the
  queue (the task rejects it, requeued, with the failed delivery counted) and the whole worker
  stops, with :data:`~worker.devices.DEVICE_FAILED_EXIT`, for its supervisor to restart it.
  Errors that merely mention CUDA (tensors on two devices: a bug) and out-of-memory (a batch
  too large for the device: the context stays usable) are the batch's failures, not the
  device's: counted, and the worker goes on.

A pool process stops its worker through the main process: it sends it :data:`STOP_SIGNAL`, whose
handler (installed before the fork) asks Celery for a warm shutdown with that exit status:
the batches in hand finish, or go back to the queue, and the worker takes no other.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

import torch

from worker.devices import DEVICE_FAILED_EXIT, NVML_CHECK_ENV

#: Sent by a pool process to the Celery main process: stop warmly, exit DEVICE_FAILED_EXIT.
STOP_SIGNAL = signal.SIGUSR2

#: What an error of the device says when torch raises it as a plain RuntimeError (older
#: releases; newer ones raise the CUDA runtime's errors as ``torch.AcceleratorError``): the
#: runtime's and the libraries' status texts, not any message that names a CUDA device.
_DEVICE_MESSAGE = re.compile(
    r"CUDA error|CUDA driver error|CUBLAS_STATUS_|CUDNN_STATUS_|cuDNN error|NCCL error|\bXid\b"
)

# The Celery processes ask torch about devices through NVML even when started without the
# launcher (which sets this in their environment): torch reads it at each query.
os.environ.setdefault(NVML_CHECK_ENV, "1")


class DeviceStartError(RuntimeError):
    """A pool process could not start on its device."""


def check_main_process() -> None:
    """In the Celery main process, before the fork: CUDA must be untouched."""
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in the Celery main process before the fork")


def prepare_device(device: str) -> None:
    """In a pool process as it starts: on a GPU, check the fork and initialise CUDA now, with a
    tiny tensor on the device, so that a GPU that does not work fails here, named."""
    if not device.startswith("cuda"):
        return
    if torch.cuda._is_in_bad_fork():
        raise DeviceStartError(
            "this pool process was forked from a process that had initialised "
            "CUDA (a device query without PYTORCH_NVML_BASED_CUDA_CHECK=1 in the Celery main "
            "process, or in a module it imports)"
        )
    try:
        torch.cuda.init()
        torch.ones(1, device=device).add_(1).cpu()  # a kernel and a copy back, synchronously
    except Exception as e:
        raise DeviceStartError(f"CUDA does not start: {e}") from e


def is_device_error(exc: BaseException) -> bool:
    """An error of the device itself (an illegal address, a lost GPU, a failing cuBLAS),
    after which this process's CUDA context cannot be trusted. Out of memory is not one: torch
    frees what the batch held and the next batch can run."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(exc, accelerator):
        return True
    return isinstance(exc, RuntimeError) and bool(_DEVICE_MESSAGE.search(str(exc)))


def install_stop_handler() -> None:
    """In the Celery main process, before the fork: :data:`STOP_SIGNAL` asks for a warm
    shutdown with :data:`~worker.devices.DEVICE_FAILED_EXIT` as the exit status."""

    def on_stop(_signum: int, _frame: Any) -> None:
        from celery.worker import state

        state.should_stop = DEVICE_FAILED_EXIT  # read by the consumer's loop: a warm shutdown

    signal.signal(STOP_SIGNAL, on_stop)


def stop_this_worker() -> None:
    """From a pool process: have the Celery main process (its parent) stop the worker."""
    os.kill(os.getppid(), STOP_SIGNAL)
