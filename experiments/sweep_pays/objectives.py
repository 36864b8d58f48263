"""Which validation objective would have picked the best trial on the held-out patients?

For every completed trial of the study: the case-level validation Dice (the study's objective,
``val/case_dice_mean``), the pooled one (``val/dice_mean`` of the kept epoch, the default
objective, logged by every trial), the 6 test patients' and the 64 held-out patients' mean case
Dice (from the two ``tumorseg-report --study`` outputs). Writes ``objectives.md``: per
objective, the trial it picks, that trial's held-out Dice and gain over the baseline, and its
Spearman rho with the held-out Dice across trials.

    python experiments/sweep_pays/objectives.py --tracking-uri sqlite:///$TUMORSEG_ROOT/mlflow.db \
        --study tumorseg-unet-equal-cost --output experiments/sweep_pays
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from scipy.stats import spearmanr

from tumorseg.report.render import markdown_table

OBJECTIVES = {
    "val/case_dice_mean": "case-level validation Dice (the study's objective)",
    "val/dice_mean": "pooled validation Dice (the default objective)",
    "test_dice": "case-level Dice of the 6 test patients",
}


def pooled_values(client: MlflowClient, study: str) -> dict[int, float]:
    """Trial number -> the pooled ``val/dice_mean`` its run logged last (the kept epoch's)."""
    out = {}
    for exp in client.search_experiments():
        for run in client.search_runs(
            [exp.experiment_id], filter_string=f"tags.optuna_study = '{study}'", max_results=5000
        ):
            tags, metrics = run.data.tags, run.data.metrics
            if "optuna_trial" in tags and "val/dice_mean" in metrics:
                out[int(tags["optuna_trial"])] = metrics["val/dice_mean"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()

    held = pd.read_csv(args.output / "held_out" / "trials.csv")
    test = pd.read_csv(args.output / "test" / "trials.csv")[["trial", "test_dice"]]
    trials = held[held["state"] == "COMPLETE"].merge(test, on="trial", how="left")
    trials = trials.rename(columns={"objective": "val/case_dice_mean"})
    pooled = pooled_values(MlflowClient(args.tracking_uri), args.study)
    trials["val/dice_mean"] = trials["trial"].map(pooled)
    base = trials.loc[trials["trial"] == 0, "held_out_dice"].iloc[0]

    rows = []
    for column, what in OBJECTIVES.items():
        pick = trials.loc[trials[column].idxmax()]
        rho = spearmanr(trials[column], trials["held_out_dice"]).statistic
        rows.append(
            [
                what,
                str(int(pick["trial"])),
                f"{pick[column]:.4f}",
                f"{pick['held_out_dice']:.4f}",
                f"{pick['held_out_dice'] - base:+.4f}",
                f"{rho:.2f}",
            ]
        )
    best = trials.loc[trials["held_out_dice"].idxmax()]
    header = ["objective", "picks trial", "its value", "held-out Dice", "vs trial 0", "rho"]
    lines = [
        f"# Which objective picks the winner? ({len(trials)} completed trials)",
        "",
        f"Trial 0 (the default config): held-out mean case Dice {base:.4f}. The best any "
        f"completed trial reached there: trial {int(best['trial'])}, "
        f"{best['held_out_dice']:.4f} ({best['held_out_dice'] - base:+.4f}). "
        "rho: Spearman's rho between the objective and the held-out Dice across the trials.",
        "",
        *markdown_table(header, rows),
        "",
        "## Every completed trial",
        "",
    ]
    cols = ["trial", "val/case_dice_mean", "stderr", "val/dice_mean", "test_dice", "held_out_dice"]
    rows = [[int(r["trial"])] + [f"{r[c]:.4f}" for c in cols[1:]] for _, r in trials.iterrows()]
    lines += markdown_table(cols, rows)
    (args.output / "objectives.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
