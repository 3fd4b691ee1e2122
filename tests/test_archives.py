"""Shards in: images inside tar, tar.gz and zip archives scored like loose files, one row per
member, bad archives as rows, never a crash, a silent skip or a read outside the archive."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from core.archive_batches import archive_batches, read_recorded
from core.archives import member_name
from core.files import DirectoryWalk
from core.tar_scan import FileSource, scan_tar
from tests.support import copy_digits, digit_files, predictions, query, submit

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


def test_a_header_whose_size_walks_back_ends_the_scan_instead_of_looping(tmp_path):
    """A size field of ``-1750`` (which ``int(..., 8)`` takes) or ``1_0`` is not a size: the
    scan names the header as not valid and stops, instead of reading the same one for ever."""
    for field in (b"-1750", b"1_0", b"+17"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            add(tf, "3/a.png", b"x" * 10)
            add(tf, "3/b.png", b"y" * 10)
        raw = bytearray(buf.getvalue())
        header = raw[1024:1536]  # the second member's header
        header[124:136] = field.ljust(11, b" ") + b"\0"
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
        raw[1024:1536] = header
        path = tmp_path / "walks_back.tar"
        path.write_bytes(bytes(raw))
        fd = os.open(path, os.O_RDONLY)
        try:
            found = list(itertools.islice(scan_tar(FileSource(fd), lambda n, s: False, CAP), 10))
        finally:
            os.close(fd)
        assert [getattr(m, "name", None) for m in found[:1]] == [b"3/a.png"], field
        assert len(found) == 2 and "header is not valid" in found[1].reason, (field, found)


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


def rows_of(run_cli, model_db, root: Path, *extra: str) -> dict:
    result = submit(run_cli, root, model_db, *extra)
    assert result.exit_code == 0, result.output
    return {p: r["error"] for p, r in predictions(model_db).items()}


def packed_tar(path: Path, digits: list[bytes], fmt=tarfile.PAX_FORMAT, mode="w") -> None:
    with tarfile.open(path, mode, format=fmt) as tf:
        for i, d in enumerate(digits):
            add(tf, f"3/{i}.png", d)


@pytest.fixture
def digits(sample_dir) -> list[bytes]:
    return [p.read_bytes() for p in digit_files(sample_dir, "3", 4)]


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_truncated_archive_scores_every_whole_member_and_names_where_it_broke(
    run_cli, model_db, tmp_path, digits, suffix
):
    root = tmp_path / "root"
    root.mkdir()
    whole = tmp_path / ("whole" + suffix)
    packed_tar(whole, digits, mode="w:gz" if suffix == ".tar.gz" else "w")
    raw = whole.read_bytes()
    if suffix == ".tar.gz":  # cut the tar inside the third member's data, then compress it
        raw = gzip.compress(gzip.decompress(raw)[:512 * 2 * 2 + 512 + 100])
    else:
        raw = raw[:512 * 2 * 2 + 512 + 100]
    (root / ("cut" + suffix)).write_bytes(raw)
    rows = rows_of(run_cli, model_db, root)
    name = "cut" + suffix
    assert rows.keys() == {f"{name}/3/0.png", f"{name}/3/1.png", f"{name}/3/2.png"}
    assert rows[f"{name}/3/0.png"] is None and rows[f"{name}/3/1.png"] is None
    assert "truncated" in rows[f"{name}/3/2.png"] and "inside this member" in rows[
        f"{name}/3/2.png"]


def test_an_archive_cut_inside_a_header_gets_one_row_for_where_it_broke(
    run_cli, model_db, tmp_path, digits
):
    root = tmp_path / "root"
    root.mkdir()
    packed_tar(tmp_path / "whole.tar", digits, fmt=tarfile.USTAR_FORMAT)
    raw = (tmp_path / "whole.tar").read_bytes()
    (root / "cut.tar").write_bytes(raw[:2048 + 200])  # two whole members, half a header
    gz = gzip.compress(raw)
    (root / "gzcut.tar.gz").write_bytes(gz[:len(gz) // 2])  # the gzip stream cut
    rows = rows_of(run_cli, model_db, root)
    assert rows["cut.tar/3/0.png"] is None and rows["cut.tar/3/1.png"] is None
    assert rows["cut.tar"] == "archive is truncated at byte 2248, inside a header"
    broken = [p for p in rows if p.startswith("gzcut.tar.gz") and rows[p] is not None]
    assert len(broken) == 1, rows
    assert all(rows[p] is None for p in rows if p.startswith("gzcut") and p not in broken)


def test_each_bad_member_gets_its_own_error_row(run_cli, model_db, tmp_path, digits):
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "bad.tar", "w") as tf:
        add(tf, "3/ok.png", digits[0])
        add(tf, "3/corrupt.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        add(tf, "3/sym.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tf, "3/hard.png", type=tarfile.LNKTYPE, linkname="3/ok.png")
        add(tf, "3/dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add(tf, "3/fifo.png", type=tarfile.FIFOTYPE)
        add(tf, "3/dir.png", type=tarfile.DIRTYPE)
        add(tf, "3/dir", type=tarfile.DIRTYPE)  # a directory without an image suffix: no row
        add(tf, "3/big.png", b"\0" * (CAP + 1))
        add(tf, "3/ok.png", digits[1])  # the same name again: a row of its own
    rows = rows_of(run_cli, model_db, root)
    assert rows == {
        "bad.tar/3/ok.png": None,
        "bad.tar/3/corrupt.png": rows["bad.tar/3/corrupt.png"],
        "bad.tar/3/sym.png": "not an image file: archive member is a symbolic link",
        "bad.tar/3/hard.png": "not an image file: archive member is a hard link",
        "bad.tar/3/dev.png": "not an image file: archive member is a character device",
        "bad.tar/3/fifo.png": "not an image file: archive member is a named pipe",
        "bad.tar/3/dir.png/": "not an image file: archive member is a directory",
        "bad.tar/3/big.png": f"file is larger than {CAP} bytes",
        "bad.tar/3/ok.png (member 9)": None,
    }
    assert rows["bad.tar/3/corrupt.png"] is not None


def test_a_file_that_is_not_an_archive_gets_one_row(run_cli, model_db, tmp_path, digits):
    root = tmp_path / "root"
    root.mkdir()
    for name in ("png.tar", "png.tar.gz", "png.zip"):
        (root / name).write_bytes(b"".join(digits))  # a PNG (and more) longer than a header
    (root / "empty.tar").write_bytes(b"")
    rows = rows_of(run_cli, model_db, root)
    assert rows == {
        "png.tar": "not a tar archive: its first block is not a tar header",
        "png.tar.gz": rows["png.tar.gz"],
        "png.zip": rows["png.zip"],
        "empty.tar": "not a tar archive: it is empty",
    }
    assert "Not a gzipped file" in rows["png.tar.gz"]
    assert rows["png.zip"].startswith("not a zip archive")


def test_zip_members_are_read_and_checked(run_cli, model_db, tmp_path, digits):
    root = tmp_path / "root"
    root.mkdir()
    bomb = b"\0" * (CAP * 4)
    with zipfile.ZipFile(root / "z.zip", "w") as zf:
        zf.writestr("3/stored.png", digits[0], compress_type=zipfile.ZIP_STORED)
        zf.writestr("3/deflated.png", digits[1], compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("3/bomb.png", bomb, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("3/bad.png", digits[2], compress_type=zipfile.ZIP_STORED)
        link = zipfile.ZipInfo("3/link.png")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
        zf.writestr("3/0.cls", "3")
    raw = bytearray((root / "z.zip").read_bytes())
    at = raw.find(digits[2][:32], raw.find(b"3/bad.png") + 9)
    raw[at + 40] ^= 0xFF  # one byte of a stored member flipped: its CRC-32 no longer holds
    (root / "z.zip").write_bytes(bytes(raw))
    rows = rows_of(run_cli, model_db, root)
    assert rows == {
        "z.zip/3/stored.png": None,
        "z.zip/3/deflated.png": None,
        "z.zip/3/bomb.png": f"file is larger than {CAP} bytes",
        "z.zip/3/bad.png": "archive member is corrupt: its size or CRC-32 does not match",
        "z.zip/3/link.png": "not an image file: archive member is a symbolic link",
    }


def counting(monkeypatch, module, name: str) -> list[tuple]:
    """Record every call of ``module.name`` (its arguments), still calling it."""
    calls: list[tuple] = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def shard_tree(tmp_path: Path, digits: list[bytes], n: int = 40) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as tf:
        for i in range(n):
            add(tf, f"3/{i:03d}.png", digits[i % len(digits)])
            add(tf, f"3/{i:03d}.cls", b"3")
    with zipfile.ZipFile(root / "b.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(n):
            zf.writestr(f"7/{i:03d}.png", digits[i % len(digits)])
    return root


def test_in_paths_mode_the_producer_reads_no_image_byte_and_a_worker_opens_once_a_batch(
    monkeypatch, tmp_path, digits
):
    import core.archives
    import core.tar_scan

    root = shard_tree(tmp_path, digits)
    tar_reads = counting(monkeypatch, core.tar_scan.FileSource, "read_at")
    reads = counting(monkeypatch, core.tar_scan.os, "pread")  # the zip's local headers
    walk = DirectoryWalk(root)
    assert list(walk) == []
    batches = list(archive_batches(walk, "paths", max_images=16))
    assert [len(b.paths) for b in batches] == [16, 16, 8, 16, 16, 8]
    assert all(b.blobs == [] for b in batches)
    # every read was a tar header, a .cls member (1 byte) or a zip local header (30 bytes)
    tar_reads = [(at, n) for _source, at, n in tar_reads]
    zip_reads = [(at, n) for _fd, n, at in reads if n == 30]
    assert {n for _at, n in tar_reads} == {512, 1} and {n for _fd, n, _at in reads} == {
        512, 1, 30}
    for fmt, done in (("tar", tar_reads), ("zip", zip_reads)):
        images = [w[:2] for b in batches if b.members["format"] == fmt
                  for w in b.members["members"]]
        assert not any(o < at + n and at < o + size for at, n in done for o, size in images)
    opens = counting(monkeypatch, core.archives.os, "open")
    for b in batches:
        before = len(opens)
        got = read_recorded(str(root.resolve()), b.paths, b.members)
        # the root folder (core/below.py walks from it), then the archive, once
        assert [os.fsdecode(c[0]) for c in opens[before:]] == [str(root.resolve()),
                                                               b.members["archive"]]
        assert got.errors == [None] * len(b.paths) and got.blobs[0] in digits
        assert got.labels == (["3"] * len(b.paths) if b.members["format"] == "tar" else None)


def walked(root: Path) -> DirectoryWalk:
    walk = DirectoryWalk(root)
    assert list(walk) == []  # no loose image; the walk met the archives
    return walk


def test_resume_finds_the_same_members_and_leaves_out_those_recorded(tmp_path, digits):
    root = shard_tree(tmp_path, digits)
    first = [p for b in archive_batches(walked(root), "paths", 16) for p in b.paths]
    sent = set(first[:20]) | {first[45]}
    again = [p for b in archive_batches(walked(root), "paths", 16, sent=sent)
             for p in b.paths]
    assert again == [p for p in first if p not in sent]
    assert len(set(first)) == len(first) == 80


def test_a_zip_member_that_expands_past_its_stated_size_is_cut_at_the_cap(tmp_path):
    from core.archives import _zip_data

    bomb = zlib_deflate(b"\0" * (CAP * 3))
    where = [0, len(bomb), 100, zipfile.ZIP_DEFLATED, 0]  # its header claims 100 bytes
    assert _zip_data(bomb, where, CAP) == (None, f"file is larger than {CAP} bytes")


def zlib_deflate(data: bytes) -> bytes:
    import zlib

    pack = zlib.compressobj(9, zlib.DEFLATED, -15)
    return pack.compress(data) + pack.flush()


def test_a_worker_reads_nothing_from_a_changed_archive_or_one_outside_the_directory(
    tmp_path, digits
):
    from core.files import OUTSIDE_ROOT

    root = shard_tree(tmp_path, digits, n=4)
    (batch, *_rest) = list(archive_batches(walked(root), "paths", 16))
    real = str(root.resolve())
    assert read_recorded(real, batch.paths, batch.members).errors == [None] * 4
    with open(root / "a.tar", "ab") as f:
        f.write(bytes(512))
    changed = read_recorded(real, batch.paths, batch.members)
    assert changed.blobs == [None] * 4
    assert changed.errors[0].startswith("archive changed since it was listed")
    os.rename(root / "a.tar", tmp_path / "a.tar")
    (root / "a.tar").symlink_to(tmp_path / "a.tar")  # a link out, swapped in
    assert read_recorded(real, batch.paths, batch.members).errors == [OUTSIDE_ROOT] * 4
