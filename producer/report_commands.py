"""Commands that read results back: ``runs``, ``report``, ``models``, ``show-model`` and
``compare``: thin wrappers over producer.report, producer.html_report, producer.pictures and
producer.compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from core.errors import BadInput
from core.text import plural
from producer.options import HELP, database_option, limit_option
from producer.run_commands import RunArg, resolve_run

if TYPE_CHECKING:  # core.training imports torch: not for --help
    from core.curve import EpochStats


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise BadInput(f"cannot write {str(path)!r}: {e.strerror}; choose another file") from None


@click.command("models", context_settings=HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@database_option
def models_cmd(as_json: bool, engine: Any) -> None:
    """List trained models, newest first.

    \b
    Example:
      producer models --json
    """
    from db.model_store import list_models
    from producer.tables import format_table, pct

    with engine.connect() as conn:
        rows = list_models(conn)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        click.echo("no models yet: run `producer train DIR`")
        return
    table = [
        [
            r["id"],
            f"{r['created_at']:%Y-%m-%d %H:%M:%S}",
            ",".join(json.loads(r["classes"])),
            r["n_train"],
            pct(r["accuracy_l1"]),
            pct(r["accuracy_l2"]),
            pct(r["accuracy_sgd"]),
            r["train_dir"],
        ]
        for r in rows
    ]
    headers = ["id", "created", "classes", "train", "L1", "L2", "SGD", "source"]
    click.echo(format_table(headers, table, "rllrrrrl"))


@click.command("runs", context_settings=HELP)
@limit_option("Most runs listed (the newest).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@database_option
def runs_cmd(limit: int, as_json: bool, engine: Any) -> None:
    """List runs, newest first, with when each was created. A run of the same directory
    with the same model as an earlier run is marked with that run's id under `repeats`
    (JSON: repeats_run): submitting again makes a new run, it does not replace the old one.

    \b
    Example:
      producer runs --limit 10
    """
    from core.settings import Settings
    from db.queries import list_runs, stall
    from producer.run_commands import sending_note, stall_hint
    from producer.tables import format_table, pct

    settings = Settings.from_env()
    with engine.connect() as conn:
        rows = list_runs(conn, limit)
        for r in rows:
            r["stall_hint"] = stall_hint(r, stall(conn, r), settings.stall_hint_after)
            r["sending"] = sending_note(r)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        click.echo("no runs yet: run `producer submit DIR`")
        return
    table = [
        [
            r["id"],
            f"{r['created_at']:%Y-%m-%d %H:%M:%S}",
            r["status"],
            r["priority"],
            r["model_id"],
            "?" if r["n_images"] is None else r["n_images"],
            r["n_failed"],
            pct(r["accuracy_l1"]),
            pct(r["accuracy_l2"]),
            pct(r["accuracy_sgd"]),
            "" if r["repeats_run"] is None else r["repeats_run"],
            r["source_dir"],
        ]
        for r in rows
    ]
    headers = [
        "id", "created", "status", "priority", "model", "images", "failed", "L1", "L2", "SGD",
        "repeats", "source",
    ]
    click.echo(format_table(headers, table, "rlllrrrrrrrl"))
    for r in rows:
        for note in (r["sending"], r["stall_hint"]):
            if note:
                click.echo(f"run {r['id']} {note}")


@click.command("workers", context_settings=HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@database_option
def workers_cmd(as_json: bool, engine: Any) -> None:
    """List the live workers that write to this database: device, queue, rate, last batch.

    A worker registers when it starts and is seen again every few seconds; one not seen for
    three heartbeats, or stopped, is not listed. When every worker of a queue checks
    signatures with another DIGITSCORE_SECRET than this shell's, a line says so.

    \b
    Example:
      producer workers --json
    """
    from core import defaults
    from core.settings import Settings
    from db.workers import live_workers
    from producer.queue import signing_problem
    from producer.tables import format_table

    with engine.connect() as conn:
        rows = live_workers(conn, 3 * defaults.HEARTBEAT_SECONDS)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        click.echo(
            "no live worker writes to this database: start `worker` with the same "
            f"{defaults.DATABASE_URL_ENV}"
        )
        return
    table = [
        [
            r["name"], r["device"], r["queue"], r["batches"], r["images"],
            "-" if r["images_per_second"] is None else f"{r['images_per_second']:,.0f}",
            "-" if r["last_batch_at"] is None else f"{r['last_batch_at']:%H:%M:%S}",
        ]
        for r in rows
    ]
    headers = ["name", "device", "queue", "batches", "images", "images/s", "last batch"]
    click.echo(format_table(headers, table, "lllrrrl"))
    secret = Settings.from_env().secret
    for queue in sorted({r["queue"] for r in rows}):
        problem = signing_problem(queue, [r for r in rows if r["queue"] == queue], secret)
        if problem:
            click.echo(problem)


@click.command("report", context_settings=HELP)
@click.argument("run", type=RunArg())
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write a self-contained HTML page (pictures, tables, mistakes) to this file.",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=0),
    default=24,
    show_default=True,
    help="Misclassified images shown per predictor in the HTML page (up to 100 are read from "
    "the ones each run keeps; more sorts the run's rows).",
)
@database_option
def report_cmd(
    run: int | str, as_json: bool, html_file: Path | None, max_images: int, engine: Any
) -> None:
    """Accuracy of L1, L2 and SGD on RUN, overall and per class; confusion matrices;
    counts, timings and throughput; failures.

    With --html FILE, also writes one HTML page that needs no network to view: the model's
    ideal images and SGD weight maps, the tables, the most confidently misclassified images
    (re-read from the run's source directory) and the failures.

    \b
    Examples:
      producer report 1
      producer report latest --json
      producer report latest --html run.html
    """
    from db.session import snapshot
    from producer.report import build_report, format_report

    with snapshot(engine) as conn:
        run_id = resolve_run(conn, run)
        report = build_report(conn, run_id)
        if html_file is not None:
            from producer.html_report import build_html

            page = build_html(conn, run_id, mistakes_per_predictor=max_images)
            _write(html_file, page.encode("utf-8"))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))
    if html_file is not None:
        click.echo(f"wrote {html_file}", err=True)


@click.command("show-model", context_settings=HELP)
@click.argument("model_id", metavar="[ID]", type=int, required=False)
@click.option(
    "--png",
    "png_file",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Draw the ideal images, SGD weight maps and learning curve into this PNG file.",
)
@click.option(
    "--scale", type=click.IntRange(1, 16), default=4, show_default=True, help="Pixels per pixel."
)
@database_option
def show_model_cmd(model_id: int | None, png_file: Path | None, scale: int, engine: Any) -> None:
    """Describe model ID (default: the newest) with its learning curve and, with --png, draw
    it: each class's ideal image above its SGD weight map (red: evidence for the class, blue:
    against), and under them the learning curve.

    \b
    Examples:
      producer show-model --png model.png
      producer show-model 3 --png model3.png --scale 6
    """
    from db.model_store import list_models, load_learning_curve, resolve_model_id
    from db.reads import model_arrays
    from producer.pictures import curve_chart, model_sheet, png_bytes, stacked
    from producer.tables import format_table, pct

    with engine.connect() as conn:
        model_id = resolve_model_id(conn, model_id)
        clf = model_arrays(conn, model_id)
        info = next(r for r in list_models(conn) if r["id"] == model_id)
        curve, best_epoch = load_learning_curve(conn, model_id)
    rows = [
        ["classes", ", ".join(clf.classes)],
        ["image size", f"{clf.width}x{clf.height}"],
        ["trained", f"{info['created_at']:%Y-%m-%d %H:%M:%S} on {info['train_dir']}"],
        ["images", f"{info['n_train']} training, {info['n_valid']} validation"],
        ["SGD", sgd_settings(info, len(curve))],
        [
            "validation",
            f"L1 {pct(info['accuracy_l1'])}  L2 {pct(info['accuracy_l2'])}  "
            f"SGD {pct(info['accuracy_sgd'])}",
        ],
    ]
    click.echo(format_table([f"model {model_id}", ""], rows, "ll"))
    if curve:
        click.echo("")
        click.echo(format_curve(curve, best_epoch))
    if png_file is not None:
        picture = model_sheet(clf, scale, title=f"model {model_id}")
        if curve:
            picture = stacked(picture, curve_chart(curve, best_epoch))
        _write(png_file, png_bytes(picture))
        click.echo(f"wrote {png_file}", err=True)


def sgd_settings(info: dict[str, Any], epochs_run: int) -> str:
    """The SGD line of ``show-model``: settings, and for models with a learning curve the
    epochs run, the weight decay and the epoch kept."""
    epochs = plural(info["epochs"], "epoch")
    if epochs_run:
        epochs = f"{epochs_run} of at most {epochs}"
    text = (
        f"{epochs}, lr {info['lr']}, batch {info['batch_size']}, "
        f"seed {info['seed']}, loss {info['loss']}"
    )
    if info["weight_decay"] is not None:
        text += f", weight decay {info['weight_decay']}"
    if info["best_epoch"] is not None:
        text += f"; kept epoch {info['best_epoch']} (best on validation)"
    return text


def format_curve(curve: tuple[EpochStats, ...], best_epoch: int | None) -> str:
    """The learning curve of the weight decay kept, one row per epoch; ``*`` marks the
    epoch kept."""
    from producer.tables import format_table

    def figure(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    rows = [
        [
            s.epoch,
            f"{s.lr:.4f}",
            f"{s.loss:.4f}",
            figure(s.train_accuracy),
            figure(s.valid_loss),
            figure(s.valid_accuracy),
            f"{s.weight_decay:g}",
            "*" if s.epoch == best_epoch else "",
        ]
        for s in curve
    ]
    headers = ["epoch", "lr", "loss", "train acc", "valid loss", "valid acc", "decay", "kept"]
    return format_table(headers, rows, "rrrrrrrl")


@click.command("compare", context_settings=HELP)
@click.argument("run_a", type=RunArg())
@click.argument("run_b", type=RunArg())
@limit_option("Most changed images listed.", minimum=0)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
@database_option
def compare_cmd(run_a: int | str, run_b: int | str, limit: int, as_json: bool, engine: Any) -> None:
    """Compare RUN_A with RUN_B: accuracy deltas (B - A) per predictor and class, and the
    images, matched by path, whose prediction changed.

    \b
    Examples:
      producer compare 3 latest
      producer compare 3 4 --json --limit 1000
    """
    from producer.compare import compare_runs, format_comparison

    with engine.connect() as conn:
        a, b = resolve_run(conn, run_a), resolve_run(conn, run_b)
        comparison = compare_runs(conn, a, b, limit)
    if as_json:
        click.echo(json.dumps(comparison, indent=2))
    else:
        click.echo(format_comparison(comparison))
