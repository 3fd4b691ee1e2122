"""A run's report as one self-contained HTML page.

Everything is inline: CSS in a ``<style>`` element, pictures as ``data:`` URIs, no script at
all, and a Content-Security-Policy that forbids fetching anything, so the page can be mailed
or opened offline. File names, labels and error texts are data: every one goes through
:func:`esc` (``html.escape`` after :func:`printable`).

The worker stores no pixels, so thumbnails of misclassified images are re-read from the
run's ``source_dir``, and only from inside it (producer/pictures.inside_source: the stored
path resolved, symlinks followed, must lie in the resolved ``source_dir``); a file that is
gone, or a stored path that leads elsewhere, gets a placeholder.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection

from core.columns import PREDICTORS
from core.curve import EpochStats
from core.text import plural, printable
from db.mistakes import confident_mistakes, least_confident
from db.model_store import load_learning_curve
from db.reads import ModelArrays, member_records, model_arrays
from producer.pictures import (
    colour_bar,
    curve_chart,
    data_uri,
    ideal_pictures,
    load_thumbnail,
    weight_pictures,
)
from producer.report import NAMES, _secs, build_report
from producer.tables import pct

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1150px; }
h1 { font-size: 22px; margin: 0 0 12px; } h2 { font-size: 18px; margin: 24px 0 8px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
table { border-collapse: collapse; margin: 4px 0 8px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.overall td { font-weight: bold; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
figure { margin: 0; text-align: center; }
figcaption { font-size: 12px; color: #444; word-break: break-all; }
img.digit { width: 84px; height: 84px; image-rendering: pixelated; border: 1px solid #999; }
img.bar { width: 252px; height: 14px; border: 1px solid #999; vertical-align: middle; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.card { border: 1px solid #ddd; padding: 6px; font-size: 12px; }
.card img, .missing { width: 84px; height: 84px; image-rendering: pixelated; }
.missing { display: inline-flex; align-items: center; justify-content: center;
  background: repeating-linear-gradient(45deg, #eee, #eee 6px, #ddd 6px, #ddd 12px);
  color: #666; border: 1px dashed #999; font-size: 11px; }
.path { word-break: break-all; color: #333; }
.wrong { color: #b2182b; font-weight: bold; } .right { color: #1b7837; }
.note { color: #666; font-size: 12px; }
.partial { background: #fff3cd; border: 1px solid #e0b000; padding: 8px 12px; }
.hist td.barcell { width: 320px; } .hist div { background: #2166ac; height: 12px; }
"""


def esc(value: Any) -> str:
    """Text made safe as HTML element content or attribute value."""
    return html.escape(printable("" if value is None else str(value)), quote=True)


def _table(headers: Sequence[str], rows: Iterable[str], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _num(value: Any) -> str:
    return f'<td class="num">{esc(value)}</td>'


def _summary(report: dict[str, Any]) -> str:
    run, c, t, b = report["run"], report["counts"], report["timings"], report["batches"]
    rate = t["images_per_second"]
    items = [
        ("status", run["status"]),
        ("model", run["model_id"]),
        ("backend", run["backend"]),
        ("source directory", run["source_dir"]),
        ("images", "?" if c["images"] is None else c["images"]),
        ("scored", c["scored"]),
        ("failed", c["failed"]),
        ("skipped (not images)", c["skipped"]),
        ("labelled / unlabelled", f"{c['labelled']} / {c['unlabelled']}"),
        ("total time", _secs(t["total_seconds"])),
        ("throughput", "n/a" if rate is None else f"{rate:,.0f} images/s"),
        ("sending", _secs(t["sending_seconds"])),
        ("first result after", _secs(t["first_result_seconds"])),
        ("first to last result", _secs(t["first_to_last_result_seconds"])),
        ("batches", f"{b['n_batches']} ({b['n_done']} done, {b['n_redelivered']} redelivered)"),
        (
            "batch sent to stored",
            f"median {_secs(b['median_seconds'])}, max {_secs(b['max_seconds'])}",
        ),
    ]
    rows = (f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items)
    return f'<table class="summary"><tbody>{"".join(rows)}</tbody></table>'


def _partial(report: dict[str, Any]) -> str:
    """For a run not finished: a banner saying the page shows part of it."""
    run, c = report["run"], report["counts"]
    if run["status"] not in ("queued", "running"):
        return ""
    total = "images not all listed yet" if c["images"] is None else plural(c["images"], "image")
    return (
        f'<p class="partial"><strong>Partial results:</strong> run {esc(run["id"])} is still '
        f"{esc(run['status'])}: {total}, {c['scored'] + c['failed']:,} with rows so far; "
        f"write the report again once it is done (`producer wait {esc(run['id'])}`).</p>"
    )


def _accuracy(report: dict[str, Any]) -> str:
    rows = [
        f"<tr><td>{esc(r['label'])}</td>{_num(r['n'])}"
        + "".join(_num(pct(r.get(f"accuracy_{p}"))) for p in NAMES)
        + "</tr>"
        for r in report["per_class"]
    ]
    acc = report["accuracy"]
    rows.append(
        f'<tr class="overall"><td>overall</td>{_num(report["counts"]["labelled"])}'
        + "".join(_num(pct(acc[p])) for p in NAMES)
        + "</tr>"
    )
    return _table(["class", "images", *NAMES.values()], rows, "accuracy")


def _confusion(name: str, classes: list[str], matrix: list[list[int]]) -> str:
    rows = []
    for label, counts in zip(classes, matrix, strict=True):
        total = sum(counts) or 1
        cells = []
        for pred, n in zip(classes, counts, strict=True):
            colour = "27,120,55" if pred == label else "178,24,43"
            alpha = 0.08 + 0.6 * n / total if n else 0.0
            cells.append(f'<td class="num" style="background: rgba({colour},{alpha:.2f})">{n}</td>')
        rows.append(f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>")
    headers = ["label \\ predicted", *classes]
    return f"<div><h3>{esc(name)}</h3>{_table(headers, rows, 'confusion')}</div>"


def _model(classifier: ModelArrays, model_id: int) -> str:
    ideals = ideal_pictures(classifier)
    maps, vmax = weight_pictures(classifier)

    def figures(images: list[Any], what: str) -> str:
        return "".join(
            f'<figure><img class="digit" src="{data_uri(img)}" '
            f'alt="{esc(what)} of class {esc(name)}"><figcaption>{esc(name)}</figcaption></figure>'
            for img, name in zip(images, classifier.classes, strict=True)
        )

    bar = f'<img class="bar" src="{data_uri(colour_bar(252, 14))}" alt="weight colour scale">'
    return (
        f"<h2>Model {esc(model_id)}</h2>"
        "<h3>Ideal images (per-class mean, used by L1 and L2)</h3>"
        f'<div class="row">{figures(ideals, "ideal image")}</div>'
        "<h3>SGD weights (red: evidence for the class, blue: against)</h3>"
        f'<div class="row">{figures(maps, "SGD weights")}</div>'
        f'<p class="note">{-vmax:.3g} {bar} +{vmax:.3g} (one scale for all classes)</p>'
    )


def _thumbnail(report: dict[str, Any], classifier: ModelArrays, row: dict[str, Any],
               cache: dict) -> str:
    path = row["path"]
    if path not in cache:
        img = load_thumbnail(report["run"]["source_dir"], path, classifier.height,
                             classifier.width, row.get("member"))
        cache[path] = None if img is None else data_uri(img)
    uri = cache[path]
    if uri is None:
        return '<span class="missing" role="img" aria-label="file not found">file gone</span>'
    return f'<img src="{uri}" alt="{esc(path)}">'


def _card(row: dict[str, Any], thumb: str) -> str:
    def pred(p: str, extra: str) -> str:
        if row["label"] is None:
            cls = ""
        else:
            cls = "right" if row[f"pred_{p}"] == row["label"] else "wrong"
        return f'<div>{NAMES[p]} <span class="{cls}">{esc(row[f"pred_{p}"])}</span> {extra}</div>'

    def num(value: float | None, digits: str) -> str:
        return "" if value is None else format(value, digits)

    return (
        f'<div class="card">{thumb}<div class="path">{esc(row["path"])}</div>'
        f"<div>label <b>{esc(row['label'] or 'none')}</b></div>"
        + pred("l1", f"(dist {num(row['dist_l1'], '.3f')})")
        + pred("l2", f"(dist {num(row['dist_l2'], '.3f')})")
        + pred("sgd", f"(p {num(row['prob_sgd'], '.3f')})")
        + "</div>"
    )


def _mistakes(
    report: dict[str, Any], classifier: ModelArrays, mistakes: dict[str, list[dict[str, Any]]]
) -> str:
    cache: dict[str, str | None] = {}
    parts = ["<h2>Most confidently misclassified</h2>"]
    how = {
        "l1": "smallest L1 distance to the wrong ideal image first",
        "l2": "smallest L2 distance to the wrong ideal image first",
        "sgd": "highest SGD probability of the wrong class first",
    }
    for p in PREDICTORS:
        rows = mistakes.get(p, [])
        wrong = report["predictors"][p]["n_images"] - report["predictors"][p]["n_correct"]
        parts.append(
            f'<h3>{NAMES[p]}: {len(rows)} of {wrong} wrong <span class="note">({how[p]})</span>'
            "</h3>"
        )
        cards = "".join(_card(r, _thumbnail(report, classifier, r, cache)) for r in rows)
        parts.append(f'<div class="grid">{cards}</div>' if rows else "<p>none</p>")
    return "".join(parts)


def _predictions(report: dict[str, Any]) -> str:
    """What the run predicted: classes per predictor, agreement, the SGD probability's
    histogram (one bar per tenth)."""
    s = report["predictions"]
    if not s["scored"]:
        return ""
    predicted = s["predicted"]
    rows = [
        f"<tr><td>{esc(c)}</td>" + "".join(_num(f"{predicted[p][c]:,}") for p in PREDICTORS)
        + "</tr>"
        for c in predicted["sgd"]
    ]
    names = {"all": "all three", **{f"{a}_{b}": f"{NAMES[a]} and {NAMES[b]}" for a, b in (
        ("l1", "l2"), ("l1", "sgd"), ("l2", "sgd"))}}
    agree = [
        f"<tr><td>{esc(names[k])}</td>{_num(format(v['n'], ','))}{_num(pct(v['fraction']))}</tr>"
        for k, v in s["agreement"].items()
    ]
    most = max(b["n"] for b in s["prob_sgd"]) or 1
    bars = [
        f"<tr><td>{b['low']:.1f} to {b['high']:.1f}</td>{_num(format(b['n'], ','))}"
        f'<td class="barcell"><div style="width: {100 * b["n"] / most:.1f}%"></div></td></tr>'
        for b in s["prob_sgd"]
    ]
    return (
        f"<h2>Predictions of the {esc(s['scored'])} scored images</h2>"
        + '<div class="row"><div><h3>Predicted classes</h3>'
        + _table(["class", *NAMES.values()], rows, "predicted")
        + "</div><div><h3>Agreement</h3>"
        + _table(["predictors", "images", "share"], agree, "agreement")
        + "</div><div><h3>SGD probability of the class predicted</h3>"
        + _table(["probability", "images", ""], bars, "hist")
        + "</div></div>"
    )


def _unsure(report: dict[str, Any], classifier: ModelArrays, rows: list[dict[str, Any]]) -> str:
    cache: dict[str, str | None] = {}
    cards = "".join(_card(r, _thumbnail(report, classifier, r, cache)) for r in rows)
    return (
        '<h2>Least confident <span class="note">(smallest SGD probability first, '
        "labelled or not)</span></h2>"
        + (f'<div class="grid unsure">{cards}</div>' if rows else "<p>none</p>")
    )


def _failures(report: dict[str, Any]) -> str:
    n = report["counts"]["failed"]
    if not n:
        return "<h2>Failures</h2><p>none</p>"
    reasons = (
        f"<tr>{_num(r['n'])}<td>{esc(r['error'])}</td></tr>" for r in report["failure_reasons"]
    )
    listed = (
        f"<tr><td>{esc(f['path'])}</td><td>{esc(f['error'])}</td></tr>" for f in report["failures"]
    )
    return (
        f"<h2>Failures ({n})</h2>{_table(['images', 'reason'], reasons, 'reasons')}"
        f"<h3>First {len(report['failures'])} of {n}</h3>"
        f"{_table(['path', 'error'], listed, 'failures')}"
    )


def _curve(curve: tuple[EpochStats, ...], best_epoch: int | None) -> str:
    if not curve:
        return ""
    return (
        "<h3>Learning curve (the grey line marks the epoch whose SGD weights were kept)</h3>"
        f'<img src="{data_uri(curve_chart(curve, best_epoch))}" '
        'alt="validation accuracy and training loss per epoch">'
    )


def render_html(
    report: dict[str, Any],
    classifier: ModelArrays,
    mistakes: dict[str, list[dict[str, Any]]],
    curve: tuple[EpochStats, ...] = (),
    best_epoch: int | None = None,
    unsure: list[dict[str, Any]] | None = None,
) -> str:
    run = report["run"]
    title = f"digitscore run {run['id']}"
    confusions = "".join(
        _confusion(name, report["classes"], report["predictors"][p]["confusion"])
        for p, name in NAMES.items()
    )
    unlabelled = report["predictions"]["unlabelled"]
    accuracy = f"<p>{esc(unlabelled)}</p>" if unlabelled else _accuracy(report)
    confusion_section = (
        f'<h2>Confusion matrices</h2><div class="row">{confusions}</div>'
        if report["counts"]["labelled"] else ""
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{esc(title)}</h1>{_partial(report)}'
        f'<div class="row"><div><h2>Run</h2>{_summary(report)}</div>'
        f"<div><h2>Accuracy</h2>{accuracy}</div></div>"
        f"{_predictions(report)}"
        f"{confusion_section}"
        f"{_model(classifier, run['model_id'])}"
        f"{_curve(curve, best_epoch)}"
        f"{_mistakes(report, classifier, mistakes) if report['counts']['labelled'] else ''}"
        f"{_unsure(report, classifier, unsure or [])}"
        f"{_failures(report)}"
        "</body></html>\n"
    )


def build_html(
    conn: Connection, run_id: int, mistakes_per_predictor: int = 24, max_failures: int = 200
) -> str:
    """The whole page for ``run_id``: report, what was predicted, model pictures, thumbnails
    of the surest mistakes and of the least confident images, failures."""
    report = build_report(conn, run_id, max_failures)
    classifier = model_arrays(conn, report["run"]["model_id"])
    mistakes = {
        p: confident_mistakes(conn, run_id, p, mistakes_per_predictor) for p in PREDICTORS
    }
    curve, best_epoch = load_learning_curve(conn, report["run"]["model_id"])
    unsure = least_confident(conn, run_id, mistakes_per_predictor)
    shown = [r for rows in [*mistakes.values(), unsure] for r in rows]
    members = member_records(conn, run_id, sorted({r["path"] for r in shown}))
    for r in shown:
        r["member"] = members.get(r["path"])
    return render_html(report, classifier, mistakes, curve, best_epoch, unsure)
