"""A worker's device: the checks at start-up, which errors stop a worker, the same pixel scaling
on every device, the task time limit, what shows a host has NVIDIA GPUs, and the default pool
size. Unit tests on the CPU build of torch; the GPU ones need the ``cuda_gpu`` fixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.scoring import pixel_table, scaled_pixels, score_stack
from core.settings import Settings
from core.wire import make_app
from worker import device_health
from worker.device_health import DeviceStartError, is_device_error, prepare_device
from worker.devices import TorchGpus, default_concurrency, no_gpu_reason, nvidia_on_host

# ---------------------------------------------------------------- start-up and device errors


def test_a_cpu_worker_process_prepares_nothing(monkeypatch):
    def no_cuda(*_args):
        raise AssertionError("CUDA touched")

    monkeypatch.setattr(torch.cuda, "init", no_cuda)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", no_cuda)
    prepare_device("cpu")


def test_a_pool_process_in_a_poisoned_fork_fails_at_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(DeviceStartError, match="forked from a process that had initialised CUDA"):
        prepare_device("cuda:0")


def test_a_gpu_that_does_not_start_fails_at_start_with_the_cause(monkeypatch):
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: False)

    def init() -> None:
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12040).")

    monkeypatch.setattr(torch.cuda, "init", init)
    with pytest.raises(DeviceStartError, match="CUDA does not start: The NVIDIA driver .* old"):
        prepare_device("cuda:0")


def test_the_main_process_refuses_to_fork_with_cuda_initialised(monkeypatch):
    device_health.check_main_process()  # the CPU build: never initialised
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="before the fork"):
        device_health.check_main_process()


@pytest.mark.parametrize(
    ("error", "device"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), True),
        (ValueError("CUDA in a message, but not a device error type"), False),
        (RuntimeError("shape '[4, 784]' is invalid for input of size 3"), False),
        (KeyError("cuda"), False),
    ],
)
def test_only_errors_of_the_device_stop_the_worker(error, device):
    assert is_device_error(error) is device


# ---------------------------------------------------------------- the same bits on every device


def test_the_pixel_table_holds_the_cpus_quotients_for_every_grey_level():
    levels = torch.arange(256, dtype=torch.uint8)
    table = pixel_table(torch.device("cpu"))
    assert torch.equal(table, levels.float().div_(255))
    # what CUDA computes for div_(255), a product with the reciprocal, is off for 126 levels:
    # the reason for the table
    assert int((levels.float().mul_(1 / 255) != table).sum()) == 126
    stack = levels.reshape(1, 16, 16)
    assert torch.equal(table[stack.reshape(1, -1).long()], scaled_pixels(stack))


def test_gpu_pixel_scaling_is_the_cpus_bit_for_bit(cuda_gpu):
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    on_gpu = scaled_pixels(levels.to(cuda_gpu)).cpu()
    assert torch.equal(on_gpu, scaled_pixels(levels))


def test_a_run_on_the_gpu_matches_the_cpu_within_the_stated_bound(classifier, valid_data, cuda_gpu):
    from bench.gpu_compare import BOUNDS, compare_devices

    stack = np.ascontiguousarray(valid_data.stack.numpy())
    found = compare_devices(classifier, stack, torch.device(cuda_gpu))
    assert found["max_distance_diff"] <= BOUNDS["max_distance_diff"], found
    assert found["max_prob_diff"] <= BOUNDS["max_prob_diff"], found
    assert found["flipped_fraction"] <= BOUNDS["flipped_fraction"], found
    cpu = score_stack(classifier, stack, torch.device("cpu"))
    assert len(cpu) == found["images"]


# ---------------------------------------------------------------- the task time limit


def test_a_batch_over_the_time_limit_goes_back_to_the_queue():
    settings = Settings(broker_url="redis://127.0.0.1:6379/0", visibility_timeout=150)
    conf = make_app(settings).conf
    assert conf.task_time_limit == settings.task_time_limit == 120
    assert conf.task_acks_on_timeout is False  # rejected and requeued, not acknowledged
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_proc_alive_timeout == 60  # time for a pool process to start CUDA


# ---------------------------------------------------------------- the host and its GPUs


def test_nvidia_gpus_show_as_device_files_or_in_the_container_runtime(tmp_path):
    glob = str(tmp_path / "nvidia[0-9]*")
    for name in ("nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert nvidia_on_host({}, glob) is None  # the control devices alone are no GPU
    assert nvidia_on_host({"NVIDIA_VISIBLE_DEVICES": "void"}, glob) is None
    assert nvidia_on_host({"NVIDIA_VISIBLE_DEVICES": "none"}, glob) is None
    assert nvidia_on_host({"NVIDIA_VISIBLE_DEVICES": "all"}, glob) == "NVIDIA_VISIBLE_DEVICES=all"
    for i in range(6):
        (tmp_path / f"nvidia{i}").touch()
    shown = nvidia_on_host({}, glob)
    assert shown is not None and shown.endswith("nvidia3 (and 2 more)")


def test_the_reason_names_the_build_the_driver_or_the_runtime():
    assert no_gpu_reason(TorchGpus("2.13.0", "12.6", 2), "/dev/nvidia0") is None
    assert no_gpu_reason(TorchGpus("2.13.0", "12.6", 0), None) is None  # a CPU host
    cpu_only = no_gpu_reason(TorchGpus("2.13.0+cpu", None, 0), "/dev/nvidia0")
    assert cpu_only is not None and "CPU-only build" in cpu_only
    hidden = no_gpu_reason(
        TorchGpus("2.13.0", "13.0", 0, warning="Found no NVIDIA driver on your system."),
        "NVIDIA_VISIBLE_DEVICES=all",
    )
    assert hidden is not None and "driver is too old for CUDA 13.0" in hidden
    assert "no NVIDIA runtime" in hidden and "Found no NVIDIA driver" in hidden


def test_concurrency_shares_the_cores_among_the_devices():
    assert default_concurrency(8, cores=64) == 8
    assert default_concurrency(1, cores=16) == 16
    assert default_concurrency(8, cores=4) == 1
    assert default_concurrency(3, cores=8) == 2
    assert default_concurrency(1) >= 1
