"""Score predicted segmentations against references, per case and BraTS region (WT, TC, ET).

``tumorseg-evaluate`` pairs prediction files ``PRED/<case_id>.nii[.gz]`` with references
``REF/<case_id>.nii[.gz]`` or BraTS case folders ``REF/<case_id>/<case_id>_seg.nii[.gz]``,
converts both to canonical labels and computes, per case and region, Dice, IoU, pixel accuracy,
sensitivity, specificity and HD95 (mm, voxel spacing from the reference's header)::

    tumorseg-evaluate --predictions preds --references data/BraTS2020 --output out/metrics.csv

It writes ``metrics.csv`` (one row per case and region), ``metrics_summary.csv`` (mean,
median, std and a bootstrap 95% CI of the mean per metric and region) and
``metrics_boxplot.png`` (Dice and HD95 per region), all atomically, and prints the means.
``--mlflow-run ID`` also logs the means as ``case/<metric>_<region>`` and the three files as
artifacts of that run.

Empty-mask rules (as BraTS), for each region:

* Dice, IoU: both masks empty -> 1; exactly one empty -> 0.
* HD95: both empty -> 0; exactly one empty -> 373.13 mm (the diagonal of a BraTS volume).
* Sensitivity: empty reference -> 1 if the prediction is empty too, else 0.
* Specificity: reference covering the whole volume (no negatives) -> 1.

HD95 pools the surface distances of both directions (prediction -> reference and reference ->
prediction) and takes their 95th percentile, as MedPy's ``hd95`` does.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from tumorseg import cli
from tumorseg.cli import ArgError, Parser
from tumorseg.data.nifti import SUFFIXES, find_nifti
from tumorseg.errors import DataError
from tumorseg.labels import CONVENTIONS, REGIONS, to_canonical

if TYPE_CHECKING:
    from mlflow import MlflowClient

PROG = "tumorseg-evaluate"
METRICS = ("dice", "iou", "accuracy", "sensitivity", "specificity", "hd95")
COLUMNS = ("case_id", "region", *METRICS)
EMPTY_HD95 = 373.13  # mm, diagonal of the 240 x 240 x 155 BraTS volume at 1 mm
HD95_MARGIN = 1  # voxels of padding around the masks' bounding box (enough for the erosion)
RESAMPLES, SEED = 2000, 0  # bootstrap of the mean

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- metrics


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of ``mask``'s bounding box padded by ``margin`` voxels (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        start = max(int(hits[0]) - margin, 0)
        stop = min(int(hits[-1]) + 1 + margin, mask.shape[axis])
        box.append(slice(start, stop))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its binary erosion (face connectivity)."""
    return mask & ~ndimage.binary_erosion(mask)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th percentile Hausdorff distance (mm) between boolean masks.

    Distances from each surface voxel of one mask to the nearest surface voxel of the other, in
    both directions, pooled; computed on the masks' padded bounding box, which holds every
    surface voxel, so the result equals the one on the full volume.
    """
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return EMPTY_HD95
    box = bounding_box(pred | ref, HD95_MARGIN)
    pred_surface, ref_surface = surface(pred[box]), surface(ref[box])
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def mask_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """All of ``METRICS`` for two boolean masks (empty-mask rules in the module docstring)."""
    tp = np.count_nonzero(pred & ref)
    fp = np.count_nonzero(pred) - tp
    fn = np.count_nonzero(ref) - tp
    tn = pred.size - tp - fp - fn
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "accuracy": (tp + tn) / pred.size,
        "sensitivity": tp / (tp + fn) if tp + fn else float(fp == 0),
        "specificity": tn / (tn + fp) if tn + fp else 1.0,
        "hd95": hd95(pred, ref, spacing),
    }


def case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]
) -> dict[str, dict[str, float]]:
    """Metrics of one case: region (``wt``, ``tc``, ``et``) -> metric -> value.

    ``pred`` and ``ref`` are canonical label volumes (0 background, 1 NCR, 2 ED, 3 ET) of the
    same shape; ``spacing`` is the voxel size in mm along each axis (used for HD95).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {ref.ndim}D volume")
    out = {}
    for region, labels in REGIONS.items():
        out[region] = {
            name: float(value)
            for name, value in mask_metrics(
                np.isin(pred, labels), np.isin(ref, labels), spacing
            ).items()
        }
    return out


# ---------------------------------------------------------------- summary


def bootstrap_ci(
    values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Percentile 95% CI of the mean from ``resamples`` seeded bootstrap resamples."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    low, high = np.percentile(values[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def summarise(df: pd.DataFrame, resamples: int = RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """Per metric and region of a per-case table: n, mean, median, std (ddof 1), 95% CI.

    ``df`` has the columns of ``metrics.csv``; the result has one row per metric and region
    (in ``METRICS`` and ``REGIONS`` order) and columns metric, region, n, mean, median, std,
    ci_low, ci_high. Each group's bootstrap uses the same ``seed``.
    """
    rows = []
    for metric in METRICS:
        for region in REGIONS:
            values = df.loc[df["region"] == region, metric].dropna().to_numpy(dtype=float)
            if not len(values):
                continue
            low, high = bootstrap_ci(values, resamples, seed)
            rows.append(
                {
                    "metric": metric,
                    "region": region,
                    "n": len(values),
                    "mean": values.mean(),
                    "median": float(np.median(values)),
                    "std": values.std(ddof=1) if len(values) > 1 else float("nan"),
                    "ci_low": low,
                    "ci_high": high,
                }
            )
    return pd.DataFrame(rows)


def means_table(summary: pd.DataFrame) -> str:
    """Compact text table of the means: one row per region, one column per metric."""
    means = summary.pivot(index="region", columns="metric", values="mean")
    means = means.reindex(index=[r for r in REGIONS if r in means.index], columns=list(METRICS))
    lines = ["region " + " ".join(f"{m:>11}" for m in METRICS)]
    for region, row in means.iterrows():
        lines.append(f"{region.upper():<6} " + " ".join(f"{v:>11.4f}" for v in row))
    return "\n".join(lines)


def save_boxplot(df: pd.DataFrame, path: Path) -> None:
    """Box plot of Dice and HD95 per region, one panel each, as PNG."""
    # imported here: seaborn and matplotlib are slow to import and only needed for this plot
    import seaborn as sns
    from matplotlib.figure import Figure

    data = df.assign(region=df["region"].str.upper())
    order = [r.upper() for r in REGIONS]
    fig = Figure(figsize=(9, 4), layout="constrained")
    for ax, metric, title in zip(
        fig.subplots(1, 2), ("dice", "hd95"), ("Dice", "HD95 (mm)"), strict=True
    ):
        sns.boxplot(data=data, x="region", y=metric, order=order, ax=ax, color="lightsteelblue")
        sns.stripplot(data=data, x="region", y=metric, order=order, ax=ax, color="0.2", size=3)
        ax.set(title=title, xlabel="", ylabel=title)
    fig.suptitle(f"{df['case_id'].nunique()} cases")
    fig.savefig(path, format="png", dpi=100)


# ---------------------------------------------------------------- files


@dataclass
class Pair:
    """A prediction and its reference file."""

    case_id: str
    pred: Path
    ref: Path


def strip_suffix(name: str) -> str | None:
    """Case id of a NIfTI file name, or None for other files."""
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def nifti_files(folder: Path) -> dict[str, Path]:
    """Case id -> NIfTI file directly in ``folder`` (``.nii.gz`` preferred over ``.nii``)."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name.endswith(".nii")):
        cid = strip_suffix(path.name)
        if cid and not path.name.startswith(".") and path.is_file():
            files.setdefault(cid, path)
    return files


def reference_files(folder: Path) -> dict[str, Path | None]:
    """Case id -> reference: ``<id>.nii[.gz]`` or ``<id>/<id>_seg.nii[.gz]``.

    A sub-folder without a seg file maps to None (reported only if a prediction names it).
    """
    refs: dict[str, Path | None] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.name.startswith("."):
            refs[path.name] = find_nifti(path, f"{path.name}_seg")
    for cid, path in nifti_files(folder).items():
        if refs.get(cid) is None:
            refs[cid] = path
    return refs


def pair_cases(pred_dir: Path, ref_dir: Path) -> tuple[list[Pair], dict[str, str]]:
    """Pairs by case id, and problems: case id -> why it has no partner."""
    preds, refs = nifti_files(pred_dir), reference_files(ref_dir)
    pairs, problems = [], {}
    for cid in sorted(set(preds) | {c for c, p in refs.items() if p is not None}):
        if cid not in preds:
            problems[cid] = f"no prediction {pred_dir / cid}.nii.gz"
        elif refs.get(cid) is None:
            problems[cid] = (
                f"no reference {ref_dir / cid}.nii.gz or {ref_dir / cid / cid}_seg.nii.gz"
            )
        else:
            pairs.append(Pair(cid, preds[cid], refs[cid]))
    return pairs, problems


def load(path: Path) -> nib.Nifti1Image:
    """NIfTI image proxy (header only); a read failure becomes a one-line DataError."""
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises several types for broken files
        raise DataError(f"{path}: cannot read NIfTI ({err})") from None


def voxels(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """Voxel array of an image; a read failure (e.g. truncated gzip) becomes a DataError."""
    try:
        return np.asarray(img.dataobj)
    except Exception as err:
        raise DataError(f"{path}: cannot read NIfTI ({err})") from None


def check_shapes(pairs: list[Pair]) -> dict[str, str]:
    """Case id -> shape mismatch, from the headers. Raises DataError for a non-3D volume."""
    problems = {}
    for pair in pairs:
        pred_shape, ref_shape = load(pair.pred).shape, load(pair.ref).shape
        for path, shape in ((pair.pred, pred_shape), (pair.ref, ref_shape)):
            if len(shape) != 3:
                raise DataError(f"{path}: expected a 3D volume, got shape {shape}")
        if pred_shape != ref_shape:
            problems[pair.case_id] = (
                f"prediction shape {pred_shape} ({pair.pred.name}) differs from "
                f"reference {ref_shape} ({pair.ref.name})"
            )
    return problems


def score_pair(pair: Pair, pred_labels: str, ref_labels: str) -> list[dict[str, object]]:
    """Rows of ``metrics.csv`` for one case."""
    pred_img, ref_img = load(pair.pred), load(pair.ref)
    spacing = tuple(float(s) for s in ref_img.header.get_zooms()[:3])
    pred_spacing = tuple(float(s) for s in pred_img.header.get_zooms()[:3])
    if not np.allclose(pred_spacing, spacing, atol=1e-3):
        log.warning(
            "case %s: prediction spacing %s differs from reference %s; using the reference",
            pair.case_id,
            pred_spacing,
            spacing,
        )
    pred = to_canonical(voxels(pred_img, pair.pred), pred_labels, str(pair.pred))
    ref = to_canonical(voxels(ref_img, pair.ref), ref_labels, str(pair.ref))
    scores = case_metrics(pred, ref, spacing)
    return [{"case_id": pair.case_id, "region": r, **m} for r, m in scores.items()]


def score_all(
    pairs: list[Pair], pred_labels: str, ref_labels: str, progress: bool = True
) -> pd.DataFrame:
    """Per-case table over ``pairs`` with a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import track

    rows = []
    console = Console(stderr=True)
    for pair in track(
        pairs, description="Scoring cases", console=console, transient=True, disable=not progress
    ):
        rows.extend(score_pair(pair, pred_labels, ref_labels))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def output_paths(output: Path) -> dict[str, Path]:
    """The three output files: per-case CSV, summary CSV and box plot, side by side."""
    return {
        "metrics": output,
        "summary": output.with_name(f"{output.stem}_summary.csv"),
        "boxplot": output.with_name(f"{output.stem}_boxplot.png"),
    }


def write_atomically(writers: Iterable[tuple[Path, Callable[[Path], None]]]) -> None:
    """Call each ``writer(tmp)`` on a temporary file beside its target, then rename all.

    If any writer fails, every temporary file is removed and no target is touched.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for target, writer in writers:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            os.close(fd)
            temps.append((Path(name), target))
            writer(Path(name))
        for tmp, target in temps:
            os.replace(tmp, target)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def write_outputs(df: pd.DataFrame, summary: pd.DataFrame, paths: dict[str, Path]) -> None:
    write_atomically(
        [
            (paths["metrics"], lambda p: df.to_csv(p, index=False)),
            (paths["summary"], lambda p: summary.to_csv(p, index=False)),
            (paths["boxplot"], lambda p: save_boxplot(df, p)),
        ]
    )


# ---------------------------------------------------------------- MLflow


def tracking_uri(given: str | None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``mlruns/mlflow.db`` here."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns/mlflow.db"


def mlflow_client(run_id: str, uri: str) -> MlflowClient:
    """Client for ``uri`` after checking that ``run_id`` exists there (DataError if not)."""
    # imported here: mlflow is slow to import and only needed with --mlflow-run
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    # a missing SQLite file would be created empty; say it is missing instead
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise DataError(f"MLflow store {uri} does not exist")
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"MLflow run {run_id} at {uri}: {message}") from None
    return client


def log_to_mlflow(
    client: MlflowClient, run_id: str, summary: pd.DataFrame, paths: dict[str, Path]
) -> None:
    """Means as ``case/<metric>_<region>`` metrics and the output files as artifacts."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"case/{row.metric}_{row.region}", float(row.mean), now, 0)
        for row in summary.itertuples()
    ]
    client.log_batch(run_id, metrics=metrics)
    for path in paths.values():
        client.log_artifact(run_id, str(path), artifact_path="evaluation")


# ---------------------------------------------------------------- command line


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Score predicted BraTS segmentations per region.")
    add = parser.add_argument
    conventions = sorted(CONVENTIONS)
    add("--predictions", type=Path, required=True, help="folder of <case_id>.nii[.gz] files")
    add("--references", type=Path, required=True, help="<case_id>.nii[.gz] or case folders")
    add("--output", type=Path, default=Path("metrics.csv"), help="per-case CSV (./metrics.csv)")
    add("--labels", choices=conventions, default="brats2020", help="label convention")
    add("--pred-labels", choices=conventions, help="predictions' convention (default --labels)")
    add("--allow-missing", action="store_true", help="skip unpaired or mismatched cases")
    add("--mlflow-run", metavar="ID", help="log means and files to this MLflow run")
    add("--tracking-uri", metavar="URI", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI)")
    add("--overlays", type=Path, metavar="DIR", help="three-view overlay PNG per case here")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag, folder in (("--predictions", args.predictions), ("--references", args.references)):
        if not folder.is_dir():
            raise ArgError(f"{flag} {folder} is not a folder")
    if args.output.is_dir():
        raise ArgError(f"--output {args.output} is a folder")


def error(message: str) -> None:
    cli.error(PROG, message)


def select_pairs(args: argparse.Namespace) -> tuple[list[Pair], dict[str, str]]:
    """Pairs to score and skipped cases; DataError when nothing can be scored."""
    pairs, problems = pair_cases(args.predictions, args.references)
    problems.update(check_shapes(pairs))
    pairs = [p for p in pairs if p.case_id not in problems]
    if problems and not args.allow_missing:
        for cid, why in sorted(problems.items()):
            error(f"case {cid}: {why}")
        raise DataError(
            f"{len(problems)} case(s) unpaired or mismatched; nothing written "
            "(--allow-missing skips them)"
        )
    for cid, why in sorted(problems.items()):
        log.warning("skipping case %s: %s", cid, why)
    if not pairs:
        raise DataError(f"no cases to score in {args.predictions} and {args.references}")
    return pairs, problems


def write_overlays(pairs: list[Pair], folder: Path, pred_labels: str, ref_labels: str) -> int:
    """``folder/<case_id>.png`` (FLAIR, truth solid, prediction dashed) for each pair whose
    reference sits in a BraTS case folder with its FLAIR; returns how many were written."""
    from tumorseg.overlay import overlay_figure

    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for pair in pairs:
        flair = find_nifti(pair.ref.parent, f"{pair.case_id}_flair")
        if flair is None:
            continue
        img = load(flair)
        pred = to_canonical(voxels(load(pair.pred), pair.pred), pred_labels, str(pair.pred))
        ref = to_canonical(voxels(load(pair.ref), pair.ref), ref_labels, str(pair.ref))
        fig = overlay_figure(voxels(img, flair), ref, pred, img.affine, title=pair.case_id)
        write_atomically(
            [(folder / f"{pair.case_id}.png", lambda p, f=fig: f.savefig(p, format="png", dpi=80))]
        )
        written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0, 2 for bad input (nothing written) or 1 if writing fails."""
    args = cli.start(PROG, lambda: cli.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args

    paths = output_paths(args.output)
    uri = tracking_uri(args.tracking_uri)
    try:
        client = mlflow_client(args.mlflow_run, uri) if args.mlflow_run else None
        pairs, skipped = select_pairs(args)
        df = score_all(pairs, args.pred_labels or args.labels, args.labels, not args.quiet)
    except DataError as err:
        error(str(err))
        return 2

    summary = summarise(df)
    try:
        write_outputs(df, summary, paths)
    except OSError as err:
        error(f"cannot write {args.output}: {err}")
        return 1

    print(f"{len(pairs)} cases, means:")
    print(means_table(summary))
    if skipped:
        print(f"skipped {len(skipped)} case(s): " + ", ".join(sorted(skipped)))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.overlays:
        try:
            n = write_overlays(pairs, args.overlays, args.pred_labels or args.labels, args.labels)
        except (DataError, OSError) as err:
            error(f"overlays: {err}")
            return 1
        print(f"wrote {n} overlay(s) to {args.overlays}")

    if client is not None:
        try:
            log_to_mlflow(client, args.mlflow_run, summary, paths)
        except Exception as err:  # network or store failures: the files are already written
            error(f"cannot log to MLflow run {args.mlflow_run} at {uri}: {err}")
            return 1
        print(f"logged to MLflow run {args.mlflow_run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
