"""What a skilled user writes by hand instead of running digitscore: one process, NumPy and
Pillow only (no torch, nothing of this project), the model read from an ``.npz``, Pillow per
file, batches of 1,024, a CSV out. The benchmark exports the model it trained
(``bench.common.export_model``).

    python bench/plain_script.py DIR MODEL.npz OUT.csv

Prints one JSON line: images scored and seconds from the first file listed to the CSV closed
(the model is read before the clock starts, as the workers load theirs before a run).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import numpy as np
from PIL import Image

BATCH = 1024
HEADER = ["path", "label", "pred_l1", "pred_l2", "pred_sgd", "dist_l1", "dist_l2", "prob_sgd"]


def load_model(path: str) -> dict[str, np.ndarray]:
    """The classes, the ideal images as rows of pixels, and the SGD weights and bias."""
    with np.load(path) as npz:
        model = {name: npz[name] for name in ("classes", "ideals", "weights", "bias")}
    model["ideals"] = model["ideals"].reshape(len(model["ideals"]), -1)
    return model


def png_files(root: str) -> list[str]:
    """Every ``.png`` below ``root``, as paths relative to it, sorted."""
    found = []
    for folder, _dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found += [prefix + name for name in files if name.endswith(".png")]
    return sorted(found)


def score(pixels: np.ndarray, model: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Predictions and distances of an ``n x h x w`` uint8 stack: L1 and L2 to each ideal
    image, the SGD model's softmax."""
    x = pixels.reshape(len(pixels), -1).astype(np.float32) / np.float32(255)
    diff = x[:, None, :] - model["ideals"][None, :, :]
    l1 = np.abs(diff).mean(axis=2)
    l2 = np.sqrt(np.square(diff).mean(axis=2))
    logits = x @ model["weights"] + model["bias"]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = exp / exp.sum(axis=1, keepdims=True)
    p1, p2, ps = l1.argmin(axis=1), l2.argmin(axis=1), probs.argmax(axis=1)
    rows = np.arange(len(x))
    return [p1, p2, ps, l1[rows, p1], l2[rows, p2], probs[rows, ps]]


def score_directory(root: str, out: str, model: dict[str, np.ndarray]) -> int:
    """Score every PNG below ``root`` into the CSV ``out``; returns the number of images."""
    paths = png_files(root)
    names = [str(c) for c in model["classes"]]
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for start in range(0, len(paths), BATCH):
            chunk = paths[start : start + BATCH]
            stack = np.stack([np.asarray(Image.open(os.path.join(root, p))) for p in chunk])
            p1, p2, ps, d1, d2, prob = (a.tolist() for a in score(stack, model))
            for p, a, b, c, x, y, z in zip(chunk, p1, p2, ps, d1, d2, prob, strict=True):
                folder = p.rpartition("/")[0].rpartition("/")[2]
                label = folder if folder in names else ""
                writer.writerow([p, label, names[a], names[b], names[c], x, y, z])
    return len(paths)


def main(argv: list[str]) -> None:
    root, model_path, out = argv[0], argv[1], argv[2]
    model = load_model(model_path)
    start = time.perf_counter()
    n = score_directory(root, out, model)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": n, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])
