"""Example demo cases: one axial slice through the tumour, four contrasts and the labels.

    python experiments/demo_calibration/cases.py [--output DIR]

Rows: easy case 1, then realistic cases 1 (high grade), 7 (lower grade) and 10. Writes
``demo_cases.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from tumorseg.data.case import MODALITIES  # noqa: E402
from tumorseg.data.demo import make_case  # noqa: E402

CASES = (("easy", 1), ("brats", 1), ("brats", 7), ("brats", 10))
# label colours: 1 necrosis / non-enhancing core, 2 edema, 4 enhancing tumour
LABELS = ListedColormap(["none", "tab:blue", "tab:green", "none", "tab:red"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    fig, axes = plt.subplots(len(CASES), 5, figsize=(12.5, 2.6 * len(CASES)))
    for row, (difficulty, index) in zip(axes, CASES, strict=True):
        images, seg = make_case(index, seed=0, difficulty=difficulty)
        z = int(np.argmax((seg > 0).sum(axis=(0, 1))))  # the slice with most tumour
        for ax, name in zip(row[:4], MODALITIES, strict=True):
            ax.imshow(np.rot90(images[name][:, :, z]), cmap="gray")
            ax.set_title(f"{difficulty} {index}: {name}", fontsize=9)
        row[4].imshow(np.rot90(images["flair"][:, :, z]), cmap="gray")
        labels = np.ma.masked_equal(np.rot90(seg[:, :, z]), 0)
        row[4].imshow(labels, cmap=LABELS, vmin=0, vmax=4, interpolation="nearest", alpha=0.6)
        row[4].set_title("labels (NCR/NET blue, ED green, ET red)", fontsize=9)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    args.output.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output / "demo_cases.png", dpi=80)


if __name__ == "__main__":
    main()
