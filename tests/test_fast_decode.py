"""The libspng fast path decodes real digit files to exactly Pillow's pixels, and everything
unusual or damaged still takes the Pillow path and gets exactly Pillow's error."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import fast_decode, images

pytestmark = pytest.mark.skipif(not fast_decode.available(), reason="pyspng is not installed")


def encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def real_digits(sample_dir: Path) -> list[bytes]:
    files = sorted((sample_dir / "valid").rglob("*.png"))
    assert len(files) == 200
    return [f.read_bytes() for f in files]


def assert_same_as_pillow(blobs: list[bytes], height: int = 28, width: int = 28) -> None:
    want_stack, want_ok, want_errors = images.decode_each(blobs, height, width)
    got_stack, got_ok, got_errors = fast_decode.decode_images(blobs, height, width)
    assert got_ok == want_ok
    assert got_errors == want_errors
    assert got_stack.dtype == np.uint8 and got_stack.shape == want_stack.shape
    assert np.array_equal(got_stack, want_stack)


def chunks(png: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of each chunk of a well-formed PNG."""
    out, pos = [], 8
    while pos < len(png):
        length, kind = struct.unpack_from(">I4s", png, pos)
        out.append((pos, kind, length))
        pos += 12 + length
    return out


def with_crc_fixed(png: bytes, chunk_at: int) -> bytes:
    """Recompute the CRC of the chunk at ``chunk_at``, so a damaged chunk passes the CRC check
    and reaches libspng itself."""
    (length,) = struct.unpack_from(">I", png, chunk_at)
    body = png[chunk_at + 4 : chunk_at + 8 + length]
    crc = struct.pack(">I", zlib.crc32(body))
    return png[: chunk_at + 8 + length] + crc + png[chunk_at + 12 + length :]


def add_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """Insert a chunk right after IHDR."""
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return png[:33] + chunk + png[33:]


def test_real_digit_files_take_the_fast_path_with_pillows_pixels(sample_dir, monkeypatch):
    blobs = real_digits(sample_dir)
    assert all(fast_decode.is_plain_png(b, 28, 28) for b in blobs)
    assert_same_as_pillow(blobs)
    # and Pillow decoded none of them
    monkeypatch.setattr(images, "decode_gray", lambda *a: pytest.fail("Pillow was used"))
    stack, ok, errors = fast_decode.decode_images(blobs, 28, 28)
    assert ok == list(range(200)) and not errors and stack.shape == (200, 28, 28)


def test_digits_written_by_other_encoders_give_pillows_pixels(sample_dir):
    digit = np.asarray(Image.open(io.BytesIO(real_digits(sample_dir)[0])))
    variants = [
        encode(Image.fromarray(digit), optimize=True),
        encode(Image.fromarray(digit), compress_level=0),
        encode(Image.fromarray(digit), compress_level=9),
    ]
    assert all(fast_decode.is_plain_png(v, 28, 28) for v in variants)
    assert_same_as_pillow(variants)


def unusual_images(digit: np.ndarray) -> dict[str, bytes]:
    img = Image.fromarray(digit)
    wide = Image.fromarray((digit.astype(np.uint16) * 257).astype(np.uint16))
    tiny = Image.fromarray(digit[:20, :20])
    return {
        "16-bit": encode(wide),
        "palette": encode(img.convert("P")),
        "rgb": encode(img.convert("RGB")),
        "gray+alpha": encode(img.convert("LA")),
        "1-bit": encode(img.convert("1")),
        "interlace flag": with_crc_fixed(encode(img)[:28] + b"\1" + encode(img)[29:], 8),
        "text chunk": add_chunk(encode(img), b"tEXt", b"k\0v"),
        "transparency": encode(img, transparency=0),
        "wrong size": encode(tiny),
        "jpeg": encode(img, "JPEG"),
        "bmp": encode(img, "BMP"),
        "gamma chunk": add_chunk(encode(img), b"gAMA", struct.pack(">I", 45455)),
        "not an image": b"hello, world",
        "just a signature": fast_decode.PNG_SIGNATURE,
        "bytes after IEND": encode(img) + b"\0junk",
        "bad IHDR crc": encode(img)[:29] + b"\0\0\0\0" + encode(img)[33:],
    }


def test_unusual_images_take_the_pillow_path_with_the_same_result(sample_dir, monkeypatch):
    digit = np.asarray(Image.open(io.BytesIO(real_digits(sample_dir)[0])))
    unusual = unusual_images(digit)
    for name, blob in unusual.items():
        assert not fast_decode.is_plain_png(blob, 28, 28), name
    blobs = list(unusual.values())
    assert_same_as_pillow(blobs)
    _, _, errors = fast_decode.decode_images(blobs, 28, 28)
    names = list(unusual)
    failed = {names[i] for i in errors}
    assert {"wrong size", "not an image", "just a signature"} <= failed
    assert "16-bit" not in failed and "palette" not in failed
    # none of them reached libspng
    monkeypatch.setattr(fast_decode.pyspng, "load", lambda *a: pytest.fail("libspng was used"))
    fast_decode.decode_images(blobs, 28, 28)


def test_a_mixed_batch_keeps_order_indices_and_errors(sample_dir):
    digits = real_digits(sample_dir)[:6]
    digit = np.asarray(Image.open(io.BytesIO(digits[0])))
    odd = unusual_images(digit)
    blobs = [
        odd["not an image"], digits[0], odd["palette"], digits[1], odd["wrong size"],
        digits[2], odd["16-bit"], b"", digits[3],
    ]
    assert_same_as_pillow(blobs)
    stack, ok, errors = fast_decode.decode_images(blobs, 28, 28)
    assert ok == [1, 2, 3, 5, 6, 8] and set(errors) == {0, 4, 7}
    assert np.array_equal(stack[0], np.asarray(Image.open(io.BytesIO(digits[0]))))
    assert np.array_equal(stack[5], np.asarray(Image.open(io.BytesIO(digits[3]))))


def test_every_truncation_gives_pillows_result(sample_dir):
    png = real_digits(sample_dir)[7]
    assert_same_as_pillow([png[:n] for n in range(len(png))])


def test_every_damaged_byte_gives_pillows_result(sample_dir):
    """Flip each byte of a real digit file, as it is and with the damaged chunk's CRC made
    right again so that libspng, not the CRC check, has to catch the damage."""
    png = real_digits(sample_dir)[11]
    starts = chunks(png)
    damaged = []
    for pos in range(len(png)):
        for flip in (0x01, 0x80, 0xFF):
            bad = png[:pos] + bytes([png[pos] ^ flip]) + png[pos + 1 :]
            damaged.append(bad)
            owner = max((c for c in starts if c[0] <= pos), key=lambda c: c[0], default=None)
            if owner is not None and pos >= owner[0] + 4:
                damaged.append(with_crc_fixed(bad, owner[0]))
    # the CRC-fixed copies of damaged IDAT data pass the chunk checks; the zlib check stops
    # most of them, and some (damage zlib does not see) still reach libspng
    passed_chunks = sum(fast_decode.plain_png_stream(b, 28, 28) is not None for b in damaged)
    assert passed_chunks > 2 * len(png)
    assert sum(fast_decode.is_plain_png(b, 28, 28) for b in damaged) > 0
    assert_same_as_pillow(damaged)


def test_streams_libspng_would_accept_but_pillow_rejects_get_pillows_error(sample_dir):
    """libspng stops at the last row and never checks the Adler-32; Pillow does. Damage inside
    the deflate data (CRC repaired) that libspng alone decodes must still be an error row."""
    png = real_digits(sample_dir)[5]
    fooled = []
    for at in range(33 + 8 + 2, 33 + 8 + 100):
        bad = with_crc_fixed(png[:at] + bytes([png[at] ^ 0x01]) + png[at + 1 :], 33)
        try:
            fast_decode.pyspng.load(bad)
        except Exception:
            continue
        if images.decode_each([bad], 28, 28)[2]:
            fooled.append(bad)
    assert len(fooled) >= 3
    _, ok, errors = fast_decode.decode_images(fooled, 28, 28)
    assert ok == [] and errors == images.decode_each(fooled, 28, 28)[2]
    assert all("corrupt image data" in e for e in errors.values())


def test_damaged_zlib_streams_give_pillows_result(sample_dir):
    """IDAT holding a different zlib stream: cut short, with a wrong Adler-32, with bytes after
    its end, too many or too few rows, a bad filter byte; CRCs right every time."""
    png = real_digits(sample_dir)[3]
    pixels = np.asarray(Image.open(io.BytesIO(png)))
    rows = b"".join(b"\0" + pixels[r].tobytes() for r in range(28))

    def with_idat(data: bytes) -> bytes:
        idat = struct.pack(">I", len(data)) + b"IDAT" + data
        idat += struct.pack(">I", zlib.crc32(b"IDAT" + data))
        return png[:33] + idat + png[-12:]

    good = zlib.compress(rows)
    streams = {
        "good": good,
        "short": good[:-10],
        "bad adler": good[:-4] + bytes(4),
        "trailing bytes": good + b"\0\0\0",
        "extra row": zlib.compress(rows + b"\0" + bytes(28)),
        "missing row": zlib.compress(rows[:-29]),
        "bad filter": zlib.compress(b"\x07" + rows[1:]),
    }
    blobs = [with_idat(s) for s in streams.values()]
    half = len(good) // 2
    first = struct.pack(">I", half) + b"IDAT" + good[:half]
    first += struct.pack(">I", zlib.crc32(b"IDAT" + good[:half]))
    second = struct.pack(">I", len(good) - half) + b"IDAT" + good[half:]
    second += struct.pack(">I", zlib.crc32(b"IDAT" + good[half:]))
    blobs.append(png[:33] + first + second + png[-12:])
    assert all(fast_decode.plain_png_stream(b, 28, 28) is not None for b in blobs)
    plain = [fast_decode.is_plain_png(b, 28, 28) for b in blobs]
    assert plain == [True] + [False] * 6 + [True]  # only the good and the split stream
    assert_same_as_pillow(blobs)
    stack, ok, _ = fast_decode.decode_images(blobs, 28, 28)
    assert 0 in ok and np.array_equal(stack[0], pixels)
    assert np.array_equal(stack[ok.index(len(blobs) - 1)], pixels)  # split IDAT decodes
