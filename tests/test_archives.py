"""Shards in: images inside tar, tar.gz and zip archives scored like loose files, one row per
member, bad archives as rows, never a crash, a silent skip or a read outside the archive."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from core.archive_batches import archive_batches, read_recorded
from core.archives import member_name
from core.files import DirectoryWalk
from core.tar_scan import FileSource, TarMember, scan_tar
from tests.bad_input_support import copy_digits, digit_files, predictions, query, submit

COMPARED = ("label", "pred_l1", "pred_l2", "pred_sgd", "dist_l1", "dist_l2", "prob_sgd", "error")
CAP = 4 * 1024 * 1024


def add(tf: tarfile.TarFile, name: str | bytes, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name if isinstance(name, str) else os.fsdecode(name))
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if data else None)


def scored(rows: dict, path: str) -> bool:
    return rows[path]["error"] is None and rows[path]["pred_l1"] is not None


def test_the_scan_finds_what_tarfile_finds(tmp_path, sample_dir):
    """Names (long, ustar prefix, pax, GNU), sizes, types and data offsets as tarfile reads
    them, in every format tarfile writes."""
    digit = digit_files(sample_dir, "3", 1)[0].read_bytes()
    names = ["3/a.png", "d" * 120 + "/b.png", "x/" + "é" * 80 + ".png", "c.txt"]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            for name in names if fmt != tarfile.USTAR_FORMAT else names[:2]:
                add(tf, name, digit)
            add(tf, "link.png", type=tarfile.SYMTYPE, linkname="../outside.png")
        with tarfile.open(path) as tf:
            want = [(m.name, m.size, m.offset_data, m.isreg()) for m in tf]
        fd = os.open(path, os.O_RDONLY)
        got = [(os.fsdecode(m.name), m.size, m.offset, m.kind is None)
               for m in scan_tar(FileSource(fd), lambda n, s: False, CAP)]
        os.close(fd)
        assert got == want, fmt


def test_member_names_are_escaped_as_file_names_are():
    assert member_name(b"3/a.png") == "3/a.png"
    assert member_name(b"3/\xff.png") == "3/\\xff.png"
    assert member_name("é.png".encode()) == "é.png"
    assert member_name(b"a\0b.png") == "a\\x00b.png"
    assert member_name(b"../../etc/x.png") == "../../etc/x.png"


@pytest.fixture
def tree(tmp_path, sample_dir) -> Path:
    loose = tmp_path / "loose"
    copy_digits(sample_dir, loose, per_class=6)
    return loose


def test_pack_then_submit_gives_the_loose_trees_predictions(run_cli, model_db, tree, tmp_path):
    """Bit for bit, in both send modes, scored in this process; the label is the class
    folder inside the shard."""
    shards = tmp_path / "shards"
    result = run_cli("pack", str(tree), str(shards), "--images-per-shard", "5")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in shards.iterdir()) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert submit(run_cli, tree, model_db).exit_code == 0
    loose = predictions(model_db, 1)
    result = submit(run_cli, shards, model_db, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    packed = predictions(model_db, 2)
    assert len(packed) == len(loose) == 12
    by_member = {p.split("/", 1)[1]: r for p, r in packed.items()}
    for rel, row in loose.items():
        assert {c: by_member[rel][c] for c in COMPARED} == {c: row[c] for c in COMPARED}
        assert row["label"] in ("3", "7")
    # the pack refuses to write over what exists
    again = run_cli("pack", str(tree), str(shards))
    assert again.exit_code == 2 and "never overwrites" in again.output


def test_a_webdataset_cls_member_labels_its_key(run_cli, model_db, tmp_path, sample_dir):
    digit = digit_files(sample_dir, "7", 1)[0].read_bytes()
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "train-0000.tar", "w") as tf:
        add(tf, "0421.cls", b"7\n")
        add(tf, "0421.png", digit)
        add(tf, "0422.png", digit)  # no .cls, at the archive's top: no label
        add(tf, "0422.txt", b"caption")
        add(tf, "0423.png", digit)
        add(tf, "0423.cls", b"3")  # after its image: the same key
    assert submit(run_cli, root, model_db).exit_code == 0
    rows = predictions(model_db)
    assert {p: r["label"] for p, r in rows.items()} == {
        "train-0000.tar/0421.png": "7", "train-0000.tar/0422.png": None,
        "train-0000.tar/0423.png": "3"}
    (run,) = query(model_db, "SELECT n_skipped FROM runs")
    assert run["n_skipped"] == 1  # the .txt; .cls members are labels, not skipped files
