"""A worker's device: the checks at start-up, which errors stop a worker, the same pixel scaling
on every device, the task time limit, what shows a host has NVIDIA GPUs, and the default pool
size. Unit tests on the CPU build of torch; the GPU ones need the ``cuda_gpu`` fixture."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from celery.exceptions import Reject

from core import defaults, wire
from core.scoring import pixel_table, scaled_pixels, score_stack
from core.settings import Settings
from core.wire import make_app
from db import batch_life, queries
from db.session import get_engine
from tests.support import save_model
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
    # stand-ins both ways: a GPU test earlier in this process may have started CUDA
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    device_health.check_main_process()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="before the fork"):
        device_health.check_main_process()


@pytest.mark.parametrize(
    ("error", "device"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (torch.AcceleratorError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), True),
        # the batch's failures, not the device's: a bug, and a batch too large for the device
        (RuntimeError("Expected all tensors to be on the same device, but found at least "
                      "two devices, cuda:0 and cpu!"), False),
        (RuntimeError("Input type (torch.cuda.FloatTensor) and weight type differ"), False),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (ValueError("CUDA in a message, but not a device error type"), False),
        (RuntimeError("shape '[4, 784]' is invalid for input of size 3"), False),
        (KeyError("cuda"), False),
    ],
)
def test_only_errors_of_the_device_stop_the_worker(error, device):
    assert is_device_error(error) is device


class _Stops:
    """A stand-in for :func:`device_health.stop_this_worker`: counts the stops asked for."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def one_batch(monkeypatch, classifier, tmp_path):
    """worker.tasks on an SQLite database holding one queued batch of three images, the
    worker's stop replaced by a counter: (tasks, engine, message, stops)."""
    monkeypatch.setenv(defaults.BROKER_URL_ENV, "memory://")
    from worker import tasks

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    monkeypatch.setattr(tasks, "SETTINGS", replace(tasks.SETTINGS, database_url=url))
    engine = get_engine(url)
    model_id = save_model(engine, classifier)
    with engine.begin() as conn:
        run_id, token = queries.create_run(conn, model_id, str(tmp_path), "celery")
        batch_life.record_batch(conn, run_id, 0, ["3/a.png", "3/b.png", "7/c.png"], 0)
    stops = _Stops()
    monkeypatch.setattr(device_health, "stop_this_worker", stops)
    monkeypatch.setattr(tasks, "_device_failed", False)
    return tasks, engine, wire.BatchMessage(run_id, 0, token), stops


def _fail_with(error: BaseException):
    def work() -> None:
        raise error

    return work


def test_a_device_error_stops_the_worker_and_a_repeated_one_reaches_the_poison_limit(one_batch):
    tasks, engine, message, stops = one_batch
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    for n in range(1, defaults.MAX_DELIVERIES + 1):
        tasks._device_failed = False  # a restarted worker: a fresh process
        with pytest.raises(Reject):
            tasks.count_failure_on_error(_fail_with(error), engine, message, "scoring failed")
        assert stops.count == n and tasks._device_failed
    claim = batch_life.claim_batch(engine, message.run_id, message.seq, message.token)
    assert claim.action == "poison"
    assert claim.batch is not None and "illegal memory access" in str(claim.batch.last_failure)


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("Expected all tensors to be on the same device, cuda:0 and cpu!"),
])
def test_out_of_memory_or_a_bug_is_the_batchs_failure_and_the_worker_goes_on(one_batch, error):
    tasks, engine, message, stops = one_batch
    with pytest.raises(Reject):
        tasks.count_failure_on_error(_fail_with(error), engine, message, "scoring failed")
    assert stops.count == 0 and not tasks._device_failed
    claim = batch_life.claim_batch(engine, message.run_id, message.seq, message.token)
    assert claim.action == "score" and claim.batch is not None
    assert claim.batch.failed_deliveries == 1


def test_a_failed_batch_is_held_longer_after_each_failure_within_the_time_limit(one_batch):
    tasks = one_batch[0]
    assert [tasks.failure_backoff(n, 240) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert [tasks.failure_backoff(n, 8) for n in (1, 2, 3)] == [1.0, 2.0, 2.0]


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_every_pool_process_runs_one_torch_thread(monkeypatch, device):
    monkeypatch.setenv(defaults.BROKER_URL_ENV, "memory://")
    from worker import tasks

    threads: list[int] = []
    monkeypatch.setattr(tasks, "DEVICE", device)
    monkeypatch.setattr(device_health, "prepare_device", lambda _device: None)  # no CUDA here
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    tasks._on_process_start()
    assert threads == [1]


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
