"""A fast path for the common image: a plain 8-bit grayscale PNG of the model's size.

Such a file is inflated once, by zlib-ng (a fork of zlib with zlib's API and stream format
whose inflate is faster on these small streams: docs/performance.md), and the rows of every
such file of a batch are unfiltered together, a few hundred at a time by Pillow's C code; every
other file goes to :func:`core.images.decode_each`, so it gets exactly the pixels or the error
it gets there.

"Plain" is checked from the bytes, and is deliberately narrow:

- the file starts with the PNG signature and the one ``IHDR`` chunk of a plain PNG of the
  model's width and height (bit depth 8, colour type 0, standard compression and filtering,
  not interlaced), byte for byte, its CRC included: comparing the bytes checks that CRC;
- then only ``IDAT`` chunks that fit the file, then the standard ``IEND`` chunk, byte for
  byte, and nothing after it;
- the IDAT data is one complete zlib stream (zlib checks its Adler-32 as it inflates; nothing
  may follow its end) that inflates to exactly ``height`` rows of one filter byte (0-4) and
  ``width`` pixels.

The IDAT chunks' CRCs are not checked, because Pillow does not check them either (it skips
them as it reads the image data): the Adler-32 is what tells a damaged stream, and a file whose
only damage is an IDAT CRC gets Pillow's pixels on both paths.

Anything else (another size, 16-bit, palette, colour, alpha, interlaced, ``tRNS``, text
chunks, a damaged chunk or stream, a truncated file) is left to Pillow, which then names the
reason. ``tests/test_fast_decode.py`` damages every byte of a real digit file, with and
without repairing the chunk's CRC, forces every filter type, and compares both paths.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image
from zlib_ng import zlib_ng

from core import images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_CHUNK_HEAD = struct.Struct(">I4s")
_CRC = struct.Struct(">I")
_PAETH = 4  #: the highest PNG filter type
#: zlib-ng's exception class (its type stub declares an instance)
_INFLATE_ERROR: type[Exception] = zlib_ng.error  # type: ignore[assignment]


@lru_cache(maxsize=16)
def plain_header(height: int, width: int) -> bytes:
    """The first 33 bytes of every plain PNG of this size: the signature and the whole IHDR
    chunk (8-bit grayscale, standard compression and filtering, not interlaced), CRC included."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + struct.pack(">I", 13) + ihdr + _CRC.pack(zlib.crc32(ihdr))


def filtered_rows(data: bytes, height: int, width: int) -> bytes | None:
    """The inflated IDAT data of a plain PNG: ``height`` rows of a filter byte and ``width``
    filtered pixels, inflated once; ``None`` for any file that is not plain (see the module
    doc) but for its filter bytes, which :func:`decode_images` checks for the whole batch."""
    header = plain_header(height, width)
    if not data.startswith(header) or not data.endswith(_IEND):
        return None
    size = height * (width + 1)
    start, end = len(header), len(data) - len(_IEND)
    inflater = zlib_ng.decompressobj()
    if end - start >= 12:
        length, kind = _CHUNK_HEAD.unpack_from(data, start)
        if kind == b"IDAT" and start + 12 + length == end:  # one IDAT chunk, as most encoders
            try:  # never more than one byte too many: a stream that inflates further is not plain
                rows = inflater.decompress(data[start + 8 : end - 4], size + 1)
            except _INFLATE_ERROR:
                return None
            if inflater.eof and not inflater.unused_data and len(rows) == size:
                return rows
            return None
    return _inflate_chunks(data, start, end, inflater, size)


def _inflate_chunks(
    data: bytes, pos: int, end: int, inflater: zlib_ng._Decompress, size: int
) -> bytes | None:
    """:func:`filtered_rows` of IDAT data in any number of chunks (``data[pos:end]``)."""
    view = memoryview(data)
    rows = b""
    while pos < end:
        if pos + 12 > end or len(rows) > size:
            return None
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        stop = pos + 8 + length
        if kind != b"IDAT" or stop + 4 > end:
            return None
        try:
            rows += inflater.decompress(view[pos + 8 : stop], size + 1 - len(rows))
        except _INFLATE_ERROR:
            return None
        if inflater.unconsumed_tail:
            return None
        pos = stop + 4
    if not inflater.eof or inflater.unused_data or len(rows) != size:
        return None
    return rows


#: Pixels that :func:`unfilter` hands Pillow at once, so that its copies of them (the framed
#: rows, their zlib stream, Pillow's image) stay in a core's cache whatever the batch and the
#: model (docs/performance.md).
UNFILTER_PIXELS = 2**19


def unfilter(filtered: np.ndarray, stack: np.ndarray, at: np.ndarray) -> None:
    """``n x h x (w+1)`` filtered rows, each led by its filter type (0-4), unfiltered into
    ``stack[at[i]]`` for image ``i``. Pillow's PNG decoder (``"zip"``) undoes the filters in
    C, as fast as NumPy can row by row in a tenth of the code (docs/performance.md). It is
    given the images as one image, each image's rows below a row of zeros with filter None,
    so that an image's first row sees zeros above it as a PNG's first row does; and, since
    it takes only a zlib stream, a stored one (level 0): nothing is inflated a second time."""
    n, h, w1 = filtered.shape
    step = max(1, UNFILTER_PIXELS // (h * w1))
    for start in range(0, n, step):
        part = filtered[start : start + step]
        framed = np.zeros((len(part), h + 1, w1), np.uint8)
        framed[:, 1:] = part
        image = Image.frombytes("L", (w1 - 1, len(part) * (h + 1)),
                                zlib_ng.compress(framed, 0), "zip", "L")
        pixels = np.asarray(image).reshape(len(part), h + 1, w1 - 1)
        stack[at[start : start + step]] = pixels[:, 1:]


def decode_images(
    blobs: Sequence[bytes], height: int, width: int
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """:func:`core.images.decode_each`, with plain PNGs inflated once and unfiltered together:
    the same stack, indices and errors, faster. Every other image is decoded by
    ``core.images``."""
    n = len(blobs)
    stack = np.empty((n, height, width), dtype=np.uint8)
    decoded = np.zeros(n, dtype=bool)
    plain: list[int] = []
    rows: list[bytes] = []
    for i, data in enumerate(blobs):
        raw = filtered_rows(data, height, width) if data else None
        if raw is not None:
            plain.append(i)
            rows.append(raw)
    if plain:
        filtered = np.frombuffer(b"".join(rows), np.uint8).reshape(len(plain), height, width + 1)
        valid = filtered[:, :, 0].max(axis=1) <= _PAETH  # any other filter byte: Pillow's error
        at = np.asarray(plain)
        if not valid.all():
            filtered, at = filtered[valid], at[valid]
        unfilter(filtered, stack, at)
        decoded[at] = True
    return decode_rest(blobs, stack, decoded)


def decode_rest(
    blobs: Sequence[bytes], stack: np.ndarray, decoded: np.ndarray
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """The images not ``decoded`` yet decoded by ``core.images`` into ``stack``; then, as
    :func:`core.images.decode_each` gives them, the stack of the decoded images, their
    indices and the others' errors."""
    n, height, width = stack.shape
    errors: dict[int, str] = {}
    slow = np.flatnonzero(~decoded).tolist()
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
