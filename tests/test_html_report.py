"""`producer report RUN --html FILE`: a self-contained page, file names escaped, thumbnails
re-read from disk (a placeholder when gone), and rendered by a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from db.mistakes import confident_mistakes, least_confident
from db.session import get_engine
from producer.pictures import load_thumbnail
from tests.support import (
    GONE_NAME,
    IMG_NAME,
    SCRIPT_NAME,
    odd_source_dir,
    prediction_rows,
    save_model,
    service_missing,
    submit_embedded,
)

CHROMIUM = os.environ.get("DIGITSCORE_TEST_CHROMIUM", "/usr/bin/chromium")


class Page(HTMLParser):
    """Elements and text of an HTML document, as a browser's parser sees them."""

    def __init__(self, document: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(document)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs in self.tags if t == tag]

    def classed(self, cls: str) -> list[dict[str, str | None]]:
        return [a for _, a in self.tags if cls in (a.get("class") or "").split()]


@pytest.fixture
def html_run(sqlite_url, sample_dir, classifier, tmp_path, run_cli):
    """A scored run whose page is written after one misclassified file was deleted."""
    engine = get_engine(sqlite_url)
    root = odd_source_dir(sample_dir, tmp_path / "odd")
    run_id = submit_embedded(engine, classifier, save_model(engine, classifier), root)
    (root / "3" / GONE_NAME).unlink()
    page = tmp_path / "report.html"
    r = run_cli("report", str(run_id), "--html", str(page), "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    with engine.connect() as conn:
        mistakes = {p: confident_mistakes(conn, run_id, p, 24) for p in ("l1", "l2", "sgd")}
        mistakes["unsure"] = least_confident(conn, run_id, 24)  # their grid is drawn alike
    return page, mistakes, prediction_rows(engine, run_id)


def expected_images(classifier, mistakes) -> tuple[int, int]:
    """(img elements, placeholders): 2 pictures per class, 1 colour bar, 1 per shown mistake
    or least confident image whose file still exists."""
    cards = [r["path"] for rows in mistakes.values() for r in rows]
    gone = sum(p == f"3/{GONE_NAME}" for p in cards)
    return 2 * len(classifier.classes) + 1 + len(cards) - gone, gone


def test_html_page_is_self_contained_and_escapes_file_names(html_run, classifier):
    path, mistakes, rows = html_run
    document = path.read_text("utf-8")
    page = Page(document)
    assert page.all("script") == [] and page.all("link") == [] and page.all("iframe") == []
    images = page.all("img")
    n_img, n_gone = expected_images(classifier, mistakes)
    assert len(images) == n_img
    assert all((img["src"] or "").startswith("data:image/png;base64,") for img in images)
    assert "http://" not in document and "https://" not in document
    assert not [a for _, a in page.tags if any(k.startswith("on") for k in a)]
    text = "".join(page.text)
    assert SCRIPT_NAME in text  # shown as text in the failures table
    assert f"3/{IMG_NAME}" in text  # shown as text under its thumbnail
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in document
    # the deleted file is a confident mistake of every predictor: a placeholder, not a picture
    assert n_gone == 3
    assert len(page.classed("missing")) == n_gone
    assert len(page.classed("card")) == sum(len(v) for v in mistakes.values())
    wrong_sgd = sum(
        1 for r in rows if r["error"] is None and r["label"] and r["pred_sgd"] != r["label"]
    )
    assert f"SGD: {min(wrong_sgd, 24)} of {wrong_sgd} wrong" in text


def test_html_thumbnail_is_the_scored_file(html_run, sample_dir):
    """The picture under IMG_NAME's card is that file's own pixels (a re-encoded PNG)."""
    import base64
    import io

    path, _, _ = html_run
    page = Page(path.read_text("utf-8"))
    thumbs = [a for a in page.all("img") if a.get("alt") == f"3/{IMG_NAME}"]
    assert thumbs, "no thumbnail for the misclassified file"
    data = base64.b64decode((thumbs[0]["src"] or "").split(",", 1)[1])
    shown = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    a_seven = sorted((sample_dir / "valid" / "7").glob("*.png"))[0]
    assert (shown == np.asarray(Image.open(a_seven).convert("L"))).all()


def test_thumbnails_are_read_only_from_inside_the_resolved_source_directory(
    sample_dir, tmp_path
):
    """Any stored path: a thumbnail only when the file's resolved path lies inside the run's
    resolved source directory; ``..``, absolute paths, NUL bytes and directory symlinks
    that lead out get none, and none raises."""
    root = tmp_path / "src"
    outside = tmp_path / "outside"
    (root / "3").mkdir(parents=True)
    outside.mkdir()
    digit = sorted((sample_dir / "valid" / "3").glob("*.png"))[0]
    shutil.copy(digit, root / "3" / "a.png")
    shutil.copy(digit, outside / "secret.png")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "3" / "inner").symlink_to(root / "3", target_is_directory=True)
    (tmp_path / "src-link").symlink_to(root, target_is_directory=True)
    for source, path in [
        (root, "3/a.png"),
        (root, "3/../3/a.png"),
        (root, "3/inner/a.png"),  # a link that stays inside
        (tmp_path / "src-link", "3/a.png"),  # the source directory itself through a link
    ]:
        assert load_thumbnail(str(source), path, 28, 28) is not None, path
    for path in [
        "link/secret.png",
        "../outside/secret.png",
        "3/../../outside/secret.png",
        str(outside / "secret.png"),
        "3/a.png\0",
        "\0",
        "",
        ".",
        "3/../..",
        "x" * 5000,
    ]:
        assert load_thumbnail(str(root), path, 28, 28) is None, path
    assert load_thumbnail(str(root) + "\0", "3/a.png", 28, 28) is None


def test_html_report_survives_hostile_stored_paths(html_run, sqlite_url, tmp_path, run_cli):
    """Misclassified rows whose stored paths lead out of the source directory (a directory
    symlink, ``..``, an absolute path) or hold a NUL byte: the page is written, each with a
    placeholder and never the outside file's pixels."""
    _page, mistakes, _rows = html_run
    engine = get_engine(sqlite_url)
    with engine.connect() as conn:
        run_id, source = conn.execute(text("SELECT id, source_dir FROM runs")).one()
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = sorted({r["path"] for rows in mistakes.values() for r in rows})[:4]
    assert len(victims) == 4
    for p in victims:
        shutil.copy(Path(source) / p, outside / Path(p).name)
    (Path(source) / "link").symlink_to(outside, target_is_directory=True)
    names = [Path(p).name for p in victims]
    hostile = [f"link/{names[0]}", f"../outside/{names[1]}", str(outside / names[2]),
               f"3/{names[3]}\0.png"]
    with engine.begin() as conn:
        for old, new in zip(victims, hostile, strict=True):
            for table in ("predictions", "run_mistakes", "run_unsure"):  # a row, as kept
                conn.execute(text(f"UPDATE {table} SET path = :new WHERE run_id = :r AND "
                                  "path = :old"), {"new": new, "old": old, "r": run_id})
    page = tmp_path / "hostile.html"
    r = run_cli("report", str(run_id), "--html", str(page), "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    html = Page(page.read_text("utf-8"))
    shown = {a.get("alt") for a in html.all("img")}
    assert not shown & set(hostile)
    assert len(html.classed("missing")) >= len(hostile)


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_html_report_renders_in_headless_chromium(html_run, classifier, tmp_path):
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        service_missing(f"Chromium at {CHROMIUM}")
    path, mistakes, _ = html_run
    url = path.resolve().as_uri()
    shot = tmp_path / "report.png"
    done = _chromium(
        f"--screenshot={shot}", "--window-size=1200,2000", url, profile=tmp_path / "p1"
    )
    assert shot.exists(), done.stderr[-2000:]
    assert shot.stat().st_size > 50_000
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    not_white = (pixels < 240).any(axis=2).mean()
    assert not_white > 0.05  # tables, text and black digit thumbnails, not a blank page
    dark = (pixels < 30).all(axis=2)
    assert dark.sum() > 20 * 84 * 84 * 0.5  # the digits' black backgrounds are on screen
    # the weight maps' red and blue are on screen
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    assert ((r - b > 80) & (g < 150)).sum() > 200
    assert ((b - r > 80) & (g < 180)).sum() > 200

    dom = _chromium("--dump-dom", url, profile=tmp_path / "p2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)
    assert page.all("script") == []
    n_img, n_gone = expected_images(classifier, mistakes)
    assert len(page.all("img")) == n_img
    assert len(page.classed("missing")) == n_gone
    # run summary, accuracy, predicted classes, agreement, SGD probability, three confusion
    # matrices, failure reasons, failures
    assert len(page.all("table")) == 10
    assert len(page.classed("confusion")) == 3
    text = "".join(page.text)
    assert SCRIPT_NAME in text and f"3/{IMG_NAME}" in text


def test_a_running_runs_page_says_its_results_are_partial(
    model_db, sample_dir, classifier, tmp_path, run_cli
):
    from db import batch_life, queries
    from tests.support import score_and_store

    engine = get_engine(model_db)
    root = sample_dir / "valid"
    names = [str(p.relative_to(root)) for p in sorted(root.rglob("*.png"))[:4]]
    with engine.begin() as conn:
        run_id, _ = queries.create_run(conn, 1, str(root), "celery")
        for seq in (0, 1):
            batch_life.record_batch(conn, run_id, seq, names[2 * seq:2 * seq + 2], 10)
    queries.finish_submission(engine, run_id, 4, 0)
    page = tmp_path / "report.html"

    def banner() -> list[str]:
        r = run_cli("report", str(run_id), "--html", str(page), "--database-url", model_db)
        assert r.exit_code == 0, r.output
        parsed = Page(page.read_text())
        return [a.get("class") or "" for a in parsed.classed("partial")] and [
            t for t in parsed.text if "4 images, " in t]

    def store(seq: int) -> None:
        paths = names[2 * seq:2 * seq + 2]
        score_and_store(engine, classifier, run_id, seq, paths,
                        [(root / p).read_bytes() for p in paths])

    store(0)
    assert banner() == [" run 1 is still running: 4 images, 2 with rows so far; write the "
                        "report again once it is done (`producer wait 1`)."]
    store(1)
    assert banner() == []


def test_thumbnails_of_archive_members_are_read_from_their_archive(
    sqlite_url, sample_dir, classifier, tmp_path
):
    """A member of a tar shard is shown by its own pixels, read at the place its batch's
    record names, not as a file that is gone."""
    import base64
    import io
    import tarfile

    from producer.html_report import build_html

    root = tmp_path / "shards"
    root.mkdir()
    files = sorted((sample_dir / "valid" / "3").glob("*.png"))[:20]
    with tarfile.open(root / "a.tar", "w") as tf:
        for f in files:
            tf.add(f, arcname=f"3/{f.name}")
    engine = get_engine(sqlite_url)
    run_id = submit_embedded(engine, classifier, save_model(engine, classifier), root)
    with engine.connect() as conn:
        page = Page(build_html(conn, run_id, mistakes_per_predictor=5))
    by_name = {f"a.tar/3/{f.name}": f for f in files}
    shown = [a for a in page.all("img") if a.get("alt") in by_name]
    assert len(shown) >= 5 and not page.classed("missing")  # least confident, mistakes
    for img in shown:
        data = base64.b64decode((img["src"] or "").split(",", 1)[1])
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
        assert (pixels == np.asarray(Image.open(by_name[img["alt"]]).convert("L"))).all()
