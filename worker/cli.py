"""``worker``: start one Celery worker process per device, each pinned to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

import click

from worker import defaults
from worker.devices import DeviceError, DeviceSpec, count_gpus, resolve_devices


def celery_command(spec: DeviceSpec, concurrency: int, extra: tuple[str, ...]) -> list[str]:
    node = spec.name.replace(":", "")
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.tasks",
        "worker",
        "--queues",
        defaults.queue(),
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--hostname",
        f"digitscore-{node}@%h",
        "--loglevel",
        "INFO",
        *extra,
    ]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
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
    default=1,
    show_default=True,
    help="Processes per device (more decoders feeding the same device).",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def main(devices: tuple[str, ...], concurrency: int, celery_args: tuple[str, ...]) -> None:
    """Consume batches from the broker and write predictions to the database.

    One Celery worker process per device, with CUDA_VISIBLE_DEVICES set to its GPU before
    it starts. Reads DIGITSCORE_BROKER_URL, DIGITSCORE_DATABASE_URL and
    DIGITSCORE_VISIBILITY_TIMEOUT. Arguments after `--` go to `celery worker` as they are.

    \b
    Examples:
      worker                                 # one process per GPU, or the CPU
      worker --device cuda:0 --device cuda:1 --concurrency 2
      worker --device cpu -- --without-heartbeat
    """
    wants_gpu = not devices or any(d.strip().lower() != "cpu" for d in devices)
    try:
        specs = resolve_devices(devices, count_gpus() if wants_gpu else 0)
    except DeviceError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if not os.environ.get(defaults.BROKER_URL_ENV):
        click.echo(f"note: {defaults.BROKER_URL_ENV} is not set; using the local Redis", err=True)
    children = []
    for spec in specs:
        click.echo(f"starting worker on {spec.name} ({concurrency} process(es))", err=True)
        children.append(
            subprocess.Popen(
                celery_command(spec, concurrency, celery_args),
                env=spec.environment(dict(os.environ)),
            )
        )

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    sys.exit(max((abs(c) for c in codes), default=0))
