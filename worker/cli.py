"""``worker``: start one Celery worker process per device, each pinned to it, and supervise them.

The launcher imports neither torch nor celery: it only counts GPUs in a throwaway child, builds
one command line and environment per device, starts the children and relays signals to them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from types import FrameType

import click

from core import defaults
from core.errors import BrokerURLError, DeviceError, DigitscoreError, GpuError
from core.settings import Settings
from core.text import plural
from core.wire import check_broker_url
from worker.devices import (
    DEVICE_FAILED_EXIT,
    DeviceSpec,
    TorchGpus,
    default_concurrency,
    needs_gpu_count,
    no_gpu_reason,
    nvidia_on_host,
    parse_devices,
    probe_torch,
    resolve_devices,
)
from worker.preflight import check_broker, check_database

#: Signals that stop the workers: the first one warmly (SIGTERM: running batches finish),
#: any further one coldly (SIGQUIT). SIGQUIT is always cold.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1

EPILOG = f"""\b
Signals: SIGTERM, SIGINT (Ctrl-C) and SIGHUP stop every worker warmly:
each finishes the batch it is scoring. A second one, or SIGQUIT, stops them
coldly: unfinished batches go back to the queue. The workers run in sessions
of their own, so a Ctrl-C reaches each of them once, through the launcher;
if the launcher itself is killed, they get SIGTERM (on Linux).

\b
Exit status: 0 when every worker stopped cleanly; 2 for a usage error (no
broker set, an unknown device, --device cuda:N that this host does not have)
and when GPUs are there but torch cannot use them (the host shows NVIDIA
devices but torch counts none, or CUDA does not start; or --require-gpu and
no GPU): the message names the likely cause; 1 when the GPUs cannot be
counted. If one worker exits on its own (it crashed, was killed, or its GPU
failed: status {DEVICE_FAILED_EXIT}, after its batch went back to the queue), the
launcher stops the others warmly and exits with that worker's status (128+N
for signal N), so a supervisor (systemd, a Docker restart policy) restarts
the whole set.
"""


def celery_command(
    spec: DeviceSpec,
    concurrency: int,
    queue: str,
    extra: Sequence[str] = (),
    python: str = sys.executable,
    launcher_pid: int | None = None,
) -> list[str]:
    """The ``celery worker`` command line of the worker pinned to ``spec``.

    Its node name, ``digitscore-<device>-<launcher pid>@<host>``, is unique per device and
    launcher, so two launchers on one host never share a name (Celery's control commands
    and flower would see them as one node).
    """
    pid = os.getpid() if launcher_pid is None else launcher_pid
    return [
        python,
        "-m",
        "celery",
        "--app",
        "worker.tasks",
        "worker",
        "--queues",
        queue,
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--hostname",
        f"digitscore-{spec.node}-{pid}@%h",
        "--loglevel",
        "INFO",
        *extra,
    ]


def worker_settings(
    concurrency: int | None, require_gpu: bool, metrics_port: int | None = None
) -> Settings:
    """The settings every worker of this launcher runs with, checked here, once, so that a
    setting every worker would reject fails before any starts: a broker is needed, and the
    broker and database URLs must parse (the database's as digitscore normalises it)."""
    from db.session import normalize_url

    settings = Settings.from_env(
        concurrency=concurrency, require_gpu=require_gpu, metrics_port=metrics_port)
    if not settings.broker_url:
        raise BrokerURLError(
            f"no broker: set {defaults.BROKER_URL_ENV}, e.g. "
            f"{defaults.BROKER_URL_ENV}=redis://127.0.0.1:6379/0 worker"
        )
    check_broker_url(settings.broker_url)
    database = normalize_url(settings.database_url).render_as_string(hide_password=False)
    return replace(settings, database_url=database)


def gpu_problem(
    gpus: TorchGpus | None, evidence: Callable[[], str | None] = nvidia_on_host
) -> str | None:
    """Why GPUs this host has cannot be used (shown by the host but not counted by torch, or
    counted but CUDA does not start), with what to do; ``None`` when there is no such problem
    or the GPUs were not asked about (``gpus`` is ``None``)."""
    if gpus is None:
        return None
    reason = no_gpu_reason(gpus, evidence())
    return f"{reason}; or score on the CPU with --device cpu" if reason else None


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128+N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


@functools.lru_cache(maxsize=1)
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_launcher(launcher_pid: int, prctl: Callable[..., int] | None) -> None:
    """Runs in each child between fork and exec: SIGTERM when the launcher dies."""
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        os._exit(1)


class WorkerGroup:
    """The launcher's children: started together, stopped together.

    Signal handlers only record the signal and relay it; all output and decisions happen
    in :meth:`wait`, outside any handler.
    """

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.echo = echo
        self.signals: list[int] = []
        #: (device, status) of the first worker that exited without being asked to.
        self.first_exit: tuple[str, int] | None = None

    @property
    def stopping(self) -> bool:
        return bool(self.signals) or self.first_exit is not None

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> bool:
        """Start one child; ``False`` (and nothing started) once stopping."""
        if self.stopping:
            return False
        proc = subprocess.Popen(
            argv,
            env=dict(env),
            start_new_session=True,  # signals reach it only through the launcher
            preexec_fn=functools.partial(_die_with_launcher, os.getpid(), _prctl()),
        )
        self.children.append((name, proc))
        self.echo(f"started the worker on {name}: pid {proc.pid}")
        return True

    def send(self, signum: int) -> None:
        for _name, proc in self.children:
            if proc.poll() is None:
                proc.send_signal(signum)

    def on_signal(self, signum: int, _frame: FrameType | None = None) -> None:
        self.signals.append(signum)
        cold = signum == signal.SIGQUIT or len(self.signals) > 1
        self.send(signal.SIGQUIT if cold else signal.SIGTERM)

    @contextmanager
    def relaying_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.on_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def wait(self, poll_interval: float = defaults.CHILD_CHECK_EVERY) -> int:
        """Until every child has exited; the launcher's exit status (see ``EPILOG``)."""
        announced = 0
        exited: set[int] = set()
        while True:
            for signum in self.signals[announced:]:
                how = "coldly" if signum == signal.SIGQUIT or announced else "warmly"
                self.echo(f"{signal.Signals(signum).name}: stopping the workers {how}")
                announced += 1
            running = 0
            for name, proc in self.children:
                code = proc.poll()
                if code is None:
                    running += 1
                    continue
                if proc.pid in exited:
                    continue
                exited.add(proc.pid)
                status = exit_status(code)
                self.echo(f"the worker on {name} (pid {proc.pid}) exited: status {status}")
                if not self.stopping:
                    self.first_exit = (name, status)
                    self.echo("stopping the other workers; the launcher exits with that status")
                    self.send(signal.SIGTERM)
            if not running:
                break
            time.sleep(poll_interval)
        if self.first_exit is not None:
            return self.first_exit[1]
        return next((exit_status(p.returncode) for _, p in self.children if p.returncode), 0)


def _echo(message: str) -> None:
    click.echo(f"worker: {message}", err=True)


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    metavar="cpu|cuda:N",
    help="Device to score on; repeat for several. Default: every GPU, else the CPU.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=defaults.WORKER_CONCURRENCY,
    envvar=defaults.CONCURRENCY_ENV,
    show_envvar=True,
    help="Pool processes per device. Default: this host's cores divided among the devices, "
    "so decoding (on the CPU) uses every core; on a GPU each has its own CUDA context.",
)
@click.option(
    "--require-gpu/--no-require-gpu",
    default=False,
    envvar=defaults.REQUIRE_GPU_ENV,
    show_envvar=True,
    help="Exit 2 unless every worker gets a GPU: no fallback to the CPU, for GPU fleets.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    default=defaults.METRICS_PORT,
    envvar=defaults.METRICS_PORT_ENV,
    show_envvar=True,
    metavar="N",
    help="Serve Prometheus metrics on port N (every interface): images, batches and failed "
    "rows stored, batches poisoned, seconds a batch, the queue's depth (docs/metrics.md). "
    "Default: none served.",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def main(
    devices: tuple[str, ...],
    concurrency: int | None,
    require_gpu: bool,
    metrics_port: int | None,
    celery_args: tuple[str, ...],
) -> None:
    """Consume batches from the broker and write predictions to the database.

    Starts one Celery worker per device, pinned to it: a GPU worker gets
    CUDA_VISIBLE_DEVICES=<that GPU> in its environment before it starts and scores on
    cuda:0 inside; a CPU worker sees no GPU. GPUs are counted in a throwaway child
    process (in PCI bus order, as nvidia-smi numbers them, unless CUDA_DEVICE_ORDER is
    set), so no process that forks ever initialises CUDA. Each worker has --concurrency
    pool processes; each loads a model once and keeps it.

    A host that shows NVIDIA GPUs (/dev/nvidia0, NVIDIA_VISIBLE_DEVICES) where torch
    cannot use them is an error naming the likely cause, never a silent CPU worker; use
    --device cpu to score on the CPU anyway. Each GPU pool process initialises CUDA as it
    starts: a GPU that fails then, or a CUDA error in a batch, puts the batch back in the
    queue and stops that worker with status 75.

    Reads DIGITSCORE_BROKER_URL, DIGITSCORE_DATABASE_URL, DIGITSCORE_QUEUE,
    DIGITSCORE_VISIBILITY_TIMEOUT (the task time limit, 4/5 of it up to 300 s, and the
    longest wait between database retries, half of it up to 60 s, follow from it),
    DIGITSCORE_MAX_BATCH_IMAGES, DIGITSCORE_SECRET (set: only messages signed with it
    are scored) and DIGITSCORE_ALLOW_EVICTION (1: accept a Redis whose maxmemory-policy is
    not noeviction, or cannot be read); and
    DIGITSCORE_PATH_MAP=/producer/prefix=/worker/prefix where this host sees the
    directories of `submit --send paths` runs elsewhere than the producer did. Arguments
    after `--` go to `celery worker` as they are.

    \b
    Examples:
      worker                                 # one worker per GPU, or one on the CPU
      worker --device cuda:0 --device cuda:1 --concurrency 2
      worker --require-gpu                   # a GPU fleet: no GPU is an error
      worker --metrics-port 9808             # Prometheus scrapes http://HOST:9808/metrics
      DIGITSCORE_BROKER_URL=redis://queue:6379/0 \\
        DIGITSCORE_DATABASE_URL=postgresql://digitscore@db/digitscore worker
      worker --device cpu -- --loglevel DEBUG
    """
    try:
        requested = parse_devices(devices)
        settings = worker_settings(concurrency, require_gpu, metrics_port)
    except DeviceError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    except (DigitscoreError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    if settings.require_gpu and any(spec.kind == "cpu" for spec in requested):
        raise click.BadParameter("--device cpu contradicts --require-gpu", param_hint="--device")
    try:
        gpus = probe_torch() if needs_gpu_count(requested) else None
    except GpuError as e:
        raise click.ClickException(f"{e}; or run on the CPU with --device cpu") from None
    unusable = gpu_problem(gpus)
    if unusable:
        raise click.UsageError(unusable)
    try:
        specs = resolve_devices(requested, gpus.count if gpus else 0)
    except DeviceError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if settings.require_gpu and not any(spec.kind == "cuda" for spec in specs):
        raise click.UsageError(
            "--require-gpu: torch sees no GPU on this host; check `nvidia-smi`, the torch "
            "build (docs/deployment.md, Run on a GPU cluster) and the container's NVIDIA runtime"
        )
    try:
        notes = [
            check_broker(settings.broker_url or "", settings.allow_eviction),
            check_database(settings.database_url),
        ]
    except DigitscoreError as e:
        raise click.UsageError(str(e)) from None
    _echo(settings.describe())
    for note in filter(None, notes):
        _echo(f"warning: {note}")
    per_device = settings.concurrency or default_concurrency(len(specs))
    _echo(f"{plural(per_device, 'pool process', 'pool processes')} per device")
    group = WorkerGroup(_echo)
    with metrics_served(settings) as metrics_env, group.relaying_signals():
        for spec in specs:
            argv = celery_command(spec, per_device, settings.queue, celery_args)
            env = {**spec.environment(fresh_environment(dict(os.environ))), **metrics_env}
            if not group.start(spec.name, argv, env):
                break
        status = group.wait()
    sys.exit(status)


@contextmanager
def metrics_served(settings: Settings) -> Iterator[dict[str, str]]:
    """While the workers run: the metrics server when a port is set, and the env the
    workers count into it with (worker/metrics.py); else nothing."""
    if settings.metrics_port is None:
        yield {}
        return
    from worker.metrics import MetricsServer

    try:
        server = MetricsServer(settings.metrics_port, settings.broker_url or "", settings.queue)
    except OSError as e:
        raise click.ClickException(
            f"cannot serve metrics on port {settings.metrics_port}: {e.strerror or e}; choose "
            f"another --metrics-port ({defaults.METRICS_PORT_ENV})"
        ) from None
    _echo(f"Prometheus metrics on port {settings.metrics_port} (/metrics)")
    try:
        yield server.env
    finally:
        server.stop()


def fresh_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` without a metrics directory inherited from elsewhere: a worker counts into
    its own launcher's, or keeps its counts in memory."""
    return {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
