"""`producer report`, `runs`, `models` and `show-model` on real runs, checked against what
Python computes from the prediction rows and the model's own tensors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from db.model_store import load_classifier
from db.session import get_engine
from producer.pictures import CURVE_CHART_SIZE
from tests.support import (
    odd_source_dir,
    prediction_rows,
    save_model,
    scored_labelled,
    submit_embedded,
)


@pytest.fixture
def odd_run(any_db_url, sample_dir, classifier, tmp_path):
    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    root = odd_source_dir(sample_dir, tmp_path / "odd")
    run_id = submit_embedded(engine, classifier, model_id, root)
    return any_db_url, engine, run_id


def test_report_json_agrees_with_the_prediction_rows(odd_run, run_cli, classifier):
    url, engine, run_id = odd_run
    r = run_cli("report", str(run_id), "--json", "--database-url", url)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    rows = prediction_rows(engine, run_id)
    labelled = scored_labelled(rows)
    classes = list(classifier.classes)
    assert report["classes"] == classes

    failed = [x for x in rows if x["error"] is not None]
    assert report["counts"]["failed"] == len(failed) == 2  # broken.png and the script file
    assert report["counts"]["scored"] == len(rows) - 2
    assert report["counts"]["labelled"] == len(labelled) == 202
    assert report["counts"]["unlabelled"] == 1

    for p in ("l1", "l2", "sgd"):
        section = report["predictors"][p]
        pairs = Counter((x["label"], x[f"pred_{p}"]) for x in labelled)
        expected = [[pairs[(t, q)] for q in classes] for t in classes]
        assert section["confusion"] == expected
        assert sum(map(sum, section["confusion"])) == 202
        n_correct = sum(x[f"pred_{p}"] == x["label"] for x in labelled)
        assert section["n_correct"] == n_correct
        assert section["accuracy"] == pytest.approx(n_correct / 202)
        for row in report["per_class"]:
            of_class = [x for x in labelled if x["label"] == row["label"]]
            right = sum(x[f"pred_{p}"] == x["label"] for x in of_class)
            assert row["n"] == len(of_class)
            assert row[f"accuracy_{p}"] == pytest.approx(right / len(of_class))
    assert {row["label"] for row in report["per_class"]} == set(classes)

    t = report["timings"]
    assert 0 <= t["first_result_seconds"] <= t["total_seconds"]
    assert 0 <= t["sending_seconds"] <= t["total_seconds"]
    assert t["images_per_second"] == pytest.approx(len(rows) / t["total_seconds"])
    assert report["batches"]["n_batches"] == report["batches"]["n_done"] == 4  # 205 / 64
    reasons = Counter(x["error"] for x in failed)
    assert {(f["error"], f["n"]) for f in report["failure_reasons"]} == set(reasons.items())


def test_report_text_shows_confusion_matrices_and_escapes_file_names(
    memory_engine, classifier, sample_dir, tmp_path
):
    from producer.report import build_report, format_report

    root = odd_source_dir(sample_dir, tmp_path / "odd")
    (root / "3" / "red\x1b[31mname.png").write_bytes(b"")  # an empty file: a failure row
    run_id = submit_embedded(memory_engine, classifier, save_model(memory_engine, classifier), root)
    with memory_engine.connect() as conn:
        text = format_report(build_report(conn, run_id))
    assert "\x1b" not in text
    assert "3/red\\x1b[31mname.png: empty file (0 bytes)" in text
    rows = scored_labelled(prediction_rows(memory_engine, run_id))
    for p, name in (("l1", "L1"), ("l2", "L2"), ("sgd", "SGD")):
        block = text.split(f"confusion matrix, {name} ")[1].splitlines()
        # block[1] is the header; then one line per true class, counts in class order
        for line, label in zip(block[2:4], classifier.classes, strict=True):
            cells = line.split()
            assert cells[0] == label
            want = [
                sum(1 for x in rows if x["label"] == label and x[f"pred_{p}"] == q)
                for q in classifier.classes
            ]
            assert [int(c) for c in cells[1:]] == want


def _column_start(header: str, name: str) -> int:
    return header.index(name)


def test_runs_and_models_columns_widen_for_long_values(run_cli, tmp_path, sample_dir, sqlite_url):
    db = ["--database-url", sqlite_url]
    long_a = "three_written_by_a_very_careful_hand"
    long_b = "seven_with_a_bar_through_it_continental_style"
    train = tmp_path / "t"
    for name, digit in ((long_a, "3"), (long_b, "7")):
        (train / name).mkdir(parents=True)
        for f in sorted((sample_dir / "train" / digit).glob("*.png"))[:20]:
            (train / name / f.name).write_bytes(f.read_bytes())
    assert run_cli("train", str(train), "--epochs", "2", *db).exit_code == 0
    deep = tmp_path / ("a_directory_with_a_rather_long_name_" * 3) / "valid"
    deep.mkdir(parents=True)
    for f in sorted((sample_dir / "valid" / "3").glob("*.png"))[:5]:
        (deep / f.name).write_bytes(f.read_bytes())
    assert run_cli("submit", str(deep), *db).exit_code == 0
    assert run_cli("submit", str(train), *db).exit_code == 0

    models = json.loads(run_cli("models", "--json", *db).stdout)
    assert [m["id"] for m in models] == [1]
    assert json.loads(models[0]["classes"]) == sorted([long_a, long_b])
    assert "ideal_images" not in models[0]
    out = run_cli("models", *db).stdout.splitlines()
    assert ",".join(sorted([long_a, long_b])) in out[1]  # not truncated
    train_end = out[0].index("train") + len("train")
    assert out[1][:train_end].endswith(f" {models[0]['n_train']}")  # right-aligned
    assert out[1][_column_start(out[0], "source") :] == str(train.resolve())

    out = run_cli("runs", *db).stdout.splitlines()
    assert len(out) == 3
    start = _column_start(out[0], "source")
    assert {line[start:] for line in out[1:]} == {str(deep.resolve()), str(train.resolve())}
    sgd_end = out[0].index("SGD") + 3
    assert out[1][:sgd_end].endswith("%")  # run 2, labelled: right-aligned under SGD
    assert out[2][:sgd_end].endswith(" n/a")  # run 1 has no labelled image

    runs = json.loads(run_cli("runs", "--json", *db).stdout)
    assert [r["id"] for r in runs] == [2, 1] and runs[1]["n_images"] == 5
    assert runs[1]["source_dir"] == str(deep.resolve())


def _windows(array: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(array, (h, w))


def test_show_model_png_draws_each_ideal_image_and_signed_weight_map(
    run_cli, sqlite_url, sample_dir, tmp_path
):
    db = ["--database-url", sqlite_url]
    for epochs in ("3", "5"):
        r = run_cli("train", str(sample_dir / "train"), "--epochs", epochs, *db)
        assert r.exit_code == 0, r.output
    png = tmp_path / "model.png"
    r = run_cli("show-model", "1", "--png", str(png), "--scale", "1", *db)
    assert r.exit_code == 0, r.output
    assert "model 1" in r.stdout and "3, 7" in r.stdout
    with get_engine(sqlite_url).connect() as conn:
        clf = load_classifier(conn, 1)
    sheet = np.asarray(Image.open(png).convert("RGB")).astype(int)
    gray = sheet[..., 0]
    red_over_blue = _windows(sheet[..., 0] > sheet[..., 2] + 20, 28, 28)
    blue_over_red = _windows(sheet[..., 2] > sheet[..., 0] + 20, 28, 28)
    weights = clf.weights.numpy()
    vmax = np.abs(weights).max()
    for k in range(len(clf.classes)):
        ideal = np.rint(clf.ideals[k].numpy() * 255).astype(int)
        matches = (_windows(gray, 28, 28) == ideal).all(axis=(2, 3))
        assert matches.sum() == 1, f"ideal image of class {clf.classes[k]} not drawn"
        w = weights[:, k].reshape(28, 28)
        pos, neg = w > 0.2 * vmax, w < -0.2 * vmax
        assert pos.any() and neg.any()
        fits = (red_over_blue | ~pos).all(axis=(2, 3)) & (blue_over_red | ~neg).all(axis=(2, 3))
        assert fits.any(), f"no map red where class {clf.classes[k]}'s weights are positive"

    default = tmp_path / "newest.png"
    assert run_cli("show-model", "--png", str(default), *db).exit_code == 0
    chart = CURVE_CHART_SIZE[1]  # the learning curve under the sheet keeps its size
    assert Image.open(default).height - chart > 1.5 * (Image.open(png).height - chart)  # scale 4
    second = tmp_path / "second.png"
    assert run_cli("show-model", "2", "--png", str(second), *db).exit_code == 0
    assert default.read_bytes() == second.read_bytes()  # the newest model is the default
    assert "model 2" in run_cli("show-model", *db).stdout
    r = run_cli("show-model", "9", "--png", str(tmp_path / "x.png"), *db)
    assert r.exit_code == 2 and "model 9 does not exist" in r.output
    assert not (tmp_path / "x.png").exists()


def test_report_of_a_missing_run_exits_2(run_cli, sqlite_url, tmp_path: Path):
    r = run_cli("report", "7", "--html", str(tmp_path / "r.html"), "--database-url", sqlite_url)
    assert r.exit_code == 2 and "run 7 does not exist" in r.output
    assert not (tmp_path / "r.html").exists()


def test_reports_and_model_pictures_never_import_torch():
    """``report``, ``report --json``, ``report --html`` and ``show-model`` read class names
    and the model's arrays with NumPy: importing torch alone takes longer than a report."""
    import subprocess
    import sys

    from tests.support import ROOT

    code = (
        "import sys\n"
        "from producer.cli import cli\n"
        "import producer.report_commands, producer.report, producer.html_report\n"
        "import producer.pictures, db.reads, db.mistakes\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"
