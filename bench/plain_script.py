"""What a user writes by hand instead of running digitscore: one process, Pillow per file,
a stack of 512, the same models and scoring function, a CSV out.

    python bench/plain_script.py DIR DATABASE_URL MODEL_ID OUT.csv [DEVICE]

Prints one JSON line: images scored and seconds from the first file listed to the CSV closed
(the model is loaded before the clock starts, as the workers load theirs before a run).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is the parent folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from core.scoring import score_tensor
from db.model_store import load_classifier
from db.session import get_engine

BATCH = 512
HEADER = ["path", "label", "pred_l1", "pred_l2", "pred_sgd", "dist_l1", "dist_l2", "prob_sgd"]


def score_directory(root: Path, out: Path, classifier, device: str = "cpu") -> int:
    """Score every PNG below ``root`` into the CSV ``out``; returns the number of images."""
    paths = sorted(root.rglob("*.png"))
    names = classifier.classes
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for start in range(0, len(paths), BATCH):
            chunk = paths[start : start + BATCH]
            stack = np.stack([np.array(Image.open(p)) for p in chunk])
            s = score_tensor(classifier, torch.from_numpy(stack).to(device))
            columns = zip(chunk, s.pred_l1.tolist(), s.pred_l2.tolist(), s.pred_sgd.tolist(),
                          s.dist_l1.tolist(), s.dist_l2.tolist(), s.prob_sgd.tolist(), strict=True)
            for p, l1, l2, sgd, d1, d2, prob in columns:
                label = p.parent.name if p.parent.name in names else ""
                writer.writerow([p.relative_to(root).as_posix(), label,
                                 names[l1], names[l2], names[sgd], d1, d2, prob])
    return len(paths)


def main(argv: list[str]) -> None:
    root, url, model_id, out = Path(argv[0]), argv[1], int(argv[2]), Path(argv[3])
    device = argv[4] if len(argv) > 4 else "cpu"
    with get_engine(url).connect() as conn:
        classifier = load_classifier(conn, model_id).to(device)
    start = time.perf_counter()
    n = score_directory(root, out, classifier, device)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": n, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])
