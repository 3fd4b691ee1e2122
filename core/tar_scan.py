"""Scanning a tar archive's headers without reading its members' data.

Python's ``tarfile`` builds a ``TarInfo`` per member and reads through a file object, which
costs more per member than listing a loose file; a shard holds thousands of small images, so
the headers are parsed here from one 512-byte read each, at the offsets the headers
themselves give. Only what scoring needs is read: the name (ustar prefix, GNU long names and
pax ``path`` records included), the size (octal or base-256, pax ``size`` too), the type and
the checksum. ``tarfile`` stays the writer (``producer pack``) and the reference the tests
compare with.

A member's data is at a fixed offset in the archive, so a reader can ``pread`` it later; a
compressed tar is read through a forward-only stream (:class:`StreamSource`), in one pass.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
#: The checksum field read as eight spaces, as the checksum is computed.
_BLANK_CHECKSUM = b" " * 8
#: Types of member that are a regular file's data.
_REGULAR = (b"0", b"\0", b"7")
#: Types of member that are something else, as an error row names them.
_OTHER_KINDS = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a named pipe",
    b"S": "a sparse file",
}
#: Header members that describe the next member (GNU long name and link, pax records).
_LONG_NAME, _LONG_LINK, _PAX, _GLOBAL_PAX = b"L", b"K", b"x", b"g"
#: The most bytes of a long name or a pax header read (anything larger breaks the archive).
MAX_META_BYTES = 1 << 16


class Source(Protocol):
    """Reads of an archive's bytes at offsets, in increasing order for a stream."""

    length: int | None

    def read_at(self, offset: int, n: int) -> bytes: ...


class FileSource:
    """An uncompressed archive: any offset, read with ``pread`` (not through a memory map:
    a file truncated while mapped would kill the process with SIGBUS)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.length: int | None = os.fstat(fd).st_size

    def read_at(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)


class StreamSource:
    """A compressed tar, read forward only: a seek decompresses what it passes over, so each
    offset asked must be at or after the last one read. ``length`` is known once the end
    of the stream has been met."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.length: int | None = None

    def read_at(self, offset: int, n: int) -> bytes:
        try:
            return self._read_at(offset, n)
        except (OSError, EOFError, zlib.error):
            self.length = self.stream.tell()  # what was expanded before the stream broke
            raise

    def _read_at(self, offset: int, n: int) -> bytes:
        self.stream.seek(offset)
        at = self.stream.tell()
        if at < offset:
            self.length = at
            return b""
        data = self.stream.read(n)
        if len(data) < n:
            self.length = offset + len(data)
        return data


@dataclass
class TarMember:
    """One member as its header describes it; ``data`` only when it was asked for."""

    name: bytes
    index: int
    kind: str | None  # None: a regular file's data; else what the member is instead
    offset: int  # where its data starts in the (uncompressed) archive
    size: int
    data: bytes | None = None


@dataclass
class TarBreak:
    """Where the archive stops being readable, and why; ``member`` is the member the break
    falls inside (its data cut short), if any."""

    offset: int
    reason: str
    member: TarMember | None = None


#: Whether to read a member's data as the scan passes it: (name, size) -> bool.
Wanted = Callable[[bytes, int], bool]


def scan_tar(source: Source, wanted: Wanted, max_bytes: int) -> Iterator[TarMember | TarBreak]:
    """Every member of the archive in order, ending with a :class:`TarBreak` if it is not
    read to its end marker. A member is yielded only once the next header has been read
    (so its data is known to be whole); ``wanted`` members of at most ``max_bytes`` are read
    on the way, so a stream is read once."""
    pending: TarMember | None = None
    for item in _headers(source, wanted, max_bytes):
        if isinstance(item, TarBreak):
            if pending is not None and _cut(pending, item.offset, source.length):
                end = item.offset if source.length is None else source.length
                item.member = pending
                item.reason = f"archive is truncated at byte {end}, inside this member's data"
            elif pending is not None:
                yield pending
            yield item
            return
        if pending is not None:
            yield pending
        pending = item
    if pending is not None:
        yield pending


def _cut(member: TarMember, offset: int, length: int | None) -> bool:
    end = member.offset + member.size
    return offset < end or (length is not None and length < end)


def member_at(source: Source, offset: int) -> TarMember | None:
    """The member whose headers start at ``offset`` (its pax or GNU long-name header, if it
    has one, then its own), read without its data; ``None`` if no valid header is there."""
    for item in _headers(source, lambda name, size: False, 0, offset):
        return item if isinstance(item, TarMember) else None
    return None


def _headers(
    source: Source, wanted: Wanted, max_bytes: int, offset: int = 0,
) -> Iterator[TarMember | TarBreak]:
    index = 0
    name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    while True:
        try:
            header = source.read_at(offset, BLOCK)
        except (OSError, EOFError, zlib.error) as e:
            yield TarBreak(offset, f"archive cannot be read past byte {offset}: {e}")
            return
        if len(header) < BLOCK or header == _ZERO_BLOCK:
            if len(header) < BLOCK:
                yield _short_break(offset, len(header))
            return
        fields = parse_header(header)
        if fields is None:
            yield TarBreak(offset, "not a tar archive: its first block is not a tar header"
                           if offset == 0 else
                           f"archive is corrupt at byte {offset}: that header is not valid")
            return
        kind, size = fields
        size = int(pax.get(b"size", size)) if pax.get(b"size", b"").isdigit() else size
        data_at = offset + BLOCK
        following = data_at + (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (_LONG_NAME, _LONG_LINK, _PAX, _GLOBAL_PAX):
            meta = _read_meta(source, data_at, size)
            if isinstance(meta, str):
                yield TarBreak(offset, meta)
                return
            if kind == _LONG_NAME:
                name = meta.split(b"\0", 1)[0]
            elif kind == _PAX:
                pax = _pax_records(meta)
            offset = following
            continue
        member = TarMember(
            pax.get(b"path", name if name is not None else _name(header)), index,
            None if kind in _REGULAR else _OTHER_KINDS.get(kind, f"a member of type {kind!r}"),
            data_at, size,
        )
        if source.length is not None and data_at + size > source.length:
            yield member
            yield TarBreak(source.length, "truncated")
            return
        if member.kind is None and size <= max_bytes and wanted(member.name, size):
            try:
                member.data = source.read_at(data_at, size)
            except (OSError, EOFError, zlib.error) as e:
                yield member
                yield TarBreak(data_at, f"archive cannot be read past byte {data_at}: {e}")
                return
            if len(member.data) < size:
                yield member
                yield TarBreak(data_at + len(member.data), "truncated")
                return
        elif source.length is None and size > max_bytes:
            yield member
            yield TarBreak(following, f"a compressed archive is not expanded past a member larger "
                                   f"than {max_bytes} bytes (this one is {size})")
            return
        yield member
        index, name, pax, offset = index + 1, None, {}, following


def _short_break(offset: int, got: int) -> TarBreak:
    if offset == 0:
        return TarBreak(0, "not a tar archive: " + ("it is empty" if got == 0 else
                                                     "it is shorter than one tar header"))
    if got == 0:
        return TarBreak(offset, f"archive is truncated at byte {offset}: it ends there without "
                                "the end-of-archive marker")
    return TarBreak(offset, f"archive is truncated at byte {offset + got}, inside a header")


def parse_header(header: bytes) -> tuple[bytes, int] | None:
    """The header's type and size, or ``None`` when its checksum or size field is not valid."""
    field = header[148:156]
    try:
        stored = int(field.split(b"\0", 1)[0] or b"-1", 8)
    except ValueError:
        return None
    # Adler-32's low half is 1 + the sum of the bytes modulo 65521, so the tar checksum (that
    # sum with the checksum field read as eight spaces) is one C call, not a Python loop.
    if (zlib.adler32(header) & 0xFFFF) != (stored + 1 - 256 + sum(field)) % 65521 and (
        stored != _signed_sum(header[:148] + _BLANK_CHECKSUM + header[156:])
    ):
        return None
    size = _number(header[124:136])
    if size is None:
        return None
    return header[156:157], size


def _signed_sum(blanked: bytes) -> int:
    """The checksum as some old tars computed it, with bytes read as signed."""
    return sum(b - 256 if b > 127 else b for b in blanked)


def _number(field: bytes) -> int | None:
    """An octal number field, or GNU's base-256 form (first byte's high bit set)."""
    if field[0] & 0x80:
        if field[0] & 0x40:  # negative
            return None
        return int.from_bytes(bytes([field[0] & 0x3F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if not text.isdigit():  # int() would also take a sign or underscores: "-1750" walks back
        return 0 if not text else None
    try:
        return int(text, 8)
    except ValueError:  # an 8 or a 9
        return None


def _name(header: bytes) -> bytes:
    """The member's name from a ustar header: its prefix field, if any, joined to its name."""
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar (GNU's magic has no prefix field)
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            return prefix + b"/" + name
    return name


def _read_meta(source: Source, offset: int, size: int) -> bytes | str:
    if size > MAX_META_BYTES:
        return f"archive has a {size}-byte extended header at byte {offset - BLOCK}: not read"
    try:
        data = source.read_at(offset, size)
    except (OSError, EOFError, zlib.error) as e:
        return f"archive cannot be read past byte {offset}: {e}"
    if len(data) < size:
        return f"archive is truncated at byte {offset + len(data)}, inside an extended header"
    return data


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """A pax extended header's ``length key=value\\n`` records (malformed ones ignored)."""
    records: dict[bytes, bytes] = {}
    at = 0
    while at < len(data):
        space = data.find(b" ", at)
        if space < 0:
            break
        try:
            length = int(data[at:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[space + 1:at + length - 1].partition(b"=")
        records[key] = value
        at += length
    return records
