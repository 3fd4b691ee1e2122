"""Commands that read results back: ``runs``, ``report`` and ``models``."""

from __future__ import annotations

import json
from typing import Any

import click

from producer.options import HELP, database_option
from producer.run_commands import RunArg, resolve_run


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@click.command("models", context_settings=HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@database_option
def models_cmd(as_json: bool, engine: Any) -> None:
    """List trained models, newest first.

    \b
    Example:
      producer models --json
    """
    from producer.report import printable
    from worker.model_store import list_models

    with engine.connect() as conn:
        rows = list_models(conn)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        click.echo("no models yet: run `producer train DIR`")
        return
    click.echo(
        f"{'id':>4}  {'created':<19}  {'classes':<20}  {'train':>6}  "
        f"{'L1':>6}  {'L2':>6}  {'SGD':>6}  source"
    )
    for r in rows:
        classes = ",".join(json.loads(r["classes"]))
        click.echo(
            f"{r['id']:>4}  {r['created_at']:%Y-%m-%d %H:%M:%S}  {printable(classes)[:20]:<20}  "
            f"{r['n_train']:>6}  {_pct(r['accuracy_l1']):>6}  {_pct(r['accuracy_l2']):>6}  "
            f"{_pct(r['accuracy_sgd']):>6}  {printable(r['train_dir'])}"
        )


@click.command("runs", context_settings=HELP)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@database_option
def runs_cmd(limit: int, as_json: bool, engine: Any) -> None:
    """List runs, newest first.

    \b
    Example:
      producer runs --limit 10
    """
    from db.queries import list_runs
    from producer.report import printable

    with engine.connect() as conn:
        rows = list_runs(conn, limit)
    if as_json:
        click.echo(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        click.echo("no runs yet: run `producer submit DIR`")
        return
    click.echo(
        f"{'id':>4}  {'status':<8}  {'model':>5}  {'images':>7}  {'failed':>6}  "
        f"{'L1':>6}  {'L2':>6}  {'SGD':>6}  source"
    )
    for r in rows:

        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.1f}%"

        n = "?" if r["n_images"] is None else r["n_images"]
        click.echo(
            f"{r['id']:>4}  {r['status']:<8}  {r['model_id']:>5}  {n:>7}  {r['n_failed']:>6}  "
            f"{pct(r['accuracy_l1']):>6}  {pct(r['accuracy_l2']):>6}  "
            f"{pct(r['accuracy_sgd']):>6}  {printable(r['source_dir'])}"
        )


@click.command("report", context_settings=HELP)
@click.argument("run", type=RunArg())
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
@database_option
def report_cmd(run: int | str, as_json: bool, engine: Any) -> None:
    """Accuracy of L1, L2 and SGD on RUN, overall and per class; counts; failures.

    \b
    Examples:
      producer report 1
      producer report latest --json
    """
    from producer.report import build_report, format_report

    with engine.connect() as conn:
        report = build_report(conn, resolve_run(conn, run))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))
