"""The same images scored on the CPU and on a GPU: how far the two devices' results are apart.

    python -m bench.gpu_compare [--device cuda:0]

Scores the 5,000 shipped digits with the benchmark's model on both devices and prints the
largest difference in distance and probability and the predictions that flipped, against
:data:`BOUNDS`; exits 1 when a bound is exceeded (and 2 when the device has no CUDA).

Why the results can differ at all: the pixel scaling is the same bits on both devices (a table
of the CPU's quotients, ``core.scoring.pixel_table``), but the means over 784 pixels and the
matrix product are summed in a different order on each device, so each distance, logit and
probability may differ in its last bits (float32: a relative 6e-8 per rounding; tree-shaped
sums of 784 terms keep the total to about 1e-6 relative). A prediction flips only where two
classes are closer than that. The bounds below are stated with a wide margin over that
estimate; they have not been measured on a GPU here. They assume TF32 is off for float32
matrix products, torch's default (``torch.backends.cuda.matmul.allow_tf32 = False``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from core.classifier import Classifier
from core.scoring import score_stack

#: The largest CPU/GPU differences accepted: distances and probabilities (both in 0-1, absolute)
#: and the fraction of predictions (three per image) that differ.
BOUNDS = {"max_distance_diff": 1e-5, "max_prob_diff": 1e-5, "flipped_fraction": 1e-3}


def compare_devices(classifier: Classifier, stack: np.ndarray, device: torch.device) -> dict:
    """Score ``stack`` (N x H x W uint8) on the CPU and on ``device``; their differences."""
    cpu = score_stack(classifier, stack, torch.device("cpu"))
    other = score_stack(classifier.to(device), stack, device)
    flipped = sum(
        int((getattr(cpu, name) != getattr(other, name)).sum())
        for name in ("pred_l1", "pred_l2", "pred_sgd")
    )
    distance = max(
        float((cpu.dist_l1 - other.dist_l1).abs().max()),
        float((cpu.dist_l2 - other.dist_l2).abs().max()),
    )
    return {
        "images": len(cpu),
        "max_distance_diff": distance,
        "max_prob_diff": float((cpu.prob_sgd - other.prob_sgd).abs().max()),
        "flipped": flipped,
        "flipped_fraction": flipped / (3 * len(cpu)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda:0", help="the device compared with the CPU")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{args.device}: torch sees no CUDA device", file=sys.stderr)
        return 2
    from bench.common import train_classifier
    from producer.sample_data import load_digits

    images, _labels = load_digits()
    found = compare_devices(train_classifier(), np.ascontiguousarray(images), device)
    print(f"CPU against {args.device}, {found['images']} images")
    failed = False
    for name, bound in BOUNDS.items():
        ok = found[name] <= bound
        failed |= not ok
        print(f"  {name:18} {found[name]:.3g}  (bound {bound:g})  {'ok' if ok else 'EXCEEDED'}")
    print(f"  {'flipped':18} {found['flipped']} of {3 * found['images']} predictions")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
