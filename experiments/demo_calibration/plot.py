"""Table and learning curves of the demo calibration runs, read from MLflow.

    python experiments/demo_calibration/plot.py [--tracking-uri URI] [--output DIR]
        [--held-out LABEL=CSV ...] [--blocks 21-36 41-56 ...] [--references DIR]

Reads the runs of the MLflow experiment ``demo_calibration`` (with their status) and writes
``results.md`` (case-level test Dice, the epoch whose weights the run kept and its pooled
validation Dice, the best pooled validation Dice, epochs; with --held-out,
also the mean case Dice of each ``tumorseg-evaluate`` CSV, under its label, and the paired
difference of the last CSV against the first: per patient the mean of its WT, TC and ET Dice,
the mean difference with a 95 % bootstrap interval, and a Wilcoxon signed-rank p-value; with
--blocks, the same mean difference per range of case numbers; with --references, the held-out
reference folder, the mean Dice per grade: lower grade where the reference's enhancing tumour
is under 15 % of its tumour core) and
``learning_curves.png`` (pooled validation Dice per epoch, per region, one line per run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402

from tumorseg.tracking.client import default_tracking_uri  # noqa: E402

REGIONS = ("wt", "tc", "et", "mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment", default="demo_calibration")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent)
    parser.add_argument("--held-out", nargs="*", default=[], metavar="LABEL=CSV")
    parser.add_argument("--blocks", nargs="*", default=[], metavar="FIRST-LAST")
    parser.add_argument("--references", type=Path, default=None)
    args = parser.parse_args()
    client = MlflowClient(tracking_uri=args.tracking_uri or default_tracking_uri())
    exp = client.get_experiment_by_name(args.experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time"])
    rows, curves = [], {}
    for run in runs:
        epochs = int(run.data.params["trainer.max_epochs"])
        run_id = run.info.run_id
        hist = {}
        for r in REGIONS:
            history = client.get_metric_history(run_id, f"val/dice_{r}")
            hist[r] = sorted(history, key=lambda m: m.step)
        if not hist["mean"]:  # killed before its first validation
            continue
        curves[f"{epochs} epochs"] = hist
        m = run.data.metrics
        test = [m.get(f"test/dice_{r}", float("nan")) for r in ("wt", "tc", "et")]
        best = max(hist["mean"], key=lambda x: x.value)
        kept = kept_epoch(client, run_id)
        at_kept = f"{hist['mean'][kept - 1].value:.3f}" if kept else "–"
        rows.append(
            f"| {epochs} | {test[0]:.3f} | {test[1]:.3f} | {test[2]:.3f} | {sum(test) / 3:.3f} "
            f"| {kept or '–'} | {at_kept} | {best.value:.3f} | {len(hist['mean'])} "
            f"| {run.info.status} | `{run.info.run_id}` |"
        )
    table = [
        "| max epochs | test WT | test TC | test ET | test mean | kept epoch "
        "| val mean, kept (pooled) | best val mean | epochs logged | status | run |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *rows,
    ]
    if args.held_out:
        table += [
            "",
            "| checkpoint, patients | n | WT | TC | ET | mean |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        held = {}  # label -> WT/TC/ET Dice per case
        for item in args.held_out:
            label, csv = item.split("=", 1)
            dice = pd.read_csv(csv).pivot(index="case_id", columns="region", values="dice")
            held[label] = dice[["wt", "tc", "et"]]
            table.append(dice_row(label, held[label]))
        if len(held) > 1:
            (first, a), (last, b) = list(held.items())[0], list(held.items())[-1]
            diff = (b.mean(axis=1) - a.mean(axis=1)).dropna()
            table += ["", paired_difference(diff, first, last)]
            number = diff.index.str.extract(r"(\d+)$", expand=False).astype(int).to_numpy()
            for block in args.blocks:
                start, stop = (int(n) for n in block.split("-"))
                inside = diff[(number >= start) & (number <= stop)]
                table.append(f"- cases {block}: {inside.mean():+.3f} ({len(inside)} patients)")
        if args.references:
            table += ["", *by_grade(held, lower_grade(args.references))]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=True)
    for ax, region in zip(axes, REGIONS, strict=True):
        for name, hist in curves.items():
            values = [m.value for m in hist[region]]
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=name)
        ax.set_title(f"val/dice_{region} (pooled)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.output / "learning_curves.png", dpi=110)


def kept_epoch(client: MlflowClient, run_id: str) -> int | None:
    """The epoch (from 1) of the checkpoint the run kept, from its ``checkpoints/epoch_XXX.ckpt``
    artifact (XXX counts from 0)."""
    names = [Path(f.path).stem for f in client.list_artifacts(run_id, "checkpoints")]
    epochs = [int(n.split("_")[1]) for n in names if n.startswith("epoch_")]
    return epochs[-1] + 1 if epochs else None


def dice_row(label: str, dice: pd.DataFrame, *extra: str) -> str:
    """A Markdown row: label, extra columns, n, mean WT/TC/ET Dice and their mean."""
    mean = dice.mean()
    cells = [label, *extra, str(len(dice))]
    cells += [f"{mean[r]:.3f}" for r in ("wt", "tc", "et")] + [f"{mean.mean():.3f}"]
    return "| " + " | ".join(cells) + " |"


def lower_grade(folder: Path) -> dict[str, bool]:
    """Per reference case: True when its enhancing tumour is under 15 % of its tumour core
    (segmentations only, found as tumorseg-evaluate finds them)."""
    from tumorseg.core.labels import to_canonical
    from tumorseg.data.case import read_nifti
    from tumorseg.evaluation.references import reference_files

    grade = {}
    for case_id, ref in reference_files(folder).items():
        raw, _ = read_nifti(ref.path, dtype=None)
        seg = to_canonical(raw, ref.convention or "brats2020", str(ref.path))  # 1 NCR, 3 ET
        grade[case_id] = (seg == 3).sum() < 0.15 * np.isin(seg, (1, 3)).sum()
    return grade


def by_grade(held: dict[str, pd.DataFrame], lower: dict[str, bool]) -> list[str]:
    """Mean WT/TC/ET Dice of each held-out set, split by grade."""
    lines = [
        "| checkpoint | grade | n | WT | TC | ET | mean |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for label, dice in held.items():
        low = dice.index.map(lower).to_numpy(bool)
        lines += [dice_row(label, dice[~low], "high"), dice_row(label, dice[low], "lower")]
    return lines


def paired_difference(diff: pd.Series, first: str, last: str) -> str:
    """Per-case differences ``last - first``: mean, bootstrap 95 % interval (10,000 resamples
    of the cases, seed 0), Wilcoxon signed-rank p-value."""
    values = diff.to_numpy()
    rng = np.random.default_rng(0)
    boot = rng.choice(values, (10_000, len(values))).mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return (
        f"Paired, {last} against {first} ({len(values)} patients, mean of WT/TC/ET Dice per "
        f"patient): {values.mean():+.3f} (95 % bootstrap interval {low:+.3f} to {high:+.3f}; "
        f"Wilcoxon p = {wilcoxon(values).pvalue:.1e}; better on {(values > 0).sum()} patients)."
    )


if __name__ == "__main__":
    main()
