"""Bad and unusual image files, submitted through the real producer CLI (embedded scoring, the
same batch function as the workers): every image file ends with exactly one row, scored or
with an error saying why, and the other images are still scored."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from core.images import ImageError, decode_gray
from tests.support import (
    PREDICTION_COLUMNS,
    assert_run_complete,
    bomb_png,
    cli_command,
    copy_digits,
    digit_files,
    gray,
    submit,
)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def cut_in_idat(png: bytes) -> bytes:
    """The PNG cut in the middle of its first IDAT chunk's data."""
    at = png.index(b"IDAT")
    length = int.from_bytes(png[at - 4 : at], "big")
    return png[: at + 4 + length // 2]


# ---------------------------------------------------------------- damaged files, end to end


def test_bad_files_get_one_error_row_each_and_the_rest_are_scored(
    run_cli, tmp_path, sample_dir, any_model_db
):
    src = tmp_path / "images"
    good = set(copy_digits(sample_dir, src, per_class=5))
    digit = digit_files(sample_dir, "3", 1)[0]
    png = digit.read_bytes()
    jpeg = encode(Image.fromarray(gray(digit)), "JPEG", quality=95)
    bad_dir = src / "bad"
    bad_dir.mkdir()
    bad = {
        "empty.png": b"",
        "truncated.png": cut_in_idat(png),
        "signature_only.png": png[:8],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "header_cut.jpg": jpeg[:20],
        "header_cut.gif": encode(Image.fromarray(gray(digit)), "GIF")[:10],
        "text.png": b"this is not an image\n",
        "page.jpg": b"<html><body>not a photo</body></html>",
        "wide.png": encode(Image.new("L", (27, 28)), "PNG"),
        "big.png": encode(Image.new("L", (56, 56)), "PNG"),
        "dot.png": encode(Image.new("L", (1, 1)), "PNG"),
        "too_large_file.png": png + bytes(5 * 1024 * 1024),  # over MAX_FILE_BYTES (4 MiB)
    }
    for name, data in bad.items():
        (bad_dir / name).write_bytes(data)
    not_images = ["notes.txt", "data.csv", "Makefile", ".DS_Store", "digit.png.bak"]
    for name in not_images:
        (src / name).write_text("not an image")

    r = submit(run_cli, src, any_model_db)
    assert r.exit_code == 0, r.output
    failed = {f"bad/{name}" for name in bad}
    rows = assert_run_complete(any_model_db, good, failed, n_skipped=len(not_images))
    error = {name: rows[f"bad/{name}"]["error"] for name in bad}
    assert "empty" in error["empty.png"]
    for name in ("truncated.png", "signature_only.png", "truncated.jpg", "header_cut.jpg"):
        assert "truncated" in error[name], (name, error[name])
    assert "truncated" in error["header_cut.gif"] and "GIF" in error["header_cut.gif"]
    for name in ("text.png", "page.jpg"):
        assert "not an image" in error[name], (name, error[name])
    for name, size in (("wide.png", "27x28"), ("big.png", "56x56"), ("dot.png", "1x1")):
        assert size in error[name] and "28x28" in error[name], (name, error[name])
    assert "larger than" in error["too_large_file.png"]


# ---------------------------------------------------------------- formats and modes


def sixteen_bit(x: np.ndarray, mode: str = "I;16") -> Image.Image:
    """A 16-bit grayscale image of the uint16 array x, in little- or big-endian mode
    (Pillow's own convert("I;16B") clips to 255, so the bytes are laid out here)."""
    order = ">" if mode == "I;16B" else "<"
    return Image.frombytes(mode, x.shape[::-1], x.astype(f"{order}u2").tobytes())


def _variants(a: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """The digit ``a`` (uint8, 28x28) in every format and mode, losslessly: name ->
    (file bytes, the mode Pillow must report on reading it back)."""
    L = Image.fromarray(a)
    wide = a.astype(np.uint16) * 257  # 16-bit: v * 257 is v in 8 bits
    rgb = Image.fromarray(np.stack([a, a, a], axis=-1))
    alpha = Image.fromarray(np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8))
    palette = Image.frombytes("P", (28, 28), (255 - a).astype(np.uint8).tobytes())
    palette.putpalette([c for i in range(256) for c in (255 - i,) * 3])  # index i -> 255 - i
    half = Image.new("L", a.shape, 128)
    return {
        "L.png": (encode(L, "PNG"), "L"),
        "RGB.png": (encode(rgb, "PNG"), "RGB"),
        "RGBA.png": (encode(Image.merge("RGBA", [*rgb.split(), alpha]), "PNG"), "RGBA"),
        "LA.png": (encode(Image.merge("LA", [L, alpha]), "PNG"), "LA"),
        "P.png": (encode(palette, "PNG"), "P"),
        "I16.png": (encode(sixteen_bit(wide), "PNG"), "I;16"),
        "I16.tif": (encode(sixteen_bit(wide), "TIFF"), "I;16"),
        "I16B.tif": (encode(sixteen_bit(wide, "I;16B"), "TIFF"), "I;16B"),
        "I16.pgm": (encode(sixteen_bit(wide), "PPM"), "I"),
        "L.bmp": (encode(L, "BMP"), "L"),
        "L.gif": (encode(L, "GIF"), "P"),
        "L.tif": (encode(L, "TIFF"), "L"),
        "RGB.tif": (encode(rgb, "TIFF"), "RGB"),
        "L.webp": (encode(L, "WEBP", lossless=True), "RGB"),
        "L.pgm": (encode(L, "PPM"), "L"),
        "RGB.ppm": (encode(rgb, "PPM"), "RGB"),
        "LAB.tif": (encode(Image.merge("LAB", [L, half, half]), "TIFF"), "LAB"),
    }


def _one_bit_variants(a: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """The digit thresholded to 1 bit, as 8-bit L (the reference) and as 1-bit files."""
    ink = Image.fromarray(a).point(lambda v: 255 if v >= 128 else 0)
    bits = ink.convert("1")
    return {
        "T.png": (encode(ink, "PNG"), "L"),
        "1.png": (encode(bits, "PNG"), "1"),
        "1.pbm": (encode(bits, "PPM"), "1"),
        "1.tif": (encode(bits, "TIFF"), "1"),
        "1.bmp": (encode(bits, "BMP"), "1"),
    }


def test_every_format_and_mode_scores_like_the_grayscale_png(
    run_cli, tmp_path, sample_dir, model_db
):
    src = tmp_path / "formats"
    expected: dict[str, str] = {}  # stored path -> the stored path of its 8-bit L reference
    n = 0
    for label in ("3", "7"):
        (src / label).mkdir(parents=True)
        for digit in digit_files(sample_dir, label, 3):
            a = gray(digit)
            for variants, ref in ((_variants(a), "L.png"), (_one_bit_variants(a), "T.png")):
                for name, (data, mode) in variants.items():
                    path = src / label / f"{digit.stem}.{name}"
                    path.write_bytes(data)
                    with Image.open(path) as img:  # the file really is what it claims
                        assert img.mode == mode, (name, img.mode)
                    expected[f"{label}/{path.name}"] = f"{label}/{digit.stem}.{ref}"
                    n += 1
    jpegs = set()
    for label in ("3", "7"):
        for digit in digit_files(sample_dir, label, 3):
            path = src / label / f"{digit.stem}.q100.jpg"
            path.write_bytes(encode(Image.fromarray(gray(digit)), "JPEG", quality=100))
            jpegs.add(f"{label}/{path.name}")

    r = submit(run_cli, src, model_db)
    assert r.exit_code == 0, r.output
    rows = assert_run_complete(model_db, set(expected) | jpegs, set(), n_skipped=0)
    for path, ref in expected.items():
        got, want = rows[path], rows[ref]
        for col in ("pred_l1", "pred_l2", "pred_sgd"):
            assert got[col] == want[col], (path, col)
        for col in ("dist_l1", "dist_l2", "prob_sgd"):
            assert got[col] == pytest.approx(want[col], rel=1e-5, abs=1e-7), (path, col)
    for path in jpegs:  # lossy, but a quality-100 JPEG is scored close to its original
        ref = rows[path.replace(".q100.jpg", ".L.png")]
        assert rows[path]["dist_l1"] == pytest.approx(ref["dist_l1"], rel=0.02)
    assert len({r["pred_sgd"] for r in rows.values()}) == 2  # both classes really occur


V = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)  # every 8-bit value
RNG = np.random.default_rng(7)


def test_sixteen_bit_images_decode_to_their_high_byte():
    for fmt, mode in (("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B"), ("PPM", "I;16")):
        img = sixteen_bit(V.astype(np.uint16) * 257, mode)
        assert np.array_equal(decode_gray(encode(img, fmt), 28, 28), V), (fmt, mode)
        x = RNG.integers(0, 65536, (28, 28), dtype=np.uint16)
        got = decode_gray(encode(sixteen_bit(x, mode), fmt), 28, 28)
        assert np.array_equal(got, (x // 256).astype(np.uint8)), (fmt, mode)


def test_colour_palette_alpha_and_one_bit_images_decode_to_the_right_gray():
    same = np.stack([V, V, V], axis=-1)
    assert np.array_equal(decode_gray(encode(Image.fromarray(same), "PNG"), 28, 28), V)
    rgb = RNG.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601, as digit scanners record it
    got = decode_gray(encode(Image.fromarray(rgb), "PNG"), 28, 28)
    assert np.abs(got.astype(float) - luma).max() <= 1.0
    alpha = RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    rgba = encode(Image.fromarray(np.concatenate([rgb, alpha], axis=-1)), "PNG")
    assert np.array_equal(decode_gray(rgba, 28, 28), got)  # alpha is ignored
    la = encode(Image.merge("LA", [Image.fromarray(V), Image.fromarray(alpha[..., 0])]), "PNG")
    assert np.array_equal(decode_gray(la, 28, 28), V)
    pal = Image.frombytes("P", (28, 28), V.tobytes())
    shades = RNG.permutation(256)
    pal.putpalette([int(c) for s in shades for c in (s, s, s)])
    assert np.array_equal(decode_gray(encode(pal, "PNG"), 28, 28), shades[V])
    bits = RNG.integers(0, 2, (28, 28)).astype(bool)
    for fmt in ("PNG", "PPM", "TIFF", "BMP"):
        got = decode_gray(encode(Image.fromarray(bits), fmt), 28, 28)
        assert np.array_equal(got, np.where(bits, 255, 0)), fmt


def test_lab_and_float_images_decode_instead_of_failing_the_batch():
    half = Image.new("L", (28, 28), 128)
    lab = encode(Image.merge("LAB", [Image.fromarray(V), half, half]), "TIFF")
    assert np.array_equal(decode_gray(lab, 28, 28), V)  # LAB keeps its lightness
    floats = np.linspace(-50, 300, 784, dtype=np.float32).reshape(28, 28)
    got = decode_gray(encode(Image.fromarray(floats), "TIFF"), 28, 28)
    assert got.min() == 0 and got.max() == 255
    inside = (floats >= 0) & (floats <= 255)
    assert np.abs(got[inside] - floats[inside]).max() < 1


# ---------------------------------------------------------------- decompression bombs


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """Two real PNGs: 30000x30000 1-bit (900 Mpixels: 900 MB once decoded to 8 bits; past
    Pillow's bomb limit) and 9000x9000 8-bit (81 Mpixels: under Pillow's limit, so only our
    size check stands between it and 81 MB of pixels)."""
    made = {"giant.png": bomb_png(30000, 30000, 1), "large.png": bomb_png(9000, 9000, 8)}
    # genuine: each IDAT inflates to every row of the declared size
    shapes = ((30000, 30000, 1), (9000, 9000, 8))
    for data, (w, h, depth) in zip(made.values(), shapes, strict=True):
        start = data.index(b"IDAT") + 4
        inflater, n, stream = zlib.decompressobj(), 0, data[start : data.index(b"IEND") - 8]
        while stream:  # in 1 MB steps, never the whole image at once
            n += len(inflater.decompress(stream, 1 << 20))
            stream = inflater.unconsumed_tail
        assert inflater.eof and n == h * (1 + (w * depth + 7) // 8)
        assert len(data) < 200_000
    return made


def test_decompression_bombs_are_refused_unread_and_fast(bombs):
    why = {"giant.png": "decompression bomb", "large.png": "image is 9000x9000 pixels"}
    decode_gray(encode(Image.new("L", (28, 28)), "PNG"), 28, 28)  # Pillow imports its plugins
    for name, data in bombs.items():
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(ImageError) as refused:
            decode_gray(data, 28, 28)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < 0.25, (name, elapsed)
        assert peak < 2 * len(data) + 1_000_000, (name, peak)  # the file, never its pixels
        assert why[name] in str(refused.value) and "28x28" in str(refused.value)
        print(f"{name}: {len(data)} bytes refused in {elapsed * 1000:.1f} ms, peak {peak} B")


def test_decompression_bomb_in_a_run_gets_an_error_row_and_harms_nothing(
    run_cli, tmp_path, sample_dir, model_db, bombs
):
    src = tmp_path / "images"
    good = set(copy_digits(sample_dir, src, per_class=5))
    for name, data in bombs.items():
        (src / name).write_bytes(data)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    r = submit(run_cli, src, model_db)
    elapsed = time.perf_counter() - start
    assert r.exit_code == 0, r.output
    rows = assert_run_complete(model_db, good, set(bombs), n_skipped=0)
    assert "decompression bomb" in rows["giant.png"]["error"]
    assert "9000x9000" in rows["large.png"]["error"] and "28x28" in rows["large.png"]["error"]
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 60, grown_mb  # decoding either bomb would take 81-900 MB
    assert elapsed < 10, elapsed


# ---------------------------------------------------------------- no external programs


EPS_28 = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 28 28
%%EndComments
newpath 0 0 moveto 28 28 lineto stroke
showpage
%%EOF
"""


def test_postscript_named_png_never_runs_ghostscript(tmp_path, sample_dir, model_db):
    """Pillow hands EPS to an external `gs` process: a file of untrusted PostScript must not
    become a program run on the producer or a worker. A fake `gs` first on PATH records
    any call; the run is a real `producer submit` process."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-was-run"
    bin_dir.mkdir()
    fake_gs = bin_dir / "gs"
    fake_gs.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 1\n')
    fake_gs.chmod(0o755)
    src = tmp_path / "images"
    good = set(copy_digits(sample_dir, src, per_class=2))
    (src / "drawing.png").write_bytes(EPS_28)
    with Image.open(src / "drawing.png") as img:  # Pillow alone would take it as a 28x28 EPS
        assert (img.format, img.size) == ("EPS", (28, 28))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DIGITSCORE_BROKER_URL", None)
    proc = subprocess.run(
        cli_command("submit", str(src), "--database-url", model_db),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), marker.read_text()
    rows = assert_run_complete(model_db, good, {"drawing.png"}, n_skipped=0)
    assert "not an image" in rows["drawing.png"]["error"]
    assert all(rows[p]["error"] is None for p in good)
    assert set(PREDICTION_COLUMNS) <= set(rows["drawing.png"])
