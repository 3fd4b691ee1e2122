"""Pictures of a model and of scored images, drawn with Pillow (no plotting library).

- :func:`gray_image`: an ideal digit (values 0-1) as an 8-bit grayscale image;
- :func:`heat_map`: SGD weights in a diverging palette, blue (negative) - white (0) - red
  (positive), on a scale symmetric around 0 so that white always means "no evidence";
- :func:`model_sheet`: every class's ideal image above its weight map, with a colour bar;
- :func:`curve_chart`: the learning curve, validation accuracy and training loss per epoch;
- :func:`load_thumbnail`: a scored file re-read from the run's source directory.
"""

from __future__ import annotations

import base64
import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core.archive_batches import read_recorded
from core.curve import EpochStats
from core.files import read_below
from core.images import ImageError, decode_gray
from db.reads import ModelArrays

NEGATIVE = np.array([33, 102, 172], dtype=np.float64)  # blue
ZERO = np.array([255, 255, 255], dtype=np.float64)  # white
POSITIVE = np.array([178, 24, 43], dtype=np.float64)  # red
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)


def gray_image(values: np.ndarray) -> Image.Image:
    """A ``H x W`` array of 0-1 values as an 8-bit grayscale image (1.0 = white)."""
    pixels = np.clip(np.rint(np.asarray(values, dtype=np.float64) * 255), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def weight_scale(weights: np.ndarray) -> float:
    """The symmetric colour scale shared by all weight maps of a model: max ``|w|``."""
    top = float(np.abs(np.asarray(weights)).max()) if weights.size else 0.0
    return top if top > 0 else 1.0


def heat_map(values: np.ndarray, vmax: float) -> Image.Image:
    """A ``H x W`` array as RGB: ``-vmax`` blue, 0 white, ``+vmax`` red, linear between."""
    t = np.clip(np.asarray(values, dtype=np.float64) / vmax, -1.0, 1.0)[..., None]
    rgb = np.where(t >= 0, ZERO + (POSITIVE - ZERO) * t, ZERO + (NEGATIVE - ZERO) * -t)
    return Image.fromarray(np.rint(rgb).astype(np.uint8))


def colour_bar(width: int, height: int) -> Image.Image:
    """The palette of :func:`heat_map` from ``-1`` (left) to ``+1`` (right)."""
    ramp = np.linspace(-1.0, 1.0, width)[None, :].repeat(height, axis=0)
    return heat_map(ramp, 1.0)


def ideal_pictures(model: ModelArrays) -> list[Image.Image]:
    return [gray_image(ideal) for ideal in model.ideals]


def weight_pictures(model: ModelArrays) -> tuple[list[Image.Image], float]:
    """One heat map per class (column of the weights) and the shared scale ``vmax``."""
    weights = model.weights
    vmax = weight_scale(weights)
    h, w = model.height, model.width
    return [heat_map(weights[:, k].reshape(h, w), vmax) for k in range(weights.shape[1])], vmax


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def model_sheet(classifier: ModelArrays, scale: int = 4, title: str = "") -> Image.Image:
    """One picture of a model: a row of ideal images, a row of SGD weight maps under them
    (one column per class, named), and a colour bar giving the weights' scale."""
    ideals = ideal_pictures(classifier)
    maps, vmax = weight_pictures(classifier)
    cell_w, cell_h = classifier.width * scale, classifier.height * scale
    pad, label_h, row_label_w = 12, 22, 150
    font, small = _font(16), _font(13)
    k = len(classifier.classes)
    width = row_label_w + k * (cell_w + pad) + pad
    top = pad + (label_h if title else 0)
    bar_y = top + label_h + 2 * (cell_h + pad) + pad
    height = bar_y + 16 + label_h + pad
    sheet = Image.new("RGB", (max(width, row_label_w + 320), height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill=INK, font=font)
    for i, name in enumerate(classifier.classes):
        x = row_label_w + i * (cell_w + pad)
        draw.text((x, top), _short(name, cell_w // 8), fill=INK, font=font)
        y = top + label_h
        sheet.paste(ideals[i].resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        y += cell_h + pad
        sheet.paste(maps[i].resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
    draw.text((pad, top + label_h + cell_h // 2), "ideal image", fill=INK, font=small)
    draw.text(
        (pad, top + label_h + cell_h + pad + cell_h // 2), "SGD weights", fill=INK, font=small
    )
    bar_w = 300
    sheet.paste(colour_bar(bar_w, 16), (row_label_w, bar_y))
    draw.rectangle((row_label_w, bar_y, row_label_w + bar_w - 1, bar_y + 15), outline=INK)
    draw.text((pad, bar_y), "weight scale", fill=INK, font=small)
    y = bar_y + 18
    draw.text((row_label_w, y), f"{-vmax:.3g}", fill=INK, font=small)
    draw.text((row_label_w + bar_w // 2 - 4, y), "0", fill=INK, font=small)
    draw.text((row_label_w + bar_w - 40, y), f"{vmax:.3g}", fill=INK, font=small)
    return sheet


ACCURACY_INK = (178, 24, 43)  # red
LOSS_INK = (33, 102, 172)  # blue
GRID = (200, 200, 200)


#: Width and height of :func:`curve_chart` in pixels, whatever the model's picture scale.
CURVE_CHART_SIZE = (560, 280)


def nice_ticks(low: float, high: float, most: int = 6, cover: bool = True) -> list[float]:
    """Round values (steps of 1, 2 or 5 times a power of ten) for an axis a reader can read
    off, at most about ``most`` of them: from the last one at or below ``low`` to the first
    at or above ``high`` (``cover``), or only those between the two."""
    if not high > low:
        return [low]
    raw = (high - low) / max(most - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, stop = low / step, high / step
    if cover:
        span = range(math.floor(first + 1e-9), math.ceil(stop - 1e-9) + 1)
    else:
        span = range(math.ceil(first - 1e-9), math.floor(stop + 1e-9) + 1)
    return [round(k * step, 12) for k in span]


def _tick_text(value: float) -> str:
    return f"{value:.10g}"


def curve_chart(
    curve: tuple[EpochStats, ...],
    best_epoch: int | None,
    width: int = CURVE_CHART_SIZE[0],
    height: int = CURVE_CHART_SIZE[1],
) -> Image.Image:
    """The learning curve of the weight decay kept: validation accuracy (red, left axis) and
    training loss (blue, right axis, from 0) per epoch, each axis with round ticks and the
    accuracy's with grid lines, and a grey line at the epoch kept."""
    left, right, top, bottom = 64, 64, 34, 40
    chart = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(chart)
    font, small = _font(14), _font(12)
    plot_w, plot_h = width - left - right, height - top - bottom
    epochs = [s.epoch for s in curve]
    first, last = (min(epochs), max(epochs)) if epochs else (1, 1)

    def x_of(epoch: float) -> float:
        return left + (plot_w / 2 if last == first else (epoch - first) / (last - first) * plot_w)

    def y_of(value: float, low: float, high: float) -> float:
        span = high - low if high > low else 1.0
        return top + plot_h - (value - low) / span * plot_h

    decay = f" (weight decay {curve[0].weight_decay:g})" if curve else ""
    draw.text((left, 8), "validation accuracy", fill=ACCURACY_INK, font=font)
    draw.text((left + plot_w - 100, 8), "training loss", fill=LOSS_INK, font=font)
    draw.text((left + plot_w // 2 - 60, height - 18), f"epoch{decay}", fill=INK, font=small)
    for epoch in sorted({first, *nice_ticks(first, last, 10, cover=False)}):
        if epoch == int(epoch):
            x = x_of(epoch)
            draw.line((x, top + plot_h, x, top + plot_h + 4), fill=INK)
            draw.text((x - 6, top + plot_h + 5), str(int(epoch)), fill=INK, font=small)
    if best_epoch is not None and first <= best_epoch <= last:
        x = x_of(best_epoch)
        draw.line((x, top, x, top + plot_h), fill=GRID, width=2)
        draw.text((x + 3, top + 2), f"kept: {best_epoch}", fill=INK, font=small)
    accuracy = [(s.epoch, s.valid_accuracy) for s in curve if s.valid_accuracy is not None]
    if accuracy:
        ticks = nice_ticks(min(a for _, a in accuracy), max(a for _, a in accuracy), 5)
        low, high = ticks[0], ticks[-1]
        for tick in ticks:
            y = y_of(tick, low, high)
            draw.line((left, y, left + plot_w, y), fill=GRID)
            draw.text((4, y - 7), _tick_text(tick), fill=ACCURACY_INK, font=small)
        points = [(x_of(e), y_of(a, low, high)) for e, a in accuracy]
        if len(points) > 1:
            draw.line(points, fill=ACCURACY_INK, width=2)
        for px, py in points:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=ACCURACY_INK)
    if curve:
        ticks = nice_ticks(0.0, max(s.loss for s in curve), 5)
        high = ticks[-1]
        for tick in ticks:
            y = y_of(tick, 0.0, high)
            draw.line((left + plot_w, y, left + plot_w + 4, y), fill=LOSS_INK)
            draw.text((left + plot_w + 6, y - 7), _tick_text(tick), fill=LOSS_INK, font=small)
        points = [(x_of(s.epoch), y_of(s.loss, 0.0, high)) for s in curve]
        if len(points) > 1:
            draw.line(points, fill=LOSS_INK, width=2)
    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=INK)
    return chart


def stacked(*images: Image.Image) -> Image.Image:
    """Images one above the other on a white background, left-aligned."""
    sheet = Image.new(
        "RGB", (max(i.width for i in images), sum(i.height for i in images)), BACKGROUND
    )
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height
    return sheet


def _short(text: str, limit: int) -> str:
    limit = max(limit, 2)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def inside_source(source_dir: str, path: str) -> str | None:
    """The resolved path of ``path`` under ``source_dir`` when it lies inside the resolved
    ``source_dir`` (symlinks followed, ``..`` applied), else ``None``: an absolute path, a NUL
    byte, or a link out of the directory leads nowhere."""
    if not path or os.path.isabs(path) or "\0" in path or "\0" in source_dir:
        return None
    try:
        root = os.path.realpath(source_dir)
        full = os.path.realpath(os.path.join(root, path))
    except (OSError, ValueError):
        return None
    return full if full != root and os.path.commonpath([root, full]) == root else None


def load_thumbnail(
    source_dir: str, path: str, height: int, width: int, member: dict[str, Any] | None = None
) -> Image.Image | None:
    """The scored image ``path`` (relative to ``source_dir``) as grayscale, or ``None`` when
    it is gone, unreadable, not an image of the model's size, or resolves outside
    ``source_dir``. ``member``: where ``path`` is inside an archive (db.reads.member_records),
    read from there."""
    if inside_source(source_dir, path if member is None else member["archive"]) is None:
        return None
    root = os.path.realpath(source_dir)
    if member is None:
        data, error = read_below(root, path)
    else:
        data, error = read_recorded(root, [path], member).blobs[0], None
    if data is None or error:
        return None
    try:
        return Image.fromarray(decode_gray(data, height, width))
    except ImageError:
        return None
