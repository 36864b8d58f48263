"""Which stored image channel holds which MRI modality (behind ``tumorseg-channels``).

The Kaggle h5 slices do not document their channel order. For the first N labelled cases this
prints, per stored channel, the mean intensity (z-scored per volume over brain voxels) inside
each region: background brain, necrosis (NCR), edema (ED) and enhancing tumour (ET). Then it
guesses the order from how the modalities look:

- T2: necrosis (fluid) is brightest;
- FLAIR: of the rest, edema is brightest (FLAIR suppresses fluid, not edema);
- T1ce: of the rest, the enhancing rim is brightest (contrast agent); T1 is the last one.

and says whether the guess matches the configured order (``--channel-order``).

Then it checks what each one-hot mask channel of a Kaggle copy holds (``--mask-order``,
default ``ncr,ed,et``), from what the labels look like under the configured order:

- ET is the rim that is bright on T1ce: the label with the highest mean T1ce;
- edema is outermost (of the rest, the label holding most of the tumour's outer surface) and
  brightest on FLAIR;
- NCR is the remaining one, and lies inside the ET envelope (each axial slice's ET region with
  its holes filled).

A swapped mask exchanges ET and NCR while WT and TC still look fine, so this is checked too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tumorseg.core.errors import DataError
from tumorseg.core.labels import MASK_LABELS, MASK_ORDER, check_mask_order
from tumorseg.data.case import MODALITIES, Case
from tumorseg.data.preprocess import zscore
from tumorseg.data.readers import list_cases

TISSUES = ("brain", "NCR", "ED", "ET")  # background brain, then canonical labels 1, 2, 3


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
    lines = [f"{'channel':>7}  {'configured':<10}" + "".join(f"{r:>8}" for r in TISSUES)]
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
    mask_order: tuple[str, ...] = MASK_ORDER,
) -> str:
    """The report on the first ``cases`` labelled cases of ``root``; bad input raises
    ``DataError``."""
    mask_order = check_mask_order(mask_order, "--mask-order")
    refs = list_cases(
        root, fmt, labelled=True, channel_order=order, convention=labels, mask_order=mask_order
    )
    if not refs:
        raise DataError(f"{root}: no labelled cases")
    refs = refs[:cases]
    sums, counts = np.zeros((4, 4)), np.zeros(4)
    kaggle = refs[0].format == "kaggle-h5"
    masks = np.zeros((3, 5))
    for ref in refs:
        case = ref.load()
        case_sums, case_counts = region_sums(case)
        sums, counts = sums + case_sums, counts + case_counts
        if kaggle:
            masks += mask_sums(case)
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
    lines = [head, table(stored, configured), tail]
    if kaggle:
        lines += ["", *mask_report(masks, mask_order, len(refs))]
    return "\n".join(lines)


# ---------------------------------------------------------------- the mask channels

MASK_ROWS = ("T1ce", "FLAIR", "outer surface", "inside ET envelope")


def mask_sums(case: Case) -> np.ndarray:
    """Per canonical label 1..3 (rows): T1ce and FLAIR z-sums, voxels on the whole tumour's
    outer surface, voxels inside the ET envelope, and the voxel count (columns)."""
    from scipy import ndimage

    z = zscore(case.image)
    t1ce, flair = z[MODALITIES.index("t1ce")], z[MODALITIES.index("flair")]
    tumour = case.seg > 0
    outer = tumour & ~ndimage.binary_erosion(tumour)
    envelope = np.zeros_like(tumour)
    et = case.seg == 3
    for k in np.flatnonzero(et.any((0, 1))):
        envelope[..., k] = ndimage.binary_fill_holes(et[..., k])
    out = np.zeros((3, 5))
    for row, label in enumerate((1, 2, 3)):
        mask = case.seg == label
        out[row] = (
            t1ce[mask].sum(dtype=np.float64),
            flair[mask].sum(dtype=np.float64),
            np.count_nonzero(mask & outer),
            np.count_nonzero(mask & envelope),
            np.count_nonzero(mask),
        )
    return out


def mask_table(sums: np.ndarray) -> np.ndarray:
    """``(3 labels, 4)``: mean T1ce, mean FLAIR, share of the outer surface, share inside the
    ET envelope (NaN for a label without voxels)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack(
            [
                sums[:, 0] / sums[:, 4],
                sums[:, 1] / sums[:, 4],
                sums[:, 2] / sums[:, 2].sum(),
                sums[:, 3] / sums[:, 4],
            ],
            axis=1,
        )


def guess_mask(table: np.ndarray) -> tuple[str, str, str] | None:
    """What canonical labels 1, 2, 3 (as read) really are: ``ncr``/``ed``/``et`` each, or None
    when a label has no voxels."""
    if np.isnan(table[:, :3]).any():
        return None
    left = [0, 1, 2]
    et = max(left, key=lambda r: table[r, 0])  # brightest on T1ce
    left.remove(et)
    ed = max(left, key=lambda r: (table[r, 2], table[r, 1]))  # outermost, then FLAIR
    left.remove(ed)
    names = {et: "et", ed: "ed", left[0]: "ncr"}
    return tuple(names[r] for r in range(3))


def mask_verdict(guess: tuple[str, ...] | None, configured: tuple[str, ...], cases: int) -> str:
    """One line: what the mask channels hold, and whether that matches ``configured``."""
    if guess is None:
        return (
            f"mask verdict: cannot tell, a label has no voxels in {cases} cases (try more --cases)"
        )
    # channel c is read as configured[c] -> canonical label; guess says what that label is
    actual = tuple(guess[MASK_LABELS[name] - 1] for name in configured)
    shown = ",".join(actual)
    if actual == tuple(configured):
        return f"mask verdict: mask channels look like {shown}: matches the configured order"
    return (
        f"mask verdict: mask channels look like {shown}: DIFFERS from the configured order "
        f"{','.join(configured)} (pass --mask-order {shown} / data.mask_order=[{shown}])"
    )


def mask_report(sums: np.ndarray, configured: tuple[str, ...], cases: int) -> list[str]:
    """Lines on the mask channels, from ``mask_sums`` over ``cases`` cases read with
    ``configured``."""
    table = mask_table(sums)
    names = {MASK_LABELS[n]: n for n in configured}
    lines = [
        "mask channels (as configured): mean z-scored T1ce and FLAIR, share of the tumour's "
        "outer surface, share inside the ET envelope",
        f"{'channel':>7}  {'configured':<10}" + "".join(f"{r:>20}" for r in MASK_ROWS),
    ]
    for channel, name in enumerate(configured):
        row = table[MASK_LABELS[name] - 1]
        cells = "".join("                 n/a" if np.isnan(v) else f"{v:20.2f}" for v in row)
        lines.append(f"{channel:>7}  {name:<10}{cells}")
    guess = guess_mask(table)
    lines.append(mask_verdict(guess, configured, cases))
    if guess is not None:
        ncr = guess.index("ncr")
        lines.append(
            f"NCR ({names[ncr + 1]} as configured): {table[ncr, 3]:.0%} of it lies inside the "
            "ET envelope"
        )
    return lines
