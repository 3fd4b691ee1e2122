"""What a run predicted, labelled or not: the section of every report that scoring unlabelled
images (the main job) needs, since accuracy says nothing about them.

Per predictor, how many scored images it called each class; how often L1, L2 and SGD agree
(all three, each pair); the distribution of the SGD probability in tenths. All of it is read
from the counts each batch's commit keeps (db.reads.run_summary), so it costs the same few
rows however many images the run has. The least confident images themselves are the kept
``run_unsure`` rows (db.mistakes.least_confident), drawn by producer/html_report.py.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from core.columns import PREDICTORS
from core.text import plural
from db import reads
from producer.tables import format_table, pct

NAMES = {"l1": "L1", "l2": "L2", "sgd": "SGD"}


def unlabelled_reason(classes: list[str], n_scored: int, n_labelled: int) -> str | None:
    """The one line that says why a run has no accuracy: none of its folder names is a class
    of the model; ``None`` when some image is labelled (or none is scored)."""
    if n_labelled or not n_scored:
        return None
    return (
        f"no folder name is one of the model's classes {', '.join(classes)}: accuracy needs "
        "labelled images"
    )


def build_predictions(
    conn: Connection, run_id: int, classes: list[str], n_labelled: int
) -> dict[str, Any]:
    """The section as a JSON-ready dict: ``predicted`` (predictor -> class -> images, every
    class of the model listed, in its order, then any other), ``agreement`` (images and
    fraction of the scored ones), ``prob_sgd`` (one bin per tenth) and ``unlabelled``."""
    s = reads.run_summary(conn, run_id)
    order = classes + sorted({c for p in PREDICTORS for c in s.predicted[p]} - set(classes))
    pairs = {f"{a}_{b}": n for (a, b), n in s.agree_pairs.items()}
    bins = len(s.prob_bins)
    return {
        "scored": s.scored,
        "predicted": {p: {c: s.predicted[p].get(c, 0) for c in order} for p in PREDICTORS},
        "agreement": {
            name: {"n": n, "fraction": n / s.scored if s.scored else None}
            for name, n in {"all": s.agree, **pairs}.items()
        },
        "prob_sgd": [
            {"low": i / bins, "high": (i + 1) / bins, "n": n} for i, n in enumerate(s.prob_bins)
        ],
        "unlabelled": unlabelled_reason(classes, s.scored, n_labelled),
    }


def _pair_name(key: str) -> str:
    a, b = key.split("_")
    return f"{NAMES[a]}={NAMES[b]}"


def format_predictions(section: dict[str, Any]) -> list[str]:
    """The section as lines of text: the predicted classes table, one line of agreement and
    one of the SGD probability's non-empty tenths."""
    if not section["scored"]:
        return []
    predicted = section["predicted"]
    classes = list(predicted["sgd"])
    rows = [[c, *(predicted[p][c] for p in PREDICTORS)] for c in classes]
    lines = [
        f"predicted classes of the {plural(section['scored'], 'scored image')}",
        format_table(["class", *NAMES.values()], rows, "lrrr"),
    ]
    agree = section["agreement"]
    pairs = ", ".join(
        f"{_pair_name(k)} {pct(v['fraction'])}" for k, v in agree.items() if k != "all"
    )
    lines.append(
        f"agreement  all three {pct(agree['all']['fraction'])} "
        f"({agree['all']['n']:,} of {section['scored']:,}); {pairs}"
    )
    tenths = ", ".join(
        f"{b['low']:.1f}-{b['high']:.1f} {b['n']:,}" for b in section["prob_sgd"] if b["n"]
    )
    lines.append(f"SGD probability of the class predicted: {tenths}")
    return lines
