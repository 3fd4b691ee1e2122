"""The decoder the workers used before core/fast_decode.py inflated each file once, kept so that
``python -m bench.throughput`` measures the new per-process rate against it in the same
command, for one release. It checks each chunk's CRC, inflates the stream to check it, then
hands the file to libspng (``pyspng``, no longer a dependency: ``pip install pyspng``), which
inflates and unfilters it again; and the scoring as it was then (:func:`score_stack`). Not
used by the system.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import fields

import numpy as np
import torch

from core import scoring
from core.classifier import Classifier
from core.fast_decode import decode_rest, plain_header

try:
    import pyspng
except ImportError:  # the benchmark then skips the comparison and says so
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_CHUNK_HEAD = struct.Struct(">I4s")
_CRC = struct.Struct(">I")


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
    for i, data in enumerate(blobs):
        pixels = decode_plain_png(data, height, width) if data else None
        if pixels is not None:
            stack[i] = pixels
            decoded[i] = True
    return decode_rest(blobs, stack, decoded)  # the rest as the fast decoder does it


#: The images the previous scoring scored at once on the CPU.
PREVIOUS_SCORE_ROWS = 256


def score_stack(
    classifier: Classifier, stack: np.ndarray, device: torch.device
) -> scoring.Scores:
    """:func:`core.scoring.score_stack` as it was: on the CPU in slices of 256 images, each
    with a difference tensor of up to 16M elements (the whole slice)."""
    if device.type != "cpu" or len(stack) <= PREVIOUS_SCORE_ROWS:
        return _score(classifier, stack, device)
    parts = [_score(classifier, stack[i : i + PREVIOUS_SCORE_ROWS], device)
             for i in range(0, len(stack), PREVIOUS_SCORE_ROWS)]
    return scoring.Scores(*(torch.cat([getattr(p, f.name) for p in parts])
                            for f in fields(scoring.Scores)))


def _score(classifier: Classifier, stack: np.ndarray, device: torch.device) -> scoring.Scores:
    kept = scoring.DIFFERENCE_ELEMENTS["cpu"]
    scoring.DIFFERENCE_ELEMENTS["cpu"] = scoring.GPU_DIFFERENCE_ELEMENTS
    try:
        return scoring.score_tensor(classifier, scoring.to_device(stack, device))
    finally:
        scoring.DIFFERENCE_ELEMENTS["cpu"] = kept
