"""Which stored image channel holds which MRI modality (behind ``tumorseg-channels``).

The Kaggle h5 slices do not document their channel order. For the first N labelled cases this
prints, per stored channel, the mean intensity (z-scored per volume over brain voxels) inside
each region: background brain, necrosis (NCR), edema (ED) and enhancing tumour (ET). Then it
guesses the order from how the modalities look:

- T2: necrosis (fluid) is brightest;
- FLAIR: of the rest, edema is brightest (FLAIR suppresses fluid, not edema);
- T1ce: of the rest, the enhancing rim is brightest (contrast agent); T1 is the last one.

and says whether the guess matches the configured order (``--channel-order``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tumorseg.data.nifti import MODALITIES, Case
from tumorseg.data.preprocess import zscore
from tumorseg.data.readers import list_cases
from tumorseg.errors import DataError

REGIONS = ("brain", "NCR", "ED", "ET")  # background brain, then canonical labels 1, 2, 3


def region_sums(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Sums of z-scored intensity ``(4 modalities, 4 regions)`` and voxel counts ``(4,)``."""
    z = zscore(case.image)
    brain = (case.image != 0).any(0)
    masks = [brain & (case.seg == 0), case.seg == 1, case.seg == 2, case.seg == 3]
    sums = np.stack([z[:, m].sum(1, dtype=np.float64) for m in masks], axis=1)
    return sums, np.array([m.sum() for m in masks], dtype=np.float64)


def guess_order(means: np.ndarray) -> tuple[str, ...] | None:
    """Modality of each stored channel from its region means ``(4, 4)``; None if a region is
    missing (no voxels)."""
    if np.isnan(means[:, 1:]).any():
        return None
    left = [0, 1, 2, 3]
    names: dict[int, str] = {}
    for name, region in (("t2", 1), ("flair", 2), ("t1ce", 3)):
        best = max(left, key=lambda c, r=region: means[c, r])
        names[best] = name
        left.remove(best)
    names[left[0]] = "t1"
    return tuple(names[c] for c in range(4))


def verdict(guess: tuple[str, ...] | None, configured: tuple[str, ...], cases: int) -> str:
    """One line: the guessed order and whether it matches ``configured``."""
    if guess is None:
        return f"verdict: cannot tell, a region has no voxels in {cases} cases (try more --cases)"
    shown = ",".join(guess)
    if guess == tuple(configured):
        return f"verdict: channels look like {shown}: matches the configured order"
    return (
        f"verdict: channels look like {shown}: DIFFERS from the configured order "
        f"{','.join(configured)} (pass --channel-order {shown} / channel_order={guess})"
    )


def table(means: np.ndarray, configured: tuple[str, ...]) -> str:
    """Fixed-width table: one row per stored channel, one column per region."""
    lines = [f"{'channel':>7}  {'configured':<10}" + "".join(f"{r:>8}" for r in REGIONS)]
    for k, name in enumerate(configured):
        cells = "".join("     n/a" if np.isnan(v) else f"{v:8.2f}" for v in means[k])
        lines.append(f"{k:>7}  {name:<10}{cells}")
    return "\n".join(lines)


def channel_report(
    root: Path,
    fmt: str = "auto",
    cases: int = 5,
    order: tuple[str, ...] = MODALITIES,
    labels: str | None = None,
) -> str:
    """The report on the first ``cases`` labelled cases of ``root``; bad input raises
    ``DataError``."""
    refs = list_cases(root, fmt, labelled=True, channel_order=order, convention=labels)
    if not refs:
        raise DataError(f"{root}: no labelled cases")
    refs = refs[:cases]
    sums, counts = np.zeros((4, 4)), np.zeros(4)
    for ref in refs:
        case_sums, case_counts = region_sums(ref.load())
        sums, counts = sums + case_sums, counts + case_counts
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    # Rows in stored channel order (the reader put them in MODALITIES order).
    configured = order if refs[0].format == "kaggle-h5" else refs[0].channel_order
    if refs[0].format == "brats":
        configured = MODALITIES  # named by the files
    stored = means[[MODALITIES.index(m) for m in configured]]
    head = (
        f"{len(refs)} {refs[0].format} cases from {root}: mean intensity "
        "(z-scored per volume over brain voxels) per stored channel and region"
    )
    tail = verdict(guess_order(stored), configured, len(refs))
    return "\n".join([head, table(stored, configured), tail])
