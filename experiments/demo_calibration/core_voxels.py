"""What the nets predict where a lower-grade reference has non-enhancing tumour core.

    python experiments/demo_calibration/core_voxels.py --references HELD \
        --predictions 6=PRED_DIR_6 18=PRED_DIR_18

For each lower-grade reference case in HELD (enhancing tumour under 15 % of the tumour core,
as in plot.py) and each ``tumorseg-predict`` output folder: the share of the reference's
non-enhancing core voxels predicted as background, necrosis/non-enhancing core, edema and
enhancing tumour; then the median and range of the enhancing share per folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from plot import lower_grade

from tumorseg.core.labels import to_canonical
from tumorseg.data.case import read_nifti
from tumorseg.evaluation.references import reference_files

# Canonical labels: 0 background, 1 NCR/NET, 2 edema, 3 enhancing tumour.
NAMES = {0: "background", 1: "core", 2: "edema", 3: "enhancing"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", type=Path, required=True)
    parser.add_argument("--predictions", nargs="+", required=True, metavar="LABEL=DIR")
    args = parser.parse_args()
    folders = dict(item.split("=", 1) for item in args.predictions)
    refs = reference_files(args.references)
    enhancing = {label: [] for label in folders}
    print("| case | core voxels | " + " | ".join(folders) + " |")
    print("|---|---:|" + "---|" * len(folders))
    for case_id, low in sorted(lower_grade(args.references).items()):
        if not low:
            continue
        ref = refs[case_id]
        raw, _ = read_nifti(ref.path, dtype=None)
        core = to_canonical(raw, ref.convention or "brats2020", str(ref.path)) == 1
        cells = []
        for label, folder in folders.items():
            pred, _ = read_nifti(Path(folder) / f"{case_id}.nii.gz", dtype=None)
            values = to_canonical(pred, "brats2020", folder)[core]
            shares = {k: float((values == k).mean()) for k in NAMES}
            enhancing[label].append(shares[3])
            cells.append(" ".join(f"{NAMES[k]} {v:.2f}" for k, v in shares.items()))
        print(f"| {case_id} | {int(core.sum())} | " + " | ".join(cells) + " |")
    print()
    for label, values in enhancing.items():
        print(
            f"{label}: enhancing share median {np.median(values):.2f}, "
            f"range {min(values):.2f}-{max(values):.2f} ({len(values)} lower-grade patients)"
        )


if __name__ == "__main__":
    main()
