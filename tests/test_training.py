"""Training the linear model: the epoch kept is the best on validation, the stored weights
score raw pixels, the defaults match a tuned L-BFGS logistic regression on the shipped digits,
and bad training input is refused before anything is stored."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from alembic import command
from alembic.config import Config
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sqlalchemy import func, select, text
from threadpoolctl import threadpool_limits

from core import defaults
from core.curve import curve_from_json
from core.labelled import LabelledImages, holdout_split, load_labelled, subset
from core.training import (
    SgdSettings,
    accuracies,
    fold_scaling,
    input_scaling,
    train_model,
)
from db.model_store import load_classifier
from db.models import models
from db.reads import model_arrays
from db.session import MIGRATIONS, get_engine, make_engine
from producer.pictures import ACCURACY_INK, model_sheet
from producer.sample_data import write_sample
from tests.support import save_model

#: The grid of inverse penalties the reference chooses from on validation.
REFERENCE_C = (0.01, 0.03, 0.1, 0.3, 1.0)


def reference_accuracy(
    train: LabelledImages, valid: LabelledImages, grid: tuple[float, ...] = REFERENCE_C
) -> float:
    """scikit-learn's L-BFGS logistic regression on pixels / 255, its C the best of ``grid``
    on the validation images. On one BLAS thread: with several test processes on two cores,
    OpenBLAS's threads spin for their share (40 s of CPU instead of 4 on the ten digits, the
    same accuracy)."""

    def flat(data: LabelledImages) -> np.ndarray:
        return data.stack.reshape(len(data.stack), -1).numpy() / 255.0

    best = 0.0
    for c in grid:
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")  # lbfgs may stop at max_iter on the weak penalties
            model = LogisticRegression(C=c, max_iter=1000).fit(flat(train), train.labels.numpy())
        best = max(best, float(model.score(flat(valid), valid.labels.numpy())))
    return best


@pytest.fixture(scope="module")
def ten_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[LabelledImages, LabelledImages]:
    root = tmp_path_factory.mktemp("ten")
    write_sample(root, range(10))
    train = load_labelled(root / "train")
    return train, load_labelled(root / "valid", train.classes)


def test_kept_epoch_is_the_best_on_validation(train_data, valid_data):
    settings = SgdSettings(patience=None)
    trained = train_model(train_data, settings, valid=valid_data)
    curve = trained.curve
    assert len(curve) == settings.epochs
    best = max(curve, key=lambda s: (s.rank(), -s.epoch))
    assert trained.best_epoch == best.epoch
    # the stored weights are that epoch's: scoring them gives its validation accuracy
    assert accuracies(trained.classifier, valid_data)["sgd"] == best.valid_accuracy
    assert trained.weight_decay == best.weight_decay
    # the curve is a real one: not every epoch is as good as the kept one
    assert min(s.valid_accuracy for s in curve) < best.valid_accuracy


def test_training_stops_after_patience_epochs_without_a_better_one(train_data, valid_data):
    trained = train_model(train_data, SgdSettings(epochs=30, patience=2), valid=valid_data)
    assert len(trained.curve) < 30
    assert len(trained.curve) == trained.best_epoch + 2
    kept = trained.curve[trained.best_epoch - 1]
    assert all(s.rank() <= kept.rank() for s in trained.curve)


def test_scaling_folds_back_into_weights_for_raw_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 12, generator=g)
    weights, bias = torch.randn(12, 3, generator=g), torch.randn(3, generator=g)
    mean, scale = input_scaling(x)
    raw_weights, raw_bias = fold_scaling(weights, bias, mean, scale)
    scaled = ((x - mean) / scale) @ weights + bias
    assert torch.allclose(x @ raw_weights + raw_bias, scaled, atol=1e-5)
    assert not torch.allclose(x @ weights + bias, scaled, atol=1e-2)


def test_defaults_match_tuned_lbfgs_on_3_vs_7(train_data, valid_data):
    trained = train_model(train_data, SgdSettings(), valid=valid_data)
    ours = accuracies(trained.classifier, valid_data)["sgd"]
    assert ours >= reference_accuracy(train_data, valid_data) - 0.005 - 1e-9


@pytest.mark.slow
def test_defaults_match_tuned_lbfgs_on_ten_digits(ten_digits):
    train, valid = ten_digits
    trained = train_model(train, SgdSettings(), valid=valid)
    ours = accuracies(trained.classifier, valid)["sgd"]
    assert ours >= reference_accuracy(train, valid) - 0.005 - 1e-9


@pytest.mark.slow
def test_defaults_match_tuned_lbfgs_on_8x8_digits():
    """Another size: scikit-learn's own 1,797 digits of 8x8 pixels (values 0-16), held out as
    ``producer train`` holds out. The learning rate over the inputs' largest variance suits
    64 inputs as it suits 784."""
    digits = load_digits()
    stack = torch.from_numpy(np.rint(digits.images * 255 / 16).astype(np.uint8))
    data = LabelledImages(stack, torch.from_numpy(digits.target), tuple("0123456789"), 0)
    train_idx, valid_idx = holdout_split(data, 0.2, 42, Path("digits"))
    train, valid = subset(data, train_idx), subset(data, valid_idx)
    trained = train_model(train, SgdSettings(), valid=valid)
    ours = accuracies(trained.classifier, valid)["sgd"]
    assert ours >= reference_accuracy(train, valid, (0.1, 1.0, 10.0, 100.0)) - 0.005 - 1e-9


def test_bright_images_train_as_well_as_dark_ones(ten_digits):
    """Inverted digits (white background) are the same problem for a linear model: the
    centred inputs make the defaults do as well on them as on the originals."""
    train, valid = ten_digits

    def inverted(data: LabelledImages) -> LabelledImages:
        return LabelledImages(255 - data.stack, data.labels, data.classes, 0)

    dark = accuracies(train_model(train, SgdSettings(), valid=valid).classifier, valid)["sgd"]
    bright_model = train_model(inverted(train), SgdSettings(), valid=inverted(valid)).classifier
    bright = accuracies(bright_model, inverted(valid))["sgd"]
    assert abs(bright - dark) <= 0.005


# ---------------------------------------------------------------- the command


def test_train_stores_the_learning_curve_and_show_model_prints_it(run_cli, sample_dir, sqlite_url):
    r = run_cli("train", str(sample_dir / "train"), "--epochs", "6", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    assert "held out of" in r.output and "(--holdout 0.2)" in r.output
    assert r.output.count("valid accuracy") == 6
    with get_engine(sqlite_url).connect() as conn:
        row = conn.execute(select(models)).mappings().one()
    curve = curve_from_json(row["learning_curve"])
    assert [s.epoch for s in curve] == list(range(1, 7))
    assert row["n_valid"] == 160 and row["n_train"] == 640
    assert 1 <= row["best_epoch"] <= 6
    assert row["weight_decay"] == curve[row["best_epoch"] - 1].weight_decay
    assert row["accuracy_sgd"] == curve[row["best_epoch"] - 1].valid_accuracy
    assert json.loads(row["learning_curve"])[0]["lr"] == defaults.LEARNING_RATE

    r = run_cli("show-model", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    assert f"kept epoch {row['best_epoch']} (best on validation)" in r.output
    lines = [line.split() for line in r.output.splitlines()]
    kept = [line for line in lines if line and line[-1] == "*"]
    assert len(kept) == 1 and kept[0][0] == str(row["best_epoch"])


def write_pngs(folder: Path, n: int, size: tuple[int, int] = (6, 6), start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.full(size[::-1], (start + i) * 20 % 256, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{start + i}.png")


def model_count(url: str) -> int:
    with get_engine(url).connect() as conn:
        return int(conn.execute(select(func.count()).select_from(models)).scalar_one())


def test_class_folder_without_images_is_refused(run_cli, tmp_path, sqlite_url):
    write_pngs(tmp_path / "train" / "a", 4)
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    r = run_cli("train", str(tmp_path / "train"), "--database-url", sqlite_url)
    assert r.exit_code == 2
    assert "class folder 'b' of" in r.output and "holds no readable images" in r.output
    assert model_count(sqlite_url) == 0


def test_images_of_two_sizes_are_refused_naming_both(run_cli, tmp_path, sqlite_url):
    write_pngs(tmp_path / "train" / "a", 4, (6, 6))
    write_pngs(tmp_path / "train" / "b", 3, (6, 6))
    write_pngs(tmp_path / "train" / "b", 1, (8, 5), start=10)
    r = run_cli("train", str(tmp_path / "train"), "--database-url", sqlite_url)
    assert r.exit_code == 2
    assert "two sizes" in r.output and "6x6" in r.output and "8x5" in r.output
    assert "10.png" in r.output
    assert model_count(sqlite_url) == 0


def test_validation_images_of_another_size_are_refused(run_cli, tmp_path, sqlite_url):
    for name in ("a", "b"):
        write_pngs(tmp_path / "train" / name, 4, (6, 6))
        write_pngs(tmp_path / "valid" / name, 2, (7, 7))
    r = run_cli(
        "train",
        str(tmp_path / "train"),
        "--valid",
        str(tmp_path / "valid"),
        "--database-url",
        sqlite_url,
    )
    assert r.exit_code == 2
    assert "6x6" in r.output and "7x7" in r.output
    assert model_count(sqlite_url) == 0


def test_a_single_class_is_refused(run_cli, tmp_path, sqlite_url):
    write_pngs(tmp_path / "train" / "a", 4)
    r = run_cli("train", str(tmp_path / "train"), "--database-url", sqlite_url)
    assert r.exit_code == 2
    assert "at least two class folders" in r.output and "only 'a'" in r.output
    assert model_count(sqlite_url) == 0


def test_validation_classes_must_be_the_training_classes(run_cli, tmp_path, sqlite_url):
    for name in ("a", "b", "c"):
        write_pngs(tmp_path / "train" / name, 4)
    for name in ("a", "b", "d"):
        write_pngs(tmp_path / "valid" / name, 2)
    r = run_cli(
        "train",
        str(tmp_path / "train"),
        "--valid",
        str(tmp_path / "valid"),
        "--database-url",
        sqlite_url,
    )
    assert r.exit_code == 2
    assert "differ from the training classes" in r.output
    assert "missing 'c'" in r.output and "not trained on 'd'" in r.output
    assert model_count(sqlite_url) == 0


@pytest.mark.parametrize(
    ("name", "shown", "problem"),
    [
        (b"caf\xe9", "caf\\xe9", "it is not valid UTF-8"),
        (b"new\nline", "new\\nline", "it holds a control character"),
        ("\u202eevil".encode(), "\\u202eevil", "it holds a control character"),
        (b"x" * 101, "x" * 101, "it is 101 characters long, more than 100"),
    ],
)
def test_class_folders_that_cannot_name_a_class_are_refused_with_a_rename(
    run_cli, tmp_path, sqlite_url, name, shown, problem
):
    """A class name is stored as text and shown in every report: a folder whose name is not
    UTF-8, holds a control character or is too long is refused (exit 2) before training,
    named escaped, with a command that renames it; after it, training succeeds."""
    train_dir = tmp_path / "train"
    write_pngs(train_dir / "a", 4)
    bad = os.path.join(os.fsencode(train_dir), name)
    write_pngs(Path(os.fsdecode(bad)), 4, start=5)
    r = run_cli("train", str(train_dir), "--database-url", sqlite_url)
    assert r.exit_code == 2, r.output
    (line,) = [x for x in r.output.splitlines() if "cannot name a class" in x]
    assert f"class folder '{shown}' of '{train_dir}' cannot name a class: {problem}" in line
    assert model_count(sqlite_url) == 0
    rename = line[line.index("mv -- "):]
    subprocess.run(["bash", "-c", rename], check=True)
    assert [p.name for p in train_dir.iterdir()].count("a") == 1 and not os.path.exists(bad)
    r = run_cli("train", str(train_dir), "--epochs", "1", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    assert model_count(sqlite_url) == 1


def test_png_and_html_report_draw_the_learning_curve(run_cli, sample_dir, sqlite_url, tmp_path):
    db = ["--database-url", sqlite_url]
    assert run_cli("train", str(sample_dir / "train"), "--epochs", "4", *db).exit_code == 0
    png = tmp_path / "model.png"
    assert run_cli("show-model", "1", "--png", str(png), "--scale", "1", *db).exit_code == 0
    picture = np.asarray(Image.open(png).convert("RGB"))
    with get_engine(sqlite_url).connect() as conn:
        clf = load_classifier(conn, 1)
        arrays = model_arrays(conn, 1)  # as show-model reads the model
    sheet_height = model_sheet(arrays, 1, title="model 1").height
    below = picture[sheet_height:]
    assert below.shape[0] > 100  # the chart is under the sheet
    assert (below == ACCURACY_INK).all(axis=2).sum() > 50  # with the accuracy line in it

    r = run_cli("submit", str(sample_dir / "valid"), "--wait", *db)
    assert r.exit_code == 0, r.output
    page = tmp_path / "run.html"
    assert run_cli("report", "latest", "--html", str(page), *db).exit_code == 0
    assert "Learning curve" in page.read_text()

    # a model stored without a curve (as before migration 0008) is drawn without one
    save_model(get_engine(sqlite_url), clf)
    r = run_cli("show-model", "2", "--png", str(png), "--scale", "1", *db)
    assert r.exit_code == 0 and "valid acc" not in r.stdout
    assert Image.open(png).height == sheet_height


def test_migration_0008_keeps_older_models_without_a_curve(any_db_url, run_cli):
    """A database at revision 0004 with a model: upgrading adds the three columns, NULL for
    it, and ``show-model`` still describes it."""
    engine = make_engine(any_db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    ideals = torch.zeros(2, 2, 2).numpy().astype("<f4").tobytes()
    weights = torch.ones(4, 2).numpy().astype("<f4").tobytes()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO models (id, created_at, train_dir, classes, height, width, n_train, "
                "n_valid, loss, epochs, lr, batch_size, seed, ideal_images, sgd_weights, "
                "sgd_bias) VALUES (1, '2026-11-24 10:00:00', 't', '[\"3\", \"7\"]', 2, 2, 1, 1, "
                "'x', 20, 0.5, 256, 42, :i, :w, :b)"
            ),
            {"i": ideals, "w": weights, "b": b"\0" * 8},
        )
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    with engine.connect() as conn:
        row = conn.execute(text("SELECT weight_decay, best_epoch, learning_curve FROM models"))
        assert row.one() == (None, None, None)
    engine.dispose()
    r = run_cli("show-model", "1", "--database-url", any_db_url)
    assert r.exit_code == 0, r.output
    assert "20 epochs, lr 0.5" in r.output and "kept epoch" not in r.output
    assert "valid acc" not in r.output


def test_each_epoch_line_shows_a_bar_of_the_epochs_loss_and_validation_accuracy():
    from core.curve import EpochStats
    from producer.training import epoch_line

    stats = EpochStats(5, 0.25, 0.9, 0.3, 0.875, 2.0, 0.01)
    line = epoch_line(stats, 20, best=True)
    assert line.startswith("[#####" + "-" * 15 + "] epoch   5/20")
    assert "loss 0.2500" in line and "valid accuracy 0.8750" in line and line.endswith("*")
    assert epoch_line(EpochStats(20, 0.1, 1.0, None, None, 1.0, 0.0), 20, best=False).startswith(
        "[" + "#" * 20 + "]")


def test_a_class_too_small_to_hold_out_is_named_with_its_count(run_cli, tmp_path, sqlite_url):
    """One image in a class: it cannot be held out and trained on; the error says which
    class, how many images it has, and that --valid is the way out."""
    write_pngs(tmp_path / "train" / "a", 1)
    write_pngs(tmp_path / "train" / "b", 1, start=5)
    r = run_cli("train", str(tmp_path / "train"), "--database-url", sqlite_url)
    assert r.exit_code == 2, r.output
    assert "class 'a'" in r.output and "has 1 image:" in r.output and "--valid" in r.output
    assert "no readable images" not in r.output
    assert model_count(sqlite_url) == 0


def test_few_validation_images_per_class_give_a_warning_with_the_count(
    run_cli, tmp_path, sqlite_url
):
    """Two images per class: one is held out of each, training goes on, and a warning
    counts the validation images of each class under 10; plurals agree."""
    write_pngs(tmp_path / "train" / "a", 2)
    write_pngs(tmp_path / "train" / "b", 2, start=5)
    db = ["--database-url", sqlite_url]
    r = run_cli("train", str(tmp_path / "train"), "--epochs", "2", *db)
    assert r.exit_code == 0, r.output
    warning = next(line for line in r.stderr.splitlines() if line.startswith("warning:"))
    assert "1 image of class 'a'" in warning and "1 image of class 'b'" in warning
    assert f"fewer than {defaults.MIN_VALID_PER_CLASS} per class" in warning
    assert "validation accuracy on 2 images:" in r.stdout
    with get_engine(sqlite_url).connect() as conn:
        assert conn.execute(select(models.c.n_train, models.c.n_valid)).one() == (2, 2)

    for name, n in (("a", 12), ("b", 3)):
        write_pngs(tmp_path / "valid" / name, n)
    r = run_cli("train", str(tmp_path / "train"), "--valid", str(tmp_path / "valid"), *db)
    assert r.exit_code == 0, r.output
    assert "3 images of class 'b'" in r.stderr and "class 'a'" not in r.stderr


def test_enough_validation_images_give_no_warning(run_cli, tmp_path, sqlite_url):
    write_pngs(tmp_path / "train" / "a", 50)
    write_pngs(tmp_path / "train" / "b", 50, start=3)
    r = run_cli("train", str(tmp_path / "train"), "--epochs", "1", "--database-url", sqlite_url)
    assert r.exit_code == 0, r.output
    assert "warning" not in r.stderr
    assert "validation accuracy on 20 images:" in r.stdout


def test_the_learning_curve_is_the_kept_weight_decays_at_every_epoch(train_data, valid_data):
    """The curve is one copy's, the one kept: every epoch has its weight decay, and its
    loss never jumps to another copy's."""
    settings = SgdSettings(epochs=6, weight_decays=(0.0, 0.01, 0.03), patience=None)
    seen: list = []
    trained = train_model(train_data, settings, valid=valid_data, on_epoch=seen.append)
    assert [s.epoch for s in trained.curve] == list(range(1, 7))
    assert {s.weight_decay for s in trained.curve} == {trained.weight_decay}
    kept = trained.curve[trained.best_epoch - 1]
    assert kept == seen[trained.best_epoch - 1]  # the leading copy of the epoch kept
    assert accuracies(trained.classifier, valid_data)["sgd"] == kept.valid_accuracy


def test_chart_ticks_are_round_and_cover_the_values():
    from producer.pictures import nice_ticks

    assert nice_ticks(0.0, 0.23, 5) == [0.0, 0.1, 0.2, 0.3]
    assert nice_ticks(0.9, 0.99, 5) == [0.9, 0.95, 1.0]
    assert nice_ticks(1, 30, 10, cover=False) == [5, 10, 15, 20, 25, 30]
    assert nice_ticks(0.5, 0.5) == [0.5]
