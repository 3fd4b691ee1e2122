"""A shard's index: the first member of a tar written by ``producer pack``, saying where every
other member is, so that the producer lists a shard with a few reads instead of one read per
tar header (core/tar_scan.py), and reads none of its images.

The member is called ``__digitscore_index__``: WebDataset readers skip a top-level member whose
name starts and ends with ``__``, so a packed shard stays a plain WebDataset shard. Its data is
JSON, one column per field, a row per member after it, in the archive's order::

    {"digitscore_shard_index": 1, "body": B,
     "names": [...], "data": [...], "sizes": [...], "labels": [...]}

``names`` are the members' names (bytes that are not UTF-8 as lone surrogates, as
``surrogateescape`` decodes them), ``data`` where each one's data starts and ``sizes`` how long
it is, ``labels`` the class name an image takes from its key's ``.cls`` member (else null).
Offsets count from the end of the index member (the "body", ``B`` bytes long), so that the
index does not depend on its own length. A member's headers start where the previous member's
data ends, rounded up to a block, and the end-of-archive marker where the last one's does.

The producer takes an index only when it agrees with the archive, and scans the archive
otherwise (a tar that another tool wrote or changed since): the archive is as long as the index
says; the members tile the body, each starting where the one before ends, so no member can
hide between two; the end-of-archive marker is where the index puts it (a member appended with
``tar -r`` overwrites it even when the length stays the same); no name is repeated; and the
headers of a sample of members (every :data:`SAMPLE_EVERY`-th and the last) give the same name,
size and type. Every header is not read: an index forged to pass these checks can list the
archive's bytes under other names, as a forged archive can anyway. It can never make anything
outside the archive read, nor more than a member's size.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Any

from core.tar_scan import BLOCK, Source, member_at, parse_header

INDEX_NAME = "__digitscore_index__"
VERSION = 1
#: The largest index read (an index costs about 40 bytes a member).
MAX_INDEX_BYTES = 64 * 1024 * 1024
#: One member in this many has its headers read to check the index.
SAMPLE_EVERY = 64
_END_MARKER = bytes(2 * BLOCK)


@dataclass
class ShardIndex:
    """An index's columns, ``data`` as offsets in the whole archive."""

    names: list[str]
    data: list[int]
    sizes: list[int]
    labels: list[str | None]


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def index_member(columns: ShardIndex, body: int, mtime: int) -> bytes:
    """The index member's header and data, padded to a block: what ``pack`` writes before the
    ``body`` bytes of a tar whose members ``columns`` lists (offsets in that tar)."""
    doc = {"digitscore_shard_index": VERSION, "body": body, "names": columns.names,
           "data": columns.data, "sizes": columns.sizes, "labels": columns.labels}
    data = json.dumps(doc, separators=(",", ":")).encode("ascii")
    info = tarfile.TarInfo(INDEX_NAME)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    if len(header) != BLOCK:
        raise AssertionError("the index member's header is one block")
    return header + data + bytes(_padded(len(data)) - len(data))


def read_index(source: Source, length: int) -> ShardIndex | None:
    """The archive's index if its first member is one and it agrees with the archive (see
    the module's docstring), else ``None``: the archive is to be scanned."""
    first = source.read_at(0, BLOCK)
    if len(first) < BLOCK or first[:len(INDEX_NAME) + 1] != INDEX_NAME.encode() + b"\0":
        return None
    fields = parse_header(first)
    if fields is None or fields[0] not in (b"0", b"\0") or not 0 < fields[1] <= MAX_INDEX_BYTES:
        return None
    raw = source.read_at(BLOCK, fields[1])
    if len(raw) < fields[1]:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return _agreeing(doc, source, BLOCK + _padded(fields[1]), length)


def _agreeing(doc: Any, source: Source, start: int, length: int) -> ShardIndex | None:
    index = _columns(doc, length - start)
    if index is None:
        return None
    ends = [d + _padded(s) for d, s in zip(index.data, index.sizes, strict=True)]
    heads = [0, *ends[:-1]]
    end = ends[-1] if ends else 0
    if (any(d - h < BLOCK or d % BLOCK for d, h in zip(index.data, heads, strict=True))
            or any(s < 0 for s in index.sizes) or end + len(_END_MARKER) > length - start
            or source.read_at(start + end, len(_END_MARKER)) != _END_MARKER):
        return None
    sample = sorted({*range(0, len(heads), SAMPLE_EVERY), len(heads) - 1} - {-1})
    for i in sample:
        m = member_at(source, start + heads[i])
        if (m is None or m.kind is not None or m.size != index.sizes[i]
                or m.offset != start + index.data[i]
                or m.name.decode("utf-8", "surrogateescape") != index.names[i]):
            return None
    index.data = [start + d for d in index.data]
    return index


def _columns(doc: Any, body: int) -> ShardIndex | None:
    """The index's columns if they have the shape and types of version 1 and it says the body
    is ``body`` bytes, else ``None``."""
    if not isinstance(doc, dict) or doc.get("digitscore_shard_index") != VERSION:
        return None
    columns: list[Any] = [doc.get(k) for k in ("names", "data", "sizes", "labels")]
    if (doc.get("body") != body or not all(isinstance(c, list) for c in columns)
            or len({len(c) for c in columns}) != 1):
        return None
    names, data, sizes, labels = columns
    if (not set(map(type, names)) <= {str} or not set(map(type, data)) <= {int}
            or not set(map(type, sizes)) <= {int} or not set(map(type, labels)) <= {str, type(None)}
            or len(set(names)) != len(names)):
        return None
    return ShardIndex(names, data, sizes, labels)
