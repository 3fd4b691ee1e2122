"""The faster paths of a batch give what the plain ones gave: decoding once and scoring in
slices (the shipped digits' predictions bit for bit those of the plain arithmetic), the GPU
path's int32 look-up and plain copy, labels per folder, bulk writes of new rows only, and run
counts and accuracies kept by adding each batch's new rows (no aggregate over the run's
rows)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError

from bench.dataset import encoded_digits
from core import scoring
from core.columns import batch_columns, label_for
from core.fast_decode import decode_images
from core.scoring import Scores, labels_for, score_images, score_stack, to_device
from db import batch_life, queries
from db.bulk import write_predictions
from db.models import predictions
from db.session import get_engine
from producer.sample_data import load_digits
from tests.support import RECOMPUTE, save_model, score_and_store

FIELDS = ("pred_l1", "pred_l2", "pred_sgd", "dist_l1", "dist_l2", "prob_sgd")


def plain_logits(stack: np.ndarray, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The SGD logits as core/scoring.py defines them, written out in float64, where the sums
    of grey levels times whole-number weights are exact: each column's weights rounded to
    24 bits of its largest, the sums scaled by that step / 255, plus the bias, to float32."""
    w = weights.double()
    step = torch.exp2(torch.floor(torch.log2(w.abs().amax(0))) - 23)
    levels = torch.from_numpy(stack).reshape(len(stack), -1).double()
    return (levels @ torch.round(w / step) * (step / 255) + bias.double()).float()


def plain_scores(classifier, stack: np.ndarray) -> dict[str, torch.Tensor]:
    """The scoring arithmetic written out plainly, 500 images at a time, no buffers kept."""
    x = torch.from_numpy(stack).reshape(len(stack), -1).float() / 255
    ideals = classifier.ideals.reshape(classifier.ideals.shape[0], -1)
    parts = [x[i : i + 500, None, :] - ideals[None] for i in range(0, len(x), 500)]
    l1 = torch.cat([d.abs().mean(-1) for d in parts])
    l2 = torch.cat([(d * d).mean(-1).sqrt() for d in parts])
    probs = torch.softmax(plain_logits(stack, classifier.weights, classifier.bias), dim=1)
    (d1, p1), (d2, p2), (pr, ps) = l1.min(1), l2.min(1), probs.max(1)
    return {"pred_l1": p1, "pred_l2": p2, "pred_sgd": ps, "dist_l1": d1, "dist_l2": d2,
            "prob_sgd": pr}


def test_the_5000_shipped_digits_decode_and_score_as_the_plain_arithmetic(classifier):
    """The files decoded once on the fast path are the digits' own pixels (PNG is lossless),
    and a worker's scoring of them is the plain arithmetic's, bit for bit."""
    digits = load_digits()[0]
    blobs, _labels = encoded_digits()
    with torch.inference_mode(False):
        stack, ok, errors = decode_images(blobs, 28, 28)
        assert ok == list(range(5000)) and not errors and np.array_equal(stack, digits)
        got = score_stack(classifier, stack, torch.device("cpu"))
        want = plain_scores(classifier, digits)
    for f in FIELDS:
        assert torch.equal(getattr(got, f), want[f]), f
    columns = score_images(classifier, [f"{i % 10}/{i}.png" for i in range(5000)], blobs)
    classes = classifier.classes
    assert columns.answers[2] == [classes[k] for k in want["pred_sgd"].tolist()]
    assert columns.scores[0].tolist() == want["dist_l1"].tolist()


def test_scoring_in_difference_chunks_is_the_plain_arithmetic_at_every_size(classifier):
    """Every batch size around the chunk of the difference tensor scores bit for bit as the
    plain arithmetic does."""
    images = load_digits()[0]
    chunk = scoring.DIFFERENCE_ELEMENTS["cpu"] // (10 * 28 * 28)
    for n in (1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, 1000):
        got, want = score_stack(classifier, images[:n], torch.device("cpu")), plain_scores(
            classifier, images[:n])
        assert isinstance(got, Scores) and len(got) == n
        for f in FIELDS:
            assert torch.equal(getattr(got, f), want[f]), (n, f)


def test_the_scratch_tensors_are_kept_and_the_difference_sized_for_the_cache(classifier):
    """The difference tensor and the grey levels as floats are made once and reused by a
    smaller batch, which gets the scores it gets alone."""
    images = load_digits()[0][:1000]
    score_stack(classifier, images, torch.device("cpu"))
    kept, levels = scoring._scratch.diff, scoring._scratch.levels
    smaller = score_stack(classifier, images[300:700], torch.device("cpu"))
    assert scoring._scratch.diff is kept and scoring._scratch.levels is levels  # not made again
    assert kept.numel() <= scoring.DIFFERENCE_ELEMENTS["cpu"] < 1000 * kept[0].numel()
    assert levels.shape[0] >= 1000 and levels.shape[1:] == (28 * 28,)
    want = plain_scores(classifier, images[300:700])
    for f in FIELDS:
        assert torch.equal(getattr(smaller, f), want[f]), f


def test_a_gpu_batch_is_looked_up_through_int32_indices(monkeypatch):
    """On a device other than the CPU (the meta device stands in for CUDA: same code, no
    data), the grey levels are looked up with int32 indices, never int64; on the CPU the same
    look-up gives the CPU's quotients."""
    seen: list[torch.dtype] = []
    real = torch.Tensor.index_select

    def index_select(self, dim, index):
        seen.append(index.dtype)
        return real(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", index_select)
    monkeypatch.setattr(torch.Tensor, "long", lambda self: pytest.fail("int64 indices"))
    stand_in = torch.empty((4096, 28, 28), dtype=torch.uint8, device="meta")
    x = scoring.scaled_pixels(stand_in)
    assert (x.device.type, x.dtype, x.shape) == ("meta", torch.float32, (4096, 784))
    levels = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    assert torch.equal(scoring.looked_up_pixels(levels), levels.float().div_(255))
    assert seen == [torch.int32, torch.int32]


def test_a_gpu_batch_is_copied_once_and_never_pinned(monkeypatch):
    """The host stack goes to the device in one plain copy: no page-locked buffer a batch.
    ``Tensor.to`` stands in for the copy to CUDA."""
    copies: list[tuple] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda *a, **k: pytest.fail("pinned"))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append((a, k)) or self)
    stack = load_digits()[0][:8]
    tensor = to_device(stack, torch.device("cuda:0"))
    assert copies == [((torch.device("cuda:0"),), {})]
    assert torch.equal(tensor, torch.from_numpy(stack))
    assert to_device(stack, torch.device("cpu")).data_ptr() == stack.ctypes.data
    assert len(copies) == 1


def test_labels_per_folder_equal_label_for_each_path():
    classes = ("3", "7", "a b")
    paths = [
        "3/x.png", "3/y.png", "7/x.png", "x.png", "/3/x.png", "a/3/x.png", "a/3/", "a/3/.",
        "a/3/..", "3//x.png", "3/./x.png", "./7/x.png", "a b/x.png", "7/sub/x.png", "3/x/",
        "", "/", ".", "7", "7/", "3/\\x85.png", "dir/7/x.png (duplicate name 2)",
    ]
    for order in (paths, paths[::-1]):
        assert labels_for(order, classes) == [label_for(p, classes) for p in order]


def new_run(engine, model_id: int, batches: list[list[str]]) -> int:
    with engine.begin() as conn:
        run_id, _token = queries.create_run(conn, model_id, "/data", "embedded")
        for seq, paths in enumerate(batches):
            batch_life.record_batch(conn, run_id, seq, paths, 0)
    return run_id


def index_now(engine, run_id: int) -> None:
    """Give the run its unique (run_id, path) index now: SQLite's is the table's, kept while
    a run is written; PostgreSQL builds a run's when the run is finished (migration 0018), so
    these tests of a held path refused by that index build it first."""
    with engine.begin() as conn:
        queries.index_run_rows(conn, run_id)


def sql_counts(engine, run_id: int) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(text(RECOMPUTE), {"run": run_id}).mappings().one())


def run_row(engine, run_id: int) -> dict:
    with engine.connect() as conn:
        return queries.get_run(conn, run_id)


COUNTS = ("n_scored", "n_failed", "n_labelled", "n_correct_l1", "n_correct_l2",
          "n_correct_sgd")


def assert_run_agrees_with_its_rows(engine, run_id: int) -> dict:
    run, sql = run_row(engine, run_id), sql_counts(engine, run_id)
    assert {k: run[k] for k in COUNTS} == {k: sql[k] for k in COUNTS}
    for p in ("l1", "l2", "sgd"):
        if sql[f"accuracy_{p}"] is None:
            assert run[f"accuracy_{p}"] is None
        else:
            assert run[f"accuracy_{p}"] == pytest.approx(float(sql[f"accuracy_{p}"]), abs=1e-12)
    return run


def statements(engine) -> list[str]:
    """Every SQL statement the engine runs from now on (lower case)."""
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, sql, *_a: seen.append(sql.lower()))
    return seen


def aggregates_over_predictions(seen: list[str]) -> list[str]:
    return [s for s in seen if "from predictions" in s and ("count(" in s or "avg(" in s
                                                           or "sum(" in s)]


def test_counts_and_accuracies_agree_with_the_rows_after_every_batch(
    any_db_url, classifier, sample_dir
):
    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    files = sorted((sample_dir / "valid").rglob("*.png"))[:130]
    paths = [f"{f.parent.name}/{f.name}" for f in files] + ["3/bad.png", "other/x.png"]
    blobs = [f.read_bytes() for f in files] + [b"not a png", files[0].read_bytes()]
    cuts = [0, 7, 20, 45, 90, len(paths)]
    chunks = [(paths[a:b], blobs[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    run_id = new_run(engine, model_id, [p for p, _ in chunks])
    seen = statements(engine)
    stores: list[str] = []  # the statements of the stores, not of the checks
    for seq, (p, b) in enumerate(chunks):
        mark = len(seen)
        assert score_and_store(engine, classifier, run_id, seq, p, b) == len(p)
        stores += seen[mark:]
        run = assert_run_agrees_with_its_rows(engine, run_id)
        assert run["status"] == "running" and run["started_at"] is not None
    mark = len(seen)
    assert score_and_store(engine, classifier, run_id, 2, *chunks[2]) == 0  # redelivered
    assert queries.finish_submission(engine, run_id, len(paths), 0) == "done"
    stores += seen[mark:]
    run = assert_run_agrees_with_its_rows(engine, run_id)
    assert (run["n_scored"], run["n_failed"], run["n_labelled"]) == (131, 1, 130)
    assert run["finished_at"] is not None
    assert stores and aggregates_over_predictions(stores) == []


def test_a_commit_reads_no_other_rows_of_the_run(memory_engine, classifier):
    """100 batches of 10 rows: no statement aggregates the run's rows, and the last batch
    completes the run with the accuracies of all 1,000."""
    engine = memory_engine
    model_id = save_model(engine, classifier)
    batches = [[f"7/{b}-{i}.png" for i in range(10)] for b in range(100)]
    run_id = new_run(engine, model_id, batches)
    queries.finish_submission(engine, run_id, 1000, 0)
    seen = statements(engine)
    for seq, paths in enumerate(batches):
        rows = [{"path": p, "label": "7", "pred_l1": "7", "pred_l2": "3" if seq else "7",
                 "pred_sgd": "7", "dist_l1": 0.1, "dist_l2": 0.2, "prob_sgd": 0.9,
                 "error": None} for p in paths]
        batch_life.store_batch(engine, run_id, seq, batch_columns(rows))
    assert seen and aggregates_over_predictions(seen) == []
    run = assert_run_agrees_with_its_rows(engine, run_id)
    assert (run["status"], run["n_scored"], run["accuracy_l2"]) == ("done", 1000, 0.01)


def row(path: str, error: str | None = None) -> dict:
    scored = error is None
    return {"path": path, "label": "3", "pred_l1": "3" if scored else None,
            "pred_l2": "3" if scored else None, "pred_sgd": "7" if scored else None,
            "dist_l1": 0.25 if scored else None, "dist_l2": 0.5 if scored else None,
            "prob_sgd": 0.75 if scored else None, "error": error}


def test_only_new_paths_are_written_and_counted(any_db_url, classifier):
    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    run_id = new_run(engine, model_id, [["3/a.png", "3/b.png"], ["3/b.png", "3/c.png"]])
    index_now(engine, run_id)
    first = [row("3/a.png"), row("3/b.png", "empty file (0 bytes)")]
    assert batch_life.store_batch(engine, run_id, 0, batch_columns(first)) == 2
    # b is there already (its row stays as it was); c is new, and repeated in the batch
    again = [row("3/b.png"), row("3/c.png"), row("3/c.png", "second copy")]
    assert batch_life.store_batch(engine, run_id, 1, batch_columns(again)) == 1
    with engine.connect() as conn:
        stored = dict(conn.execute(text(
            "SELECT path, error FROM predictions WHERE run_id = :r"), {"r": run_id}).all())
    assert stored == {"3/a.png": None, "3/b.png": "empty file (0 bytes)", "3/c.png": None}
    run, sql = run_row(engine, run_id), sql_counts(engine, run_id)
    assert (run["n_scored"], run["n_failed"]) == (sql["n_scored"], sql["n_failed"]) == (2, 1)
    # a first delivery holding another batch's path (on PostgreSQL the straight COPY is
    # refused by the run's unique index and the batch takes the general way)
    with engine.begin() as conn:
        batch_life.record_batch(conn, run_id, 2, ["3/a.png", "3/d.png"], 0)
    later = [row("3/a.png", "changed"), row("3/d.png", "empty file (0 bytes)")]
    assert batch_life.store_batch(engine, run_id, 2, batch_columns(later)) == 1
    with engine.connect() as conn:
        stored = dict(conn.execute(text(
            "SELECT path, error FROM predictions WHERE run_id = :r"), {"r": run_id}).all())
    assert stored["3/a.png"] is None and stored["3/d.png"] == "empty file (0 bytes)"
    run, sql = run_row(engine, run_id), sql_counts(engine, run_id)
    assert (run["n_scored"], run["n_failed"]) == (sql["n_scored"], sql["n_failed"]) == (2, 2)


def test_bulk_rows_read_back_as_sqlalchemy_writes_them(any_db_url, classifier):
    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    run_id = new_run(engine, model_id, [["3/a.png"]])
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    with engine.begin() as conn:
        write_predictions(conn, run_id, 0, batch_columns([row("3/a.png")]), at)
        conn.execute(predictions.insert().values(  # as SQLAlchemy writes it
            run_id=run_id, batch_seq=0, path="ref.png", scored_at=at))
    with engine.connect() as conn:
        got = conn.execute(text(
            "SELECT * FROM predictions WHERE path = '3/a.png'")).mappings().one()
        typed = conn.execute(
            predictions.select().where(predictions.c.path == "3/a.png")).mappings().one()
    assert {k: got[k] for k in ("label", "pred_l1", "pred_sgd", "dist_l1", "prob_sgd")} == {
        "label": "3", "pred_l1": "3", "pred_sgd": "7", "dist_l1": 0.25, "prob_sgd": 0.75}
    assert typed["scored_at"].replace(tzinfo=UTC) == at
    if engine.dialect.name == "sqlite":  # stored as the same text SQLAlchemy writes
        with engine.connect() as conn:
            texts = conn.execute(text("SELECT scored_at FROM predictions ORDER BY path")).all()
        assert texts[0][0] == texts[1][0] == "2026-01-02 03:04:05.678901"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", texts[0][0])


def test_a_bad_bulk_row_raises_as_sqlalchemy_raises(any_db_url, classifier):
    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    run_id = new_run(engine, model_id, [["3/a.png"]])
    broken = {**row("3/a.png"), "path": None}  # predictions.path is NOT NULL
    with pytest.raises(IntegrityError):
        batch_life.store_batch(engine, run_id, 0, batch_columns([broken]))
    assert batch_life.store_batch(engine, run_id, 0, batch_columns([row("3/a.png")])) == 1


def test_deliveries_are_counted_with_the_rows_and_worker_deaths_at_once(any_db_url, classifier):
    """A delivery that ends adds 1 (+ its retries) in the transaction that stores its rows; a
    worker's death adds 1 at once, only to an unfinished batch of a run with that token."""
    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    run_id = new_run(engine, model_id, [["3/a.png"], ["3/b.png"], ["3/c.png"]])
    with engine.connect() as conn:
        token = conn.execute(text("SELECT token FROM runs WHERE id = :r"), {"r": run_id}).scalar()

    def deliveries(seq: int) -> int:
        with engine.connect() as conn:
            return conn.execute(text("SELECT deliveries FROM batches WHERE run_id = :r AND "
                                     "seq = :s"), {"r": run_id, "s": seq}).scalar_one()

    # batch 0: delivered once, stored; a late death report for it changes nothing
    batch_life.store_batch(engine, run_id, 0, batch_columns([row("3/a.png")]), deliveries=1)
    assert batch_life.count_failed_delivery(engine, run_id, 0, token, "died") is None
    assert deliveries(0) == 1
    # batch 1: two deaths, then a delivery that stores its rows
    counts = [batch_life.count_failed_delivery(engine, run_id, 1, token, f"died {i}")
              for i in range(2)]
    assert counts == [1, 2]
    batch = batch_life.recorded_batch(engine, run_id, 1, token)
    assert (batch.failed_deliveries, batch.paths, batch.last_failure) == (2, ["3/b.png"], "died 1")
    batch_life.store_batch(engine, run_id, 1, batch_columns([row("3/b.png")]), deliveries=1)
    assert deliveries(1) == 3
    # batch 2: a death reported with another token, or for no such batch, counts nothing
    assert batch_life.count_failed_delivery(engine, run_id, 2, "0" * 32, "died") is None
    assert batch_life.count_failed_delivery(engine, run_id, 7, token, "died") is None
    assert batch_life.recorded_batch(engine, run_id, 2, token).failed_deliveries == 0


def test_a_batch_of_several_insert_statements_is_stored_whole_and_in_order(any_db_url, classifier):
    """600 rows: two statements on SQLite; the rows come back with their values, and a
    second batch of the same paths after two rows went missing writes only the missing ones
    (the unique index refuses the batch, which is then written without the paths held)."""
    engine = get_engine(any_db_url)
    model_id = save_model(engine, classifier)
    paths = [f"{i % 10}/{i:04d}.png" for i in range(600)]
    run_id = new_run(engine, model_id, [paths, paths])
    index_now(engine, run_id)
    rows = [{**row(p, None if i % 7 else f"bad {i}"), "dist_l1": i / 1000} for i, p in
            enumerate(paths)]
    assert batch_life.store_batch(engine, run_id, 0, batch_columns(rows)) == 600
    select = text("SELECT path, error, dist_l1 FROM predictions WHERE run_id = :r")
    with engine.connect() as conn:
        stored = [tuple(r) for r in conn.execute(select, {"r": run_id})]
    assert sorted(stored) == sorted((r["path"], r["error"], r["dist_l1"]) for r in rows)
    run, sql = run_row(engine, run_id), sql_counts(engine, run_id)
    assert (run["n_scored"], run["n_failed"]) == (sql["n_scored"], sql["n_failed"]) == (514, 86)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM predictions WHERE run_id = :r AND path IN "
                          "('0/0000.png', '3/0593.png')"), {"r": run_id})
    assert batch_life.store_batch(engine, run_id, 1, batch_columns(rows)) == 2
    with engine.connect() as conn:
        again = {tuple(r) for r in conn.execute(select, {"r": run_id})}
    assert again == set(stored)
