"""Decoding image bytes into 8-bit grayscale pixel arrays, with a reason for every failure."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be scored; ``str(error)`` is the reason stored in its error row."""


_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def image_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` from an image's header, without decoding its pixels."""
    try:
        with Image.open(io.BytesIO(data)) as img:
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
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("refused: decompression bomb (too many pixels)") from None
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
        return _to_uint8_gray(img)


def _to_uint8_gray(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale: keep the high byte (Pillow's convert("L") would clip instead).
        wide = np.asarray(img).astype(np.int64)
        return (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
    if mode == "F":
        return np.clip(np.asarray(img), 0, 255).astype(np.uint8)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def decode_batch(
    blobs: Sequence[bytes], height: int, width: int
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Decode many images into one stacked ``(n_ok, height, width)`` uint8 array.

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
        ok.append(i)
    return stack[: len(ok)], ok, errors
