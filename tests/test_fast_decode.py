"""The fast path (zlib once, the rows of a batch unfiltered together) decodes real digit files,
and files with every PNG filter forced, to exactly Pillow's pixels; everything unusual or
damaged gets exactly Pillow's pixels or Pillow's error."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import fast_decode, images


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
    and its damage must be caught by what reads the chunk's data."""
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
    assert all(fast_decode.filtered_rows(b, 28, 28) is not None for b in blobs)
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
    assert all(fast_decode.filtered_rows(v, 28, 28) is not None for v in variants)
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
        assert fast_decode.filtered_rows(blob, 28, 28) is None, name
    blobs = list(unusual.values())
    assert_same_as_pillow(blobs)
    _, _, errors = fast_decode.decode_images(blobs, 28, 28)
    names = list(unusual)
    failed = {names[i] for i in errors}
    assert {"wrong size", "not an image", "just a signature"} <= failed
    assert "16-bit" not in failed and "palette" not in failed
    # none of them was unfiltered on the fast path
    monkeypatch.setattr(fast_decode, "unfilter", lambda *a: pytest.fail("fast path used"))
    assert_same_as_pillow(blobs)


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
    right again so that zlib and the checks of the rows, not a CRC, have to catch the damage."""
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
    # damage to the IDAT CRC alone, or to the filter bytes once inflated, still reaches the
    # fast path's rows; zlib stops every other damaged stream
    assert sum(fast_decode.filtered_rows(b, 28, 28) is not None for b in damaged) > 12
    assert_same_as_pillow(damaged)


def test_a_damaged_idat_crc_alone_gives_pillows_pixels_on_the_fast_path(sample_dir):
    """Pillow skips the IDAT CRCs (the Adler-32 guards the data), so the fast path does too."""
    png = real_digits(sample_dir)[5]
    [(_, _, length)] = [c for c in chunks(png) if c[1] == b"IDAT"]
    at = 33 + 8 + length
    bad = png[:at] + bytes([png[at] ^ 0x5A]) + png[at + 1 :]
    assert fast_decode.filtered_rows(bad, 28, 28) is not None
    assert_same_as_pillow([bad, png])
    assert images.decode_each([bad], 28, 28)[2] == {}


def test_zlib_ng_inflates_damaged_streams_as_zlib_does(sample_dir):
    """The fast path inflates with zlib-ng, Pillow with zlib: on real digits' IDAT data with
    one to three bytes changed at random, or cut short, both give the same bytes, the same
    end of stream and leftovers, or both an error (docs/performance.md ran 300,000)."""
    from zlib_ng import zlib_ng

    def inflate(module, data: bytes):
        inflater = module.decompressobj()
        try:
            out = inflater.decompress(data, 813)
        except module.error:
            return "error"
        return out, inflater.eof, inflater.unused_data, inflater.unconsumed_tail

    streams = [png[41:-16] for png in real_digits(sample_dir)]
    rng = np.random.default_rng(0)
    outcomes = set()
    for t in range(6000):
        data = bytearray(streams[t % len(streams)])
        for at in rng.integers(0, len(data), rng.integers(1, 4)):
            data[at] = rng.integers(0, 256)
        if t % 10 == 0:
            data = data[: rng.integers(0, len(data))]
        want = inflate(zlib, bytes(data))
        assert inflate(zlib_ng, bytes(data)) == want, t
        outcomes.add("error" if want == "error" else want[1])
    assert outcomes == {"error", True, False}  # failures, whole streams and cut ones


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
    plain = [fast_decode.filtered_rows(b, 28, 28) is not None for b in blobs]
    # the good and the split stream; the bad filter byte is found for the batch at once
    assert plain == [True] + [False] * 5 + [True, True]
    assert_same_as_pillow(blobs)
    stack, ok, _ = fast_decode.decode_images(blobs, 28, 28)
    assert 0 in ok and np.array_equal(stack[0], pixels)
    assert np.array_equal(stack[ok.index(len(blobs) - 1)], pixels)  # split IDAT decodes


# ---------------------------------------------------------------- PNGs written by hand

NONE, SUB, UP, AVERAGE, PAETH = range(5)


def predict(kind: int, a: int, b: int, c: int) -> int:
    """The PNG specification's predictors, written out plainly (a left, b above, c above-left)."""
    if kind == SUB:
        return a
    if kind == UP:
        return b
    if kind == AVERAGE:
        return (a + b) // 2
    if kind == PAETH:
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        return a if pa <= pb and pa <= pc else (b if pb <= pc else c)
    return 0


def filtered(pixels: np.ndarray, kinds: list[int]) -> bytes:
    """Rows of 8-bit grayscale pixels, row ``r`` led by and filtered with ``kinds[r]``."""
    out, above = bytearray(), [0] * pixels.shape[1]
    for kind, row in zip(kinds, pixels.tolist(), strict=True):
        out.append(kind)
        for c, x in enumerate(row):
            a, up_left = (row[c - 1], above[c - 1]) if c else (0, 0)
            out.append((x - predict(kind, a, above[c], up_left)) % 256)
        above = row
    return bytes(out)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(rows: bytes, height: int, width: int, interlace: int = 0, idat_size: int = 0) -> bytes:
    """A grayscale 8-bit PNG of already filtered ``rows``, in IDAT chunks of ``idat_size``."""
    stream = zlib.compress(rows)
    size = idat_size or len(stream)
    idats = b"".join(chunk(b"IDAT", stream[i : i + size]) for i in range(0, len(stream), size))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace))
    return fast_decode.PNG_SIGNATURE + ihdr + idats + chunk(b"IEND", b"")


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2)]


def interlaced(pixels: np.ndarray, kind: int) -> bytes:
    """An Adam7-interlaced PNG: the seven passes' sub-images, each row filtered with ``kind``."""
    rows = b""
    for x0, y0, dx, dy in ADAM7:
        part = pixels[y0::dy, x0::dx]
        if part.size:
            rows += filtered(part, [kind] * part.shape[0])
    return png(rows, *pixels.shape, interlace=1)


def test_every_filter_type_gives_pillows_pixels(sample_dir, monkeypatch):
    """Each filter forced on every row, and mixed row by row, on real digits, noise, and flat
    and extreme images, in one batch: all on the fast path, all Pillow's pixels."""
    rng = np.random.default_rng(28)
    digits = [np.asarray(Image.open(io.BytesIO(b))) for b in real_digits(sample_dir)[:8]]
    noise = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(4)]
    flat = [np.full((28, 28), v, np.uint8) for v in (0, 1, 127, 128, 254, 255)]
    edges = [np.tile(np.array([0, 255], np.uint8), (28, 14)), np.eye(28, dtype=np.uint8) * 255]
    pictures = digits + noise + flat + edges
    blobs = [png(filtered(p, [kind] * 28), 28, 28) for kind in range(5) for p in pictures]
    blobs += [png(filtered(p, rng.integers(0, 5, 28).tolist()), 28, 28) for p in pictures * 3]
    blobs.append(png(filtered(digits[0], [PAETH] * 28), 28, 28, idat_size=7))  # many IDATs
    assert all(fast_decode.filtered_rows(b, 28, 28) is not None for b in blobs)
    assert_same_as_pillow(blobs)
    monkeypatch.setattr(images, "decode_gray", lambda *a: pytest.fail("Pillow was used"))
    stack, ok, errors = fast_decode.decode_images(blobs, 28, 28)
    assert ok == list(range(len(blobs))) and not errors
    for kind in range(5):  # and they are the pictures themselves
        assert np.array_equal(stack[kind * len(pictures) : (kind + 1) * len(pictures)], pictures)


def test_a_batch_of_mixed_filters_and_failures_keeps_each_image_in_place():
    """Images of each filter between images that fail on the fast path and in Pillow."""
    rng = np.random.default_rng(7)
    pictures = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(40)]
    blobs: list[bytes] = []
    for i, p in enumerate(pictures):
        kinds = [(i + r) % 5 for r in range(28)]
        blobs.append(png(filtered(p, kinds), 28, 28))
        if i % 3 == 0:
            bad = bytearray(filtered(p, kinds))
            bad[29 * (i % 28)] = 5 + i % 250  # no such filter: Pillow's error
            blobs.append(png(bytes(bad), 28, 28))
        if i % 4 == 0:
            blobs.append(encode(Image.fromarray(p).convert("P")))  # Pillow's pixels
    assert_same_as_pillow(blobs)
    _, ok, errors = fast_decode.decode_images(blobs, 28, 28)
    assert len(errors) == 14 and len(ok) == len(blobs) - 14


def test_a_batch_unfiltered_in_several_parts_gives_the_same_pixels(monkeypatch):
    """A batch larger than what Pillow is handed at once (here 3 images a part, the last part
    short) gives each image its own pixels, every filter on a first row included."""
    rng = np.random.default_rng(11)
    pictures = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(10)]
    blobs = [png(filtered(p, [(i + r) % 5 for r in range(28)]), 28, 28)
             for i, p in enumerate(pictures)]
    monkeypatch.setattr(fast_decode, "UNFILTER_PIXELS", 3 * 28 * 29)
    stack, ok, errors = fast_decode.decode_images(blobs, 28, 28)
    assert ok == list(range(10)) and not errors
    assert np.array_equal(stack, np.stack(pictures))


def test_other_sizes_give_pillows_pixels_or_pillows_error():
    """The fast path serves a model of any size; a file of another size is Pillow's error."""
    rng = np.random.default_rng(3)
    for height, width in ((1, 1), (1, 9), (9, 1), (17, 23), (28, 27), (64, 64)):
        pictures = [rng.integers(0, 256, (height, width), dtype=np.uint8) for _ in range(6)]
        blobs = [png(filtered(p, rng.integers(0, 5, height).tolist()), height, width)
                 for p in pictures]
        assert all(fast_decode.filtered_rows(b, height, width) is not None for b in blobs)
        assert_same_as_pillow(blobs, height, width)
        stack, ok, _ = fast_decode.decode_images(blobs, height, width)
        assert ok == list(range(6)) and np.array_equal(stack, pictures)
        _, ok, errors = fast_decode.decode_images(blobs, 28, 28)
        assert ok == [] and errors == images.decode_each(blobs, 28, 28)[2]
        assert all("the model expects 28x28" in e for e in errors.values())


def test_interlaced_16_bit_and_palette_files_give_pillows_pixels(sample_dir):
    digit = np.asarray(Image.open(io.BytesIO(real_digits(sample_dir)[2])))
    odd = [interlaced(digit, kind) for kind in range(5)]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(odd[4]))), digit)  # a real Adam7
    wide = Image.fromarray(digit.astype(np.uint16) * 257)
    odd += [encode(wide), encode(Image.fromarray(digit).convert("P")),
            encode(Image.fromarray(digit).quantize(7))]
    assert all(fast_decode.filtered_rows(b, 28, 28) is None for b in odd)
    assert_same_as_pillow(odd)
    stack, ok, _ = fast_decode.decode_images(odd, 28, 28)
    assert ok == list(range(len(odd))) and np.array_equal(stack[:6], [digit] * 6)
