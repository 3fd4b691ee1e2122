"""A fast path for the common image: a plain 8-bit grayscale PNG of the model's size.

Such a file is decoded with libspng (through ``pyspng``), about five times faster than
Pillow; every other file, and any file libspng does not decode, goes to
:func:`core.images.decode_each`, so it gets exactly the pixels or the error it gets there.

"Plain" is checked from the bytes before libspng sees them, and is deliberately narrow:

- the PNG signature, then chunks that each fit the file and whose CRC is right;
- the first chunk is an ``IHDR`` of the model's width and height, bit depth 8, colour type 0
  (grayscale), standard compression and filter method, not interlaced;
- the other chunks are ``IDAT`` and a final ``IEND``, and nothing follows ``IEND``;
- the IDAT data is one complete zlib stream (Adler-32 right, nothing after its end) that
  inflates to exactly one filter byte (0-4) and ``width`` bytes per row, for every row.

The last check costs a few microseconds (zlib inflates the stream once more) but it is what
Pillow checks and libspng does not: libspng stops reading once it has every row, so a damaged
stream whose Adler-32 is wrong would give pixels where Pillow reports the damage.

Anything else (another size, 16-bit, palette, colour, alpha, ``tRNS``, text chunks, a damaged
chunk or stream, a truncated file) is left to Pillow, and so is an image libspng rejects:
Pillow then names the reason. ``tests/test_fast_decode.py`` damages every byte of a real digit
file, with and without repairing the chunk's CRC, and compares both paths.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from core import images

try:  # a platform without a pyspng wheel still scores, through Pillow only
    import pyspng
except ImportError:  # pragma: no cover - pyspng is a dependency
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_CHUNK_HEAD = struct.Struct(">I4s")
_CRC = struct.Struct(">I")


def available() -> bool:
    """Whether the fast decoder is installed (else every image goes through Pillow)."""
    return pyspng is not None


@lru_cache(maxsize=16)
def plain_header(height: int, width: int) -> bytes:
    """The first 33 bytes of every plain PNG of this size: the signature and the whole IHDR
    chunk (8-bit grayscale, standard compression and filtering, not interlaced), CRC included."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + struct.pack(">I", 13) + ihdr + _CRC.pack(zlib.crc32(ihdr))


def plain_png_stream(data: bytes, height: int, width: int) -> bytes | None:
    """The zlib stream (IDAT data joined) of an 8-bit grayscale, non-interlaced PNG of
    ``width`` x ``height`` whose only chunks are IHDR, IDAT and a final IEND, each with a
    correct CRC; ``None`` for any other file (see the module doc)."""
    header = plain_header(height, width)
    if not data.startswith(header) or not data.endswith(_IEND):
        return None
    pos = len(header)
    end = len(data) - len(_IEND)
    parts: list[bytes] = []
    while pos < end:
        if pos + 12 > end:
            return None
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        stop = pos + 8 + length
        if kind != b"IDAT" or stop + 4 > end:
            return None
        if zlib.crc32(data[pos + 4 : stop]) != _CRC.unpack_from(data, stop)[0]:
            return None
        parts.append(data[pos + 8 : stop])
        pos = stop + 4
    if not parts or pos != end:
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def is_plain_png(data: bytes, height: int, width: int) -> bool:
    """True when :func:`decode_plain_png` hands ``data`` to libspng: a plain PNG (see
    :func:`plain_png_stream`) holding one complete zlib stream of exactly ``height`` rows of
    ``width`` pixels, each row with a valid filter byte."""
    stream = plain_png_stream(data, height, width)
    if stream is None:
        return False
    size = height * (width + 1)
    inflater = zlib.decompressobj()
    try:
        rows = inflater.decompress(stream, size + 1)  # never more than one byte too many
    except zlib.error:
        return False
    if not inflater.eof or inflater.unused_data or inflater.unconsumed_tail or len(rows) != size:
        return False
    return max(rows[:: width + 1]) <= 4


def decode_plain_png(data: bytes, height: int, width: int) -> np.ndarray | None:
    """The pixels of a plain PNG (see :func:`is_plain_png`) decoded by libspng, or ``None``
    when the file is not plain or libspng rejects it (then Pillow must decode it)."""
    if pyspng is None or not is_plain_png(data, height, width):
        return None
    try:
        pixels = pyspng.load(data)
    except Exception:  # Pillow will decode it again and name the reason
        return None
    if pixels.shape != (height, width) or pixels.dtype != np.uint8:
        return None
    return pixels


def decode_images(
    blobs: Sequence[bytes], height: int, width: int
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """:func:`core.images.decode_each` with plain PNGs decoded by libspng: the same stack,
    indices and errors, faster. Every other image is decoded by ``core.images``."""
    n = len(blobs)
    stack = np.empty((n, height, width), dtype=np.uint8)
    decoded = np.zeros(n, dtype=bool)
    slow: list[int] = []
    for i, data in enumerate(blobs):
        pixels = decode_plain_png(data, height, width) if data else None
        if pixels is None:
            slow.append(i)
            continue
        stack[i] = pixels
        decoded[i] = True
    errors: dict[int, str] = {}
    if slow:
        slow_stack, slow_ok, slow_errors = images.decode_each(
            [blobs[i] for i in slow], height, width
        )
        for k, j in enumerate(slow_ok):
            stack[slow[j]] = slow_stack[k]
            decoded[slow[j]] = True
        errors = {slow[j]: reason for j, reason in slow_errors.items()}
    ok = np.flatnonzero(decoded)
    if len(ok) == n:
        return stack, list(range(n)), errors
    return stack[ok], ok.tolist(), errors
