"""Images inside tar and zip archives (shards): listing an archive's members as rows to be,
cutting them into batches of one archive each, and reading a batch's members back from
where its record says they are.

A member is stored as ``ARCHIVE/MEMBER``: the archive's relative path as the walk spells it,
``/``, and the member's name from its header, escaped by :func:`member_name`. A name seen
earlier in the same archive (tar allows repeats) gets `` (member N)`` appended, N its
position in the archive from 0, so every member has a row of its own.

A member's name is data: nothing is ever opened, created or extracted by it. A batch's
record (``batches.members``) names one archive and, for each of its members in order, where
its bytes are in that archive (tar: data offset and size; zip: data offset, compressed size,
size, method, CRC-32) or the reason it has no bytes; a reader opens the archive once and
reads those ranges, never listing it again. A WebDataset ``.cls`` member gives the class
name of the images that share its key (``0421.png`` and ``0421.cls``, adjacent).
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from core import defaults
from core.files import is_image_name, safe_name
from core.shard_index import INDEX_NAME, ShardIndex, read_index
from core.tar_scan import FileSource, Source, StreamSource, TarBreak, TarMember, scan_tar

#: Archive name endings and their formats (the longest ending first).
FORMATS = ((".tar.gz", "tar.gz"), (".tgz", "tar.gz"), (".tar", "tar"), (".zip", "zip"))
#: Two ranges of one batch closer than this are read with one ``pread`` (bytes).
READ_GAP = 64 * 1024
#: The longest range read with one ``pread`` (bytes).
READ_SPAN = 16 * 1024 * 1024
#: The most bytes of a ``.cls`` member read (a class name).
MAX_CLASS_BYTES = 1024
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
# WebDataset's split of a member name into its key and its extensions: the extensions start
# at the first dot of the last component.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$", re.DOTALL)
_ZIP_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
}


def archive_format(name: str) -> str | None:
    """``"tar"``, ``"tar.gz"`` or ``"zip"`` by the name's ending (any case), else ``None``."""
    lower = name.lower()
    for ending, fmt in FORMATS:
        if lower.endswith(ending) and len(name) > len(ending):
            return fmt
    return None


def member_name(raw: bytes) -> str:
    """A member's name as stored: UTF-8 text, bytes that are not UTF-8 as ``\\xNN`` (as
    :func:`core.files.safe_name` writes file names) and NUL as ``\\x00``."""
    return _escaped(raw.decode("utf-8", "surrogateescape"))


def _escaped(text: str) -> str:
    """:func:`member_name` of a name decoded with ``surrogateescape``."""
    return safe_name(text).replace("\0", "\\x00")


@dataclass
class Item:
    """One row to be: its stored path, and where its bytes are (a record entry) or the
    reason it has none; ``data`` when they were read while listing."""

    path: str
    where: list[int] | str
    data: bytes | None = None
    label: str | None = None


@dataclass
class _Entry:
    """A member as listed, before it becomes an :class:`Item` (or is skipped); ``text`` is
    its name decoded (``surrogateescape``), once."""

    name: bytes
    index: int
    kind: str | None
    size: int
    where: list[int] | str
    data: bytes | None = None
    text: str = ""
    is_class: bool = False

    def __post_init__(self) -> None:
        self.text = self.name.decode("utf-8", "surrogateescape")
        self.is_class = self.text[-4:].lower() == ".cls"


@dataclass
class Archive:
    """An archive opened once: its descriptor, format and size."""

    fd: int
    fmt: str
    size: int
    source: Source | None = None

    def close(self) -> None:
        os.close(self.fd)


def open_archive(path: str, fmt: str, flags: int = 0) -> Archive:
    """The archive at ``path``, opened (``OSError`` if it cannot be, or is not a file)."""
    return archive_of(os.open(path, OPEN_FLAGS | flags), fmt)


def archive_of(fd: int, fmt: str) -> Archive:
    """The archive open as ``fd`` (closed, and ``OSError``, if it is not a file)."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
    except OSError:
        os.close(fd)
        raise
    return Archive(fd, fmt, st.st_size)


def _stream(archive: Archive) -> StreamSource:
    return StreamSource(gzip.GzipFile(fileobj=open(archive.fd, "rb", closefd=False)))


def list_items(
    archive: Archive, rel: str, read_images: bool, skipped: list[int],
    max_bytes: int = defaults.MAX_FILE_BYTES,
) -> Iterator[Item]:
    """The rows of the archive ``rel``, in its order: an image member's bytes read only when
    ``read_images`` and the archive is a stream (a compressed tar, read once); non-image
    members are counted in ``skipped[0]``. A plain tar with an index that agrees with it
    (core/shard_index.py) is listed from its index, any other one by reading its headers."""
    if archive.fmt == "tar":
        indexed = _indexed_items(FileSource(archive.fd), rel, skipped, max_bytes)
        if indexed is not None:
            yield from indexed
            return
    if archive.fmt == "zip":
        entries = _zip_entries(archive, max_bytes)
    else:
        source = FileSource(archive.fd) if archive.fmt == "tar" else _stream(archive)
        entries = _tar_entries(source, read_images and archive.fmt == "tar.gz", max_bytes)
    seen: set[str] = set()
    for group in _grouped(entries):
        label = _class_name(group)
        for entry in group:
            item = _item(entry, rel, seen, max_bytes)
            if item is None:
                skipped[0] += 0 if _is_class_member(entry) or _is_index(entry) else 1
            else:
                item.label = label
                yield item


def _indexed_items(source: FileSource, rel: str, skipped: list[int], max_bytes: int,
                   ) -> list[Item] | None:
    """The rows the archive's index lists (the rows a scan gives), or ``None`` when it has
    no index that agrees with it, or two of its names are stored alike."""
    assert source.length is not None
    index = read_index(source, source.length)
    if index is None:
        return None
    items: list[Item] = []
    too_large = f"file is larger than {max_bytes} bytes"
    for name, offset, size, label in zip(
        index.names, index.data, index.sizes, index.labels, strict=True
    ):
        if name[-4:].lower() == ".cls":
            continue
        stored = _escaped(name)
        if not is_image_name(_base(stored)):
            skipped[0] += 1
            continue
        path = f"{rel}/{stored}"
        items.append(Item(path, [offset, size] if size <= max_bytes else too_large,
                          None, label))
    if len({item.path for item in items}) != len(items):
        return None
    return items


def shard_columns(source: FileSource) -> ShardIndex:
    """What a tar's index says of it (``producer pack`` writes one), from a scan: every
    member's name, data offset and size, and the class name an image takes from its
    ``.cls`` member, as :func:`list_items` finds them (``ValueError`` for a tar that is not
    whole)."""
    columns = ShardIndex([], [], [], [])
    for group in _grouped(_tar_entries(source, False, defaults.MAX_FILE_BYTES)):
        label = _class_name(group)
        for entry in group:
            if isinstance(entry, _Break) or isinstance(entry.where, str) or entry.kind:
                raise ValueError("a shard being indexed is not a whole tar of files")
            columns.names.append(entry.text)
            columns.data.append(entry.where[0])
            columns.sizes.append(entry.size)
            image = not entry.is_class and is_image_name(_base(_escaped(entry.text)))
            columns.labels.append(label if image else None)
    return columns


def _tar_entries(source: Source, read_images: bool, max_bytes: int) -> Iterator[_Entry | _Break]:
    def wanted(name: bytes, size: int) -> bool:
        text = name.decode("utf-8", "surrogateescape")
        return text.lower().endswith(".cls") or (read_images and is_image_name(_base(text)))

    for m in scan_tar(source, wanted, max_bytes):
        if isinstance(m, TarMember):
            yield _Entry(m.name, m.index, m.kind, m.size, [m.offset, m.size], m.data)
        else:
            yield _broken(m)


@dataclass
class _Break:
    """Where an archive stops being readable; ``member`` the one it breaks inside."""

    reason: str
    member: _Entry | None = None


def _broken(b: TarBreak) -> _Break:
    m = b.member
    return _Break(b.reason, None if m is None else _Entry(m.name, m.index, m.kind, m.size, ""))


def _zip_entries(archive: Archive, max_bytes: int) -> Iterator[_Entry | _Break]:
    try:
        with open(archive.fd, "rb", closefd=False) as f, zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    except Exception as e:  # noqa: BLE001 - whatever zipfile says of a bad archive is its row
        yield _Break(f"not a zip archive, or a truncated one (no list of members at its "
                       f"end): {type(e).__name__}: {e}")
        return
    for index, info in enumerate(infos):
        raw = info.orig_filename.encode(
            "utf-8" if info.flag_bits & 0x800 else "cp437", "surrogateescape")
        kind = _ZIP_KINDS.get(stat.S_IFMT(info.external_attr >> 16))
        if kind is None and info.filename.endswith("/"):
            kind = "a directory"
        entry = _Entry(raw, index, kind, info.file_size, "")
        text = raw.decode("utf-8", "surrogateescape")
        if kind is None and (is_image_name(_base(text)) or text.lower().endswith(".cls")):
            entry.where = _zip_where(archive.fd, info, max_bytes)
            if text.lower().endswith(".cls") and not isinstance(entry.where, str):
                entry.data = read_where(archive, [entry.where], max_bytes)[0][0]
        yield entry


def _zip_where(fd: int, info: zipfile.ZipInfo, max_bytes: int) -> list[int] | str:
    """Where a zip member's data is: its local header read for the length of its name and
    extra field, which may differ from the central directory's."""
    if info.flag_bits & 0x1:
        return "archive member is encrypted: it is not read"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return (f"archive member is compressed with method {info.compress_type}: only "
                "stored and deflated members are read")
    if info.file_size > max_bytes or info.compress_size > max_bytes + max_bytes // 100 + 1024:
        return f"file is larger than {max_bytes} bytes"
    header = os.pread(fd, 30, info.header_offset)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        return f"archive member is corrupt: no local header at byte {info.header_offset}"
    n, m = struct.unpack("<HH", header[26:30])
    return [info.header_offset + 30 + n + m, info.compress_size, info.file_size,
            info.compress_type, info.CRC]


def _base(name: str) -> str:
    return name.rstrip("/").rpartition("/")[2]


def _grouped(entries: Iterator[_Entry | _Break]) -> Iterator[list[_Entry | _Break]]:
    """Consecutive members that share a WebDataset key, as groups (a member without a key,
    or a break, alone)."""
    group: list[_Entry | _Break] = []
    key: str | None = None
    for entry in entries:
        if isinstance(entry, _Break):
            if group:
                yield group
            group, key = [], None
            yield [entry]
            continue
        k = _key(entry.text)
        if group and (k is None or k != key):
            yield group
            group = []
        group.append(entry)
        key = k
    if group:
        yield group


def _key(name: str) -> str | None:
    match = _KEY.match(name)
    return match.group(1) if match else None


def _is_class_member(entry: _Entry | _Break) -> bool:
    return isinstance(entry, _Entry) and entry.is_class


def _is_index(entry: _Entry | _Break) -> bool:
    """Whether the entry is the index ``producer pack`` writes first (not an image, and
    not a file the user put there either: not counted as skipped)."""
    return isinstance(entry, _Entry) and entry.index == 0 and entry.text == INDEX_NAME


def _class_name(group: list[_Entry | _Break]) -> str | None:
    """The text of the group's ``.cls`` member (read while listing), if it has one."""
    for entry in group:
        if _is_class_member(entry) and isinstance(entry, _Entry) and entry.data is not None:
            return class_text(entry.data)
    return None


def class_text(data: bytes) -> str | None:
    """The class name a ``.cls`` member's bytes give (``None`` if blank)."""
    return data[:MAX_CLASS_BYTES].decode("utf-8", "replace").strip() or None


def _item(entry: _Entry | _Break, rel: str, seen: set[str], max_bytes: int) -> Item | None:
    """The row an entry becomes, or ``None`` for a member that is not an image by name."""
    if isinstance(entry, _Break):  # the member it is inside if an image, or the archive
        m = entry.member
        if m is None:
            return Item(rel, entry.reason)
        name = member_name(m.name)
        if is_image_name(_base(name)):
            return Item(_unique(rel, name, m.index, seen), entry.reason)
        return Item(rel, f"{entry.reason} ({name!r})")
    if entry.is_class:
        return None
    name = _escaped(entry.text)
    if not is_image_name(_base(name)):
        return None
    path = _unique(rel, name, entry.index, seen)
    if entry.kind is not None:
        return Item(path, f"not an image file: archive member is {entry.kind}")
    if entry.size > max_bytes:
        return Item(path, f"file is larger than {max_bytes} bytes")
    return Item(path, entry.where, entry.data)


def _unique(rel: str, name: str, index: int | None, seen: set[str]) -> str:
    path = f"{rel}/{name}"
    if path in seen:
        path += f" (member {index})"
    seen.add(path)
    return path


def read_where(archive: Archive, wheres: list[Any], max_bytes: int = defaults.MAX_FILE_BYTES,
               ) -> list[tuple[bytes | None, str | None]]:
    """The bytes of each recorded member (or why not), reading nearby members with one
    ``pread`` each; a compressed tar is read forward once, to the last member asked."""
    out: list[tuple[bytes | None, str | None]] = [
        (None, w) if isinstance(w, str) else (None, None) for w in wheres]
    located = sorted((w[0], i) for i, w in enumerate(wheres) if not isinstance(w, str))
    if archive.fmt == "tar.gz":
        source = archive.source or _stream(archive)
        archive.source = source
        for offset, i in located:
            out[i] = _checked(_read_stream(source, offset, wheres[i][1]), wheres[i][1])
        return out
    zipped = archive.fmt == "zip"
    for start, end, members in _spans(located, wheres):
        try:
            buf = memoryview(os.pread(archive.fd, end - start, start))
        except OSError as e:
            for i in members:
                out[i] = (None, f"archive could not be read: {e.strerror}")
            continue
        for i in members:
            offset, length = wheres[i][0] - start, wheres[i][1]
            data = bytes(buf[offset:offset + length])
            out[i] = _zip_data(data, wheres[i], max_bytes) if zipped else _checked(data, length)
    return out


def read_dense(archive: Archive, wheres: list[Any]) -> list[bytes] | None:
    """The common batch of a plain tar, every member located, in order and close together:
    its bytes with one ``pread`` and a slice each; ``None`` for anything else (then
    :func:`read_where` answers, member by member)."""
    if archive.fmt != "tar" or not wheres or any(isinstance(w, str) for w in wheres):
        return None
    start, end = wheres[0][0], wheres[-1][0] + wheres[-1][1]
    if end - start > READ_SPAN or any(
        not 0 <= b[0] - a[0] - a[1] <= READ_GAP
        for a, b in zip(wheres, wheres[1:], strict=False)
    ):
        return None
    try:
        buf = os.pread(archive.fd, end - start, start)
    except OSError:
        return None
    if len(buf) != end - start:
        return None
    return [buf[offset - start:offset - start + size] for offset, size in wheres]


def _spans(located: list[tuple[int, int]], wheres: list[Any]
           ) -> Iterator[tuple[int, int, list[int]]]:
    """Ranges (start, end, member indices) covering the located members in offset order."""
    members: list[int] = []
    start = end = 0
    for offset, i in located:
        stop = offset + wheres[i][1]
        if members and (offset - end > READ_GAP or stop - start > READ_SPAN):
            yield start, end, members
            members = []
        if not members:
            start = offset
        members.append(i)
        end = max(end, stop) if len(members) > 1 else stop
    if members:
        yield start, end, members


def _read_stream(source: Source, offset: int, size: int) -> bytes | str:
    try:
        return source.read_at(offset, size)
    except (OSError, EOFError, zlib.error) as e:
        return f"archive could not be read: {type(e).__name__}: {e}"


def _checked(data: bytes | str, size: int) -> tuple[bytes | None, str | None]:
    if isinstance(data, str):
        return None, data
    if len(data) < size:
        return None, "archive is shorter than when it was listed: this member is cut short"
    return data, None


def _zip_data(raw: bytes, where: list[int], max_bytes: int) -> tuple[bytes | None, str | None]:
    """A zip member's bytes from its compressed data, inflating no more than ``max_bytes``
    and one (so a member that expands without end costs no more), checked by size and
    CRC-32."""
    _, compressed, size, method, crc = where
    if len(raw) < compressed:
        return None, "archive is shorter than when it was listed: this member is cut short"
    data = raw
    if method == zipfile.ZIP_DEFLATED:
        inflate = zlib.decompressobj(-15)
        try:
            data = inflate.decompress(raw, max_bytes + 1)
        except zlib.error as e:
            return None, f"archive member is corrupt: {e}"
        if len(data) > max_bytes:
            return None, f"file is larger than {max_bytes} bytes"
        if not inflate.eof:
            return None, "archive member is corrupt: its compressed data ends early"
    if len(data) != size or zlib.crc32(data) != crc:
        return None, "archive member is corrupt: its size or CRC-32 does not match"
    return data, None
