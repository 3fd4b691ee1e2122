"""The index ``producer pack`` writes first in each shard (core/shard_index.py): the producer
lists a packed shard from it with a few reads and no image byte, exactly as a scan of its
headers lists it, and believes no index that disagrees with its archive."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

import core.archives
from core.archives import list_items, open_archive
from core.packing import pack_directory
from core.shard_index import INDEX_NAME, ShardIndex, index_member, read_index
from core.tar_scan import FileSource
from tests.support import copy_digits


@pytest.fixture
def shard(tmp_path, sample_dir) -> Path:
    """One shard packed from 12 digits, one with a name of 120 characters (a pax header)
    and one whose name is not UTF-8."""
    loose = tmp_path / "loose"
    copy_digits(sample_dir, loose, per_class=6)
    some = sorted((loose / "3").iterdir())
    os.rename(some[0], loose / "3" / ("d" * 116 + ".png"))
    os.rename(some[1], os.path.join(os.fsencode(loose / "3"), b"\xff.png"))
    packed = pack_directory(loose, tmp_path / "shards", 100)
    assert len(packed.shards) == 1
    return packed.shards[0]


def listed(path: Path, scan: bool = False, monkeypatch=None) -> tuple[list, int]:
    if scan:
        monkeypatch.setattr(core.archives, "read_index", lambda source, length: None)
    archive = open_archive(str(path), "tar")
    skipped = [0]
    try:
        return list(list_items(archive, "s.tar", False, skipped)), skipped[0]
    finally:
        archive.close()
        if scan:
            monkeypatch.undo()


def index_of(path: Path) -> ShardIndex | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        source = FileSource(fd)
        assert source.length is not None
        return read_index(source, source.length)
    finally:
        os.close(fd)


def test_a_packed_shard_is_listed_from_its_index_as_its_headers_list_it(shard, monkeypatch):
    with tarfile.open(shard) as tf:  # WebDataset reads past it: top-level, named __...__
        assert tf.getnames()[0] == INDEX_NAME
    assert index_of(shard) is not None
    by_index, by_scan = listed(shard), listed(shard, scan=True, monkeypatch=monkeypatch)
    assert by_index == by_scan and by_index[1] == 0  # the index member is not a skipped file
    items = by_index[0]
    assert len(items) == 12 and {i.label for i in items} == {"3", "7"}
    assert "s.tar/3/\\xff.png" in {i.path for i in items}
    assert "s.tar/3/" + "d" * 116 + ".png" in {i.path for i in items}


def test_the_index_is_read_in_a_few_reads_none_of_them_an_image_byte(shard, monkeypatch):
    reads: list[tuple[int, int]] = []
    real = FileSource.read_at

    def spy(source, offset, n):
        reads.append((offset, n))
        return real(source, offset, n)

    monkeypatch.setattr(FileSource, "read_at", spy)
    items, _ = listed(shard)
    images = [i.where for i in items]
    # the first header, the index, the end marker, the sampled members' headers
    assert len(reads) <= 8 < 2 * len(items)
    assert not any(o < at + n and at < o + size for at, n in reads for o, size in images)


def rewritten(shard: Path, out: Path, change) -> Path:
    """The shard with its index replaced by ``change(doc)``'s (its body kept)."""
    raw = shard.read_bytes()
    size = int(raw[124:136].split(b"\0", 1)[0], 8)
    start = 512 + (size + 511) // 512 * 512
    doc = json.loads(raw[512:512 + size])
    change(doc)
    data = json.dumps(doc).encode()
    info = tarfile.TarInfo(INDEX_NAME)
    info.size = len(data)
    out.write_bytes(info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512)
                    + raw[start:])
    return out


def shifted(doc):
    doc["data"][3] += 512


def resized(doc):
    doc["sizes"][5] += 1000


def swapped(doc):
    doc["names"][0], doc["names"][2] = doc["names"][2], doc["names"][0]


def dropped(doc):
    for column in ("names", "data", "sizes", "labels"):
        del doc[column][-3:-1]


def longer(doc):
    doc["body"] += 512


def outside(doc):
    doc["data"][-1] += 10**9


def renamed(doc):
    doc["names"][0] = doc["names"][1]


@pytest.mark.parametrize("change", [shifted, resized, swapped, dropped, longer, outside,
                                    renamed])
def test_a_tampered_index_is_not_believed_the_shard_is_scanned(shard, tmp_path, change,
                                                                monkeypatch):
    same = rewritten(shard, tmp_path / "same.tar", lambda doc: None)
    assert index_of(same) is not None  # the rewrite alone keeps the index good
    bad = rewritten(shard, tmp_path / "bad.tar", change)
    assert index_of(bad) is None
    assert listed(bad) == listed(bad, scan=True, monkeypatch=monkeypatch)
    assert len(listed(bad)[0]) == 12


def test_an_index_that_is_not_json_or_not_ours_is_not_believed(shard, tmp_path):
    raw = bytearray(shard.read_bytes())
    raw[512:520] = b"not json"
    (tmp_path / "garbled.tar").write_bytes(bytes(raw))
    assert index_of(tmp_path / "garbled.tar") is None
    assert index_of(rewritten(shard, tmp_path / "v2.tar",
                              lambda d: d.update(digitscore_shard_index=2))) is None


def test_a_member_appended_after_packing_is_listed_not_hidden_by_a_stale_index(
    shard, tmp_path, sample_dir, monkeypatch
):
    digit = next((sample_dir / "valid" / "3").iterdir()).read_bytes()
    with tarfile.open(shard, "a") as tf:
        info = tarfile.TarInfo("3/appended.png")
        info.size = len(digit)
        tf.addfile(info, io.BytesIO(digit))
    assert index_of(shard) is None
    items, _ = listed(shard)
    assert "s.tar/3/appended.png" in {i.path for i in items} and len(items) == 13
    assert (items, 0) == listed(shard, scan=True, monkeypatch=monkeypatch)


def test_an_index_written_for_other_bytes_is_not_believed(shard, tmp_path):
    """An index put before a body it was not made from (its columns another shard's)."""
    raw = shard.read_bytes()
    size = int(raw[124:136].split(b"\0", 1)[0], 8)
    body = raw[512 + (size + 511) // 512 * 512:]
    doc = json.loads(raw[512:512 + size])
    other = ShardIndex(doc["names"][::-1], doc["data"], doc["sizes"], doc["labels"])
    (tmp_path / "other.tar").write_bytes(index_member(other, len(body), 0) + body)
    assert index_of(tmp_path / "other.tar") is None
