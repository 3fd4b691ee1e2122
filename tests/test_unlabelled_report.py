"""An unlabelled run (folders that are not the model's classes): its text, JSON and HTML
reports say what was predicted, equal to SQL over its rows, and why there is no accuracy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from sqlalchemy import text

from db.session import get_engine
from tests.conftest import service_missing
from tests.support import save_model, submit_embedded
from tests.test_html_report import CHROMIUM, Page

REASON = "no folder name is one of the model's classes 3, 7: accuracy needs labelled images"


@pytest.fixture
def unlabelled_run(any_db_url, sample_dir, classifier, tmp_path):
    root = tmp_path / "wrongnames"
    shutil.copytree(sample_dir / "valid" / "3", root / "cats")
    shutil.copytree(sample_dir / "valid" / "7", root / "dogs")
    engine = get_engine(any_db_url)
    run_id = submit_embedded(engine, classifier, save_model(engine, classifier), root)
    return any_db_url, engine, run_id


def _sql(engine, query: str, run_id: int) -> list:
    with engine.connect() as conn:
        return list(conn.execute(text(query), {"r": run_id}))


def test_unlabelled_report_counts_equal_sql_over_the_rows(unlabelled_run, run_cli):
    url, engine, run_id = unlabelled_run
    r = run_cli("report", str(run_id), "--json", "--database-url", url)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["predictions"]
    assert s["scored"] == 200 and s["unlabelled"] == REASON
    for p in ("l1", "l2", "sgd"):
        rows = _sql(
            engine,
            f"SELECT pred_{p}, COUNT(*) FROM predictions WHERE run_id = :r "
            "AND error IS NULL GROUP BY pred_{p}".replace("{p}", p),
            run_id,
        )
        assert {k: v for k, v in s["predicted"][p].items() if v} == dict(rows)
        assert set(s["predicted"][p]) >= {"3", "7"}
    agreement = {
        "all": "pred_l1 = pred_l2 AND pred_l2 = pred_sgd",
        "l1_l2": "pred_l1 = pred_l2",
        "l1_sgd": "pred_l1 = pred_sgd",
        "l2_sgd": "pred_l2 = pred_sgd",
    }
    for name, where in agreement.items():
        [(n,)] = _sql(
            engine, f"SELECT COUNT(*) FROM predictions WHERE run_id = :r AND {where}", run_id
        )
        assert s["agreement"][name] == {"n": n, "fraction": n / 200}
    probs = [
        p for (p,) in _sql(engine, "SELECT prob_sgd FROM predictions WHERE run_id = :r", run_id)
    ]
    assert [b["n"] for b in s["prob_sgd"]] == [
        sum(min(int(p * 10), 9) == i for p in probs) for i in range(10)
    ]
    assert s["agreement"]["all"]["n"] < 200  # the test can tell agreement from a count

    out = run_cli("report", str(run_id), "--database-url", url).stdout
    assert REASON in out and "overall" not in out and "confusion matrix" not in out
    for p, col in (("l1", 1), ("l2", 2), ("sgd", 3)):
        for c in ("3", "7"):
            line = next(x.split() for x in out.splitlines() if x.split()[:1] == [c])
            assert int(line[col]) == s["predicted"][p][c]
    assert f"all three {100 * s['agreement']['all']['fraction']:.1f}%" in out


def test_unlabelled_html_shows_predictions_and_the_least_confident(
    unlabelled_run, run_cli, tmp_path
):
    url, engine, run_id = unlabelled_run
    page = tmp_path / "run.html"
    r = run_cli(
        "report", str(run_id), "--html", str(page), "--max-images", "12", "--database-url", url
    )
    assert r.exit_code == 0, r.output
    html = Page(page.read_text("utf-8"))
    words = " ".join(html.text)
    assert REASON in words and "Most confidently misclassified" not in words
    assert len(html.classed("hist")) == 1 and len(html.classed("confusion")) == 0
    unsure = _sql(
        engine,
        "SELECT path FROM predictions WHERE run_id = :r ORDER BY prob_sgd, path LIMIT 12",
        run_id,
    )
    cards = html.classed("card")
    assert len(cards) == 12
    assert [a.get("alt") for a in html.all("img")][-12:] == [p for (p,) in unsure]

    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        service_missing(f"Chromium at {CHROMIUM}")
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = Page(dom.stdout)
    assert len(rendered.classed("card")) == 12 and REASON in " ".join(rendered.text)
