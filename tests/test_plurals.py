"""Counted nouns agree with their count in every message a user reads: each message is made
with one and with two of what it counts (issue 29, item 7)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from sqlalchemy import text

from core.errors import DirectoryError
from core.labelled import LabelledImages, require_every_class
from core.settings import Settings
from core.text import agree, plural
from db.session import get_engine
from db.workers import register_worker
from producer import queue
from producer.cancel import Removed
from producer.heal import Healed
from producer.report_commands import sgd_settings
from tests.support import query, submit
from worker.batch_timing import time_limit_warning
from worker.devices import TorchGpus, no_gpu_reason

#: What a message with a count in it must never say.
HEDGED = re.compile(r"\w\((s|es)\)")


def said(text: str) -> str:
    assert not HEDGED.search(text), text
    return text


def test_plural_and_agree_follow_the_count():
    assert plural(1, "image") == "1 image" and plural(2, "image") == "2 images"
    assert plural(1_024, "batch", "batches") == "1,024 batches"
    assert plural(0, "worker") == "0 workers"
    assert agree(1, "consumes", "consume") == "consumes"
    assert agree(2, "consumes", "consume") == "consume"


def test_the_sweeps_line_counts_its_lost_batches():
    why = "no message for it on the broker"
    one, two = Healed({7: [(0, why)]}), Healed({7: [(0, why), (1, why)]})
    assert said(one.said(7)) == "re-sent 1 lost batch (no message for it on the broker)"
    assert said(two.said(7)) == "re-sent 2 lost batches (no message for it on the broker)"


def test_the_payloads_a_cancel_or_delete_removed_are_counted():
    assert said(Removed(1).describe()) == "1 payload deleted from Redis"
    assert said(Removed(2).describe()) == "2 payloads deleted from Redis"


def test_empty_class_folders_are_counted():
    def refused(empty: int) -> str:
        data = LabelledImages(torch.zeros(2, 28, 28, dtype=torch.uint8),
                              torch.zeros(2, dtype=torch.int64), ("3", "7", "9")[: 1 + empty], 0)
        with pytest.raises(DirectoryError) as e:
            require_every_class(data, Path("/data/train"))
        return said(str(e.value))

    assert refused(1).startswith("class folder '7' of '/data/train' holds no readable images: "
                                 "add images or remove the folder")
    assert refused(2).startswith("class folders '7', '9' of '/data/train' hold no readable "
                                 "images: add images or remove the folders")


def test_gpus_that_cannot_start_are_counted():
    one = no_gpu_reason(TorchGpus("2.13.0", "12.6", 1, "no kernel image"), "/dev/nvidia0")
    two = no_gpu_reason(TorchGpus("2.13.0", "12.6", 2, "no kernel image"), "/dev/nvidia0")
    assert "counts 1 GPU but cannot initialise CUDA" in said(one or "")
    assert "counts 2 GPUs but cannot initialise CUDA" in said(two or "")


def test_the_slow_batch_warning_counts_its_images():
    assert said(time_limit_warning(10.0, 1, 12, 15) or "").startswith("a batch of 1 image takes")
    assert said(time_limit_warning(10.0, 2, 12, 15) or "").startswith("a batch of 2 images takes")


def test_show_models_epochs_are_counted():
    info = {"epochs": 1, "lr": 0.5, "batch_size": 64, "seed": 0, "loss": "log",
            "weight_decay": None, "best_epoch": None}
    assert sgd_settings(info, 0).startswith("1 epoch, lr 0.5")
    assert sgd_settings({**info, "epochs": 2}, 0).startswith("2 epochs, lr 0.5")


@pytest.mark.parametrize("n", [1, 2])
def test_the_idle_hints_count_the_workers(n, memory_engine, monkeypatch):
    """The two hints that name the consuming workers: on another database, and busy."""
    names = [f"digitscore-cpu-{i}@host" for i in range(n)]
    monkeypatch.setattr(queue, "consumers", lambda settings: names)
    settings = Settings.from_env({}, broker_url="redis://127.0.0.1:6379/9")
    elsewhere = said(queue.why_idle(settings, memory_engine, 1, healing=True))
    one = n == 1
    workers = f"worker {names[0]} consumes" if one else f"workers {', '.join(names)} consume"
    assert elsewhere.startswith(f"{workers} queue digitscore on broker redis://127.0.0.1:6379/9 "
                                f"but {'writes' if one else 'write'} to another database")
    assert f"restart {'that worker' if one else 'those workers'} with " in elsewhere
    for name in names:
        register_worker(memory_engine, name, "host", 1, "cpu", "digitscore")
    busy = said(queue.why_idle(settings, memory_engine, 1, healing=True))
    assert busy.startswith(f"{n} {'worker consumes' if one else 'workers consume'} queue ")
    assert f"{'it' if one else 'they'} may be busy with other runs" in busy


@pytest.mark.parametrize("n", [1, 2])
def test_retry_failed_counts_the_batches_it_requeues(n, run_cli, sample_dir, model_db):
    r = submit(run_cli, sample_dir / "valid", model_db, "--batch-size", "50")
    assert r.exit_code == 0, r.output
    seqs = [b["seq"] for b in query(model_db, "SELECT seq FROM batches ORDER BY seq")][:n]
    assert len(seqs) == n
    with get_engine(model_db).begin() as conn:
        for seq in seqs:
            conn.execute(text("UPDATE batches SET status = 'failed' WHERE seq = :s"), {"s": seq})
    r = run_cli("resume", "1", "--retry-failed", "--database-url", model_db)
    assert r.exit_code == 0, r.output
    again = "1 failed batch" if n == 1 else "2 failed batches"
    assert f"run 1: {again} to score again" in said(r.stderr)
