"""``producer``: train models, submit directories of images, read results back.

Every command is a thin wrapper over plain functions in ``producer/``, ``worker/`` and ``db/``.
Nothing here touches a database or a broker before its arguments have been checked, so
``--help`` and usage errors need neither.
"""

from __future__ import annotations

import atexit
import gc
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

import producer
from core import defaults
from core.errors import EXIT_FAILURE, EXIT_INTERRUPTED, DigitscoreError
from core.text import first_line, plural
from producer.options import HELP, database_option


class ProducerGroup(click.Group):
    """Turns every error into one line on stderr and an exit status, in this one place: a
    :class:`DigitscoreError` says what to do and exits with its own status (2 for bad usage
    or input, 1 for a failure at run time); anything unexpected exits 1 with its first line
    and a pointer to ``--debug``, which shows the traceback instead."""

    def _stopped(self, ctx: click.Context) -> None:
        command = self.commands.get(ctx.invoked_subcommand or "")
        click.echo("\n" + getattr(command, "interrupted_early", "stopped (Ctrl-C)"), err=True)
        ctx.exit(EXIT_INTERRUPTED)

    def invoke(self, ctx: click.Context) -> Any:
        # Until here a Ctrl-C ends the process quietly (producer/__init__.py); from here on it
        # is a KeyboardInterrupt, which the command, or the handler below, turns into its line
        if threading.current_thread() is threading.main_thread():
            producer.take_ctrl_c()
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:  # a command that has more to say about it catches it first
            self._stopped(ctx)
        except DigitscoreError as e:
            if debug_enabled(ctx):
                raise
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except Exception as e:
            if debug_enabled(ctx):
                raise
            click.echo(
                f"Error: {describe_unexpected(e)} (run again with --debug for the traceback)",
                err=True,
            )
            ctx.exit(EXIT_FAILURE)


def debug_enabled(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug"))


def describe_unexpected(e: BaseException) -> str:
    """An exception's type and the first line of its message, any URL in it masked."""
    first = first_line(e)
    return type(e).__name__ if first == type(e).__name__ else f"{type(e).__name__}: {first}"


@click.group(
    cls=ProducerGroup,
    context_settings=HELP,
    epilog="Run `producer COMMAND --help` for examples. Exit status: 0 success, 1 failure at "
    "run time, 2 bad usage or input, 130 stopped by Ctrl-C.",
)
@click.option(
    "--debug",
    is_flag=True,
    envvar=defaults.DEBUG_ENV,
    help=f"Show the traceback of an error [env {defaults.DEBUG_ENV}=1].",
)
def cli(debug: bool) -> None:
    """Score directories of small images with the ideal digits and an SGD linear model.

    \b
    Quick start (everything in this process, results in ./digitscore.db):
      producer sample-data ./mnist
      producer train ./mnist/train --valid ./mnist/valid
      producer submit ./mnist/valid --wait
      producer report latest

    Set DIGITSCORE_BROKER_URL to send batches to `worker` processes instead, and
    DIGITSCORE_DATABASE_URL (postgresql://...) to share results between hosts.
    """


@cli.command("sample-data")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--classes",
    default="3,7",
    show_default=True,
    help="Digits to write, comma separated, or 'all' for 0-9.",
)
def sample_data_cmd(directory: Path, classes: str) -> None:
    """Write the shipped real MNIST digits as 28x28 PNGs: DIRECTORY/{train,valid}/<digit>/.

    A fixed 80/20 split of 500 digits per class; nothing is downloaded.

    \b
    Example:
      producer sample-data ./mnist --classes all
    """
    from producer.sample_data import parse_classes, write_sample

    try:
        digits = parse_classes(classes)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--classes") from None
    with click.progressbar(length=500 * len(digits), label="writing PNGs", file=sys.stderr) as bar:
        written = write_sample(directory, digits, on_file=lambda: bar.update(1))
    click.echo(
        f"wrote {written['train']} training and {written['valid']} validation images of "
        f"digits {','.join(map(str, digits))} to {directory}"
    )


@cli.command("pack")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--images-per-shard",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Images in each tar shard.",
)
def pack_cmd(src: Path, out: Path, images_per_shard: int) -> None:
    """Write the images below SRC (class folders) as tar shards in OUT, a new directory.

    Each shard is readable by `producer submit` and by WebDataset: members keep their
    relative paths (7/img0421.png) and each key has a .cls member holding its class folder.
    A first member, __digitscore_index__ (WebDataset skips it), lists where every member is,
    so that submit lists a shard without reading each header. OUT must not exist or be
    empty: pack never overwrites.

    \b
    Example:
      producer pack ./mnist/valid ./shards --images-per-shard 5000
    """
    from core.files import DirectoryWalk, check_directory
    from core.packing import check_output, pack_directory

    check_output(out)
    total = sum(1 for _ in DirectoryWalk(check_directory(src)))
    with click.progressbar(length=total, label="packing", file=sys.stderr) as bar:
        packed = pack_directory(src, out, images_per_shard, on_image=lambda: bar.update(1))
    for name, error in packed.unread:
        click.echo(f"left out {name}: {error}", err=True)
    unread = len(packed.unread)
    click.echo(
        f"wrote {plural(packed.n_images, 'image')} in {plural(len(packed.shards), 'shard')} "
        f"to {out}"
        + (f"; {plural(unread, 'file')} could not be read" if unread else "")
    )


@cli.command("train")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--valid",
    "valid_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Labelled folders (the same classes) to choose the epoch on and measure accuracy "
    "on; default: hold out part of DIRECTORY.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=defaults.EPOCHS,
    show_default=True,
    help="Most epochs; the one kept is the best on validation.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=defaults.LEARNING_RATE,
    show_default=True,
    help="SGD learning rate at the start; it falls to 0 on a cosine over the epochs. Each "
    "step is divided by the largest variance of the centred inputs, so one rate suits "
    "images of any size and brightness.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="SGD mini-batch size. Default: the training images / 64, within "
    f"{defaults.TRAIN_BATCH_SIZE_MIN}-{defaults.TRAIN_BATCH_SIZE_MAX}.",
)
@click.option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    multiple=True,
    help="L2 penalty on the SGD weights; repeat it to try several, each a model of its own "
    "trained side by side, validation choosing. Default: "
    + ", ".join(map(str, defaults.WEIGHT_DECAYS))
    + ".",
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=defaults.PATIENCE,
    show_default=True,
    help="Stop after this many epochs without a better validation accuracy.",
)
@click.option(
    "--seed",
    type=int,
    default=defaults.SEED,
    show_default=True,
    help="Seed for initialisation, shuffling and the hold-out split.",
)
@click.option(
    "--holdout",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=defaults.HOLDOUT_FRACTION,
    show_default=True,
    help="Fraction of each class held out for validation when --valid is not given.",
)
@database_option
def train_cmd(
    directory: Path,
    valid_dir: Path | None,
    epochs: int,
    lr: float,
    batch_size: int | None,
    weight_decay: tuple[float, ...],
    patience: int,
    seed: int,
    holdout: float,
    engine: Any,
) -> None:
    """Train both models from class folders (DIRECTORY/3/*.png, DIRECTORY/7/*.png, ...).

    The class of an image is its folder's name; any number (>= 2) of classes, every one
    with images of one size. The SGD model trains with momentum on centred and scaled
    inputs, its learning rate falling on a cosine, one copy per weight decay; each epoch is
    measured on the validation images (--valid, or a held-out part of DIRECTORY) and the
    weights of the best epoch and weight decay are kept, folded back so that the stored
    model scores raw pixels.
    Prints one line per epoch on stderr, then stores a new model version with its learning
    curve and prints its id and validation accuracy for L1, L2 and SGD.

    \b
    Examples:
      producer train ./mnist/train --valid ./mnist/valid
      producer train ./mnist/train --epochs 40 --lr 2 --weight-decay 0.01
    """
    from core.training import SgdSettings
    from db.session import get_engine
    from producer.training import train_and_store

    sgd = SgdSettings(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        weight_decays=weight_decay or defaults.WEIGHT_DECAYS,
        patience=patience,
    )
    sgd.check()
    # opened before training, so that a database that cannot be used fails in seconds
    train_and_store(get_engine(engine.database_url), directory, valid_dir, holdout, sgd)


from producer.cancel_commands import cancel_cmd, delete_cmd, prune_cmd  # noqa: E402
from producer.heal_command import heal_cmd  # noqa: E402
from producer.queue_commands import queue_cmd  # noqa: E402
from producer.report_commands import (  # noqa: E402
    compare_cmd,
    models_cmd,
    report_cmd,
    runs_cmd,
    show_model_cmd,
    workers_cmd,
)
from producer.run_commands import resume_cmd, status_cmd, submit_cmd, wait_cmd  # noqa: E402

for _command in (
    submit_cmd,
    resume_cmd,
    heal_cmd,
    wait_cmd,
    status_cmd,
    queue_cmd,
    runs_cmd,
    report_cmd,
    models_cmd,
    show_model_cmd,
    compare_cmd,
    workers_cmd,
    cancel_cmd,
    delete_cmd,
    prune_cmd,
):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """The ``producer`` console script (``argv``: its arguments, default ``sys.argv[1:]``)."""
    # At exit the interpreter's last garbage collections walk every object the imported
    # libraries made (SQLAlchemy, Celery, kombu, redis), which live until the process ends
    # anyway: frozen as the last thing before exit (atexit runs handlers in reverse order),
    # they are skipped (docs/performance.md, "Simple code against tricks").
    atexit.register(gc.freeze)
    try:
        cli(args=argv, prog_name="producer")
    finally:
        # a Ctrl-C once the command has ended changes nothing: its exit status says what it did
        signal.signal(signal.SIGINT, signal.SIG_IGN)
