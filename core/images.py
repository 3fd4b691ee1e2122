"""Decoding image bytes into 8-bit grayscale pixel arrays, with a reason for every failure.

Whatever the bytes, :func:`decode_gray` either returns pixels or raises :class:`ImageError`,
so one bad file never stops the rest of its batch.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import ImageError

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}

#: Leading bytes of common formats, to tell a damaged image from a file that is no image.
_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}

#: Formats Pillow can identify that are never opened here. EPS is not decoded by Pillow but
#: handed to an external Ghostscript process: a file of untrusted PostScript named ``x.png``
#: must not become a program run on a worker.
REFUSED_FORMATS = frozenset({"EPS"})


@cache
def readable_formats() -> tuple[str, ...]:
    """Every format Pillow can open, in Pillow's own identification order, but the refused."""
    Image.init()
    return tuple(f for f in Image.ID if f not in REFUSED_FORMATS)


def _open(data: bytes) -> Image.Image:
    """Parse the header only; a declared size past Pillow's bomb limit raises at once."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=readable_formats())


def image_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` from an image's header, without decoding its pixels."""
    try:
        with _open(data) as img:
            return img.size[1], img.size[0]
    except Exception as e:
        raise ImageError(f"not an image Pillow can read: {type(e).__name__}") from None


def decode_gray(data: bytes, height: int, width: int) -> np.ndarray:
    """Decode one encoded image into a ``(height, width)`` uint8 array (0 = background).

    Any format Pillow reads is accepted; colour, palette, alpha, 1-bit and 16-bit images are
    converted to 8-bit grayscale. An image of another size is refused, not resized: the size
    is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        img = _open(data)
    except UnidentifiedImageError:
        kind = next((k for magic, k in _MAGIC.items() if data.startswith(magic)), None)
        if kind is not None:
            raise ImageError(f"truncated or corrupt {kind} header: Pillow cannot read it") from None
        raise ImageError("not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            f"decompression bomb refused unread ({e}); the model expects {width}x{height}"
        ) from None
    except Exception as e:  # Pillow raises a zoo of types for corrupt headers
        raise ImageError(f"corrupt image header: {type(e).__name__}: {e}") from None
    with img:
        if img.size != (width, height):
            raise ImageError(
                f"image is {img.size[0]}x{img.size[1]} pixels, the model expects {width}x{height}"
            )
        try:
            img.load()
        except Exception as e:
            raise ImageError(f"truncated or corrupt image data: {e}") from None
        try:
            return _to_uint8_gray(img)
        except Exception as e:
            raise ImageError(
                f"image mode {img.mode} cannot be converted to grayscale: {e}"
            ) from None


def _to_uint8_gray(img: Image.Image) -> np.ndarray:
    """8-bit grayscale: 16-bit modes keep their high byte, alpha is ignored, colour is luma
    (ITU-R 601: 0.299 R + 0.587 G + 0.114 B), LAB keeps its lightness."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale: keep the high byte (Pillow's convert("L") would clip instead).
        wide = np.asarray(img).astype(np.int64)
        return (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
    if mode == "F":
        floats = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return np.clip(floats, 0, 255).astype(np.uint8)
    if mode == "LAB":
        return np.asarray(img.getchannel("L"), dtype=np.uint8)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def decode_each(
    blobs: Sequence[bytes], height: int, width: int
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Decode many images with Pillow into one stacked ``(n_ok, height, width)`` uint8 array.

    Returns the stack, the indices (into ``blobs``) of the decoded images in stack order, and
    the reason for every index that failed.
    """
    stack = np.empty((len(blobs), height, width), dtype=np.uint8)
    ok: list[int] = []
    errors: dict[int, str] = {}
    for i, data in enumerate(blobs):
        try:
            stack[len(ok)] = decode_gray(data, height, width)
        except ImageError as e:
            errors[i] = str(e)
            continue
        except Exception as e:  # a decoder bug must cost one image, not the batch
            errors[i] = f"image could not be decoded: {type(e).__name__}: {e}"
            continue
        ok.append(i)
    return stack[: len(ok)], ok, errors
