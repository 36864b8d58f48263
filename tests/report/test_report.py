"""``tumorseg-report`` on runs made by hand through ``MlflowClient`` (numbers checkable by hand)
and on tiny training runs; bad input exits 2 and writes nothing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from scipy.stats import wilcoxon

from tests.conftest import run_train
from tumorseg.cli.report import main
from tumorseg.report.compare import FILES
from tumorseg.report.runs import (
    CASE_METRICS,
    is_training_run,
    learning_curves,
    metric_history,
    read_case_csv,
    runs_frame,
)
from tumorseg.report.stats import (
    case_ranks,
    holm,
    paired_test,
    rank_metrics,
    ranking_table,
    variant_case_means,
)

CASES = [f"case_{i}" for i in range(1, 9)]
# per-case Dice of unet, averaged over its two runs (run 1: x - 0.01, run 2: x + 0.01)
UNET = {
    "wt": [0.80, 0.82, 0.78, 0.90, 0.85, 0.70, 0.88, 0.75],
    "tc": [0.60, 0.65, 0.70, 0.55, 0.62, 0.68, 0.72, 0.58],
    "et": [0.50, 0.45, 0.55, 0.40, 0.52, 0.48, 0.60, 0.42],
}
# attention_unet minus unet per case: WT and ET differ, TC is identical (all differences zero)
GAIN = {
    "wt": [0.03, 0.05, -0.01, 0.02, 0.04, 0.06, 0.015, 0.07],
    "tc": [0.0] * 8,
    "et": [-0.02, 0.01, -0.03, -0.045, 0.005, -0.06, 0.025, -0.035],
}
TEST_DICE_WT = {("unet", 1): 0.80, ("unet", 2): 0.90, ("attention_unet", 1): 0.84}
TEST_DICE_WT |= {("attention_unet", 2): 0.88, ("residual_unet", 1): 0.70}
TEST_DICE_WT |= {("residual_unet", 2): 0.76}
CURVES = {1: [0.1, 0.3, 0.5], 2: [0.2, 0.4, 0.6]}  # val/dice_mean per epoch, by seed
NSD = {1: 0.6, 2: 0.8}  # NSD of every case of a run, by seed (lesion NSD: half of it)


def cases_csv(
    path: Path, dice: dict[str, list[float]], cases: list[str], nsd: float | None = None
) -> Path:
    """A case-level CSV in ``tumorseg-evaluate``'s format; with ``nsd``, lesion-wise columns
    too: lesion Dice equal to Dice, lesion HD95 3 mm, NSD ``nsd`` and lesion NSD ``nsd`` / 2
    (so the ranking, on lesion Dice and HD95, ranks as on Dice and HD95)."""
    lesion = {} if nsd is None else {"nsd": nsd, "lesion_nsd": nsd / 2, "lesion_hd95": 3.0}
    rows = [
        {"case_id": cid, "region": region, "dice": dice[region][i], "iou": 0.5}
        | {"acc": 0.99, "sens": 0.9, "spec": 0.99, "hd95": 3.0}
        | ({"lesion_dice": dice[region][i]} | lesion if lesion else {})
        for i, cid in enumerate(cases)
        for region in ("wt", "tc", "et")
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def run_dice(variant: str, seed: int) -> dict[str, list[float]]:
    """Case-level Dice of one run: the per-case mean of its variant -/+ a seed offset."""
    sign = -1 if seed == 1 else 1
    out = {}
    for region, base in UNET.items():
        if variant == "unet" or region == "tc":  # TC: both variants exactly alike
            out[region] = [x + sign * 0.01 for x in base]
        else:
            out[region] = [x + g + sign * 0.02 for x, g in zip(base, GAIN[region], strict=True)]
    return out


def make_run(
    client: MlflowClient,
    exp_id: str,
    variant: str,
    seed: int,
    tmp: Path,
    cases: list[str] | None = CASES,
    status: str = "FINISHED",
    tags: dict[str, str] | None = None,
) -> str:
    """A run as train.py logs it: tags, test metrics, val/dice_mean and epoch per epoch."""
    tags = {"variant": variant, "seed": str(seed), "data_source": "demo", **(tags or {})}
    run_id = client.create_run(exp_id, run_name=variant, tags=tags).info.run_id
    dice_wt = TEST_DICE_WT.get((variant, seed), 0.0)
    metrics = [Metric("test/dice_wt", dice_wt, 0, 9), Metric("test/iou_wt", dice_wt - 0.1, 0, 9)]
    metrics += [Metric(f"test/{m}_{r}", 0.5, 0, 9) for m in ("dice", "iou") for r in ("tc", "et")]
    if variant == "attention_unet":  # as the case-level test stage names it
        metrics.append(Metric("test/acc_wt", 0.99, 0, 9))
    for epoch, value in enumerate(CURVES[seed]):
        step = 3 * epoch + 2
        metrics += [Metric("val/dice_mean", value, 0, step), Metric("epoch", epoch, 0, step)]
    client.log_batch(run_id, metrics=metrics)
    if cases is not None:
        folder = tmp / run_id
        folder.mkdir()
        path = cases_csv(folder / "test_cases.csv", run_dice(variant, seed), cases, NSD[seed])
        client.log_artifact(run_id, str(path), "evaluation")
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SQLite store: experiment ``cmp`` with 6 training runs and runs the report must skip."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    artifacts = (root / "artifacts").as_uri()
    exp = client.create_experiment("cmp", artifact_location=artifacts)
    ids = {}
    for variant in ("unet", "attention_unet"):
        for seed in (1, 2):
            ids[variant, seed] = make_run(client, exp, variant, seed, root)
    # residual_unet: run 1 scored on 4 cases only, run 2 without the artifact
    ids["residual_unet", 1] = make_run(client, exp, "residual_unet", 1, root, cases=CASES[:4])
    ids["residual_unet", 2] = make_run(client, exp, "residual_unet", 2, root, cases=None)
    # to be skipped: not finished, failed, an Optuna parent, an earlier report
    make_run(client, exp, "unet", 1, root, status="RUNNING")
    make_run(client, exp, "unet", 1, root, status="FAILED")
    make_run(client, exp, "unet", 1, root, tags={"optuna_parent": "true"})
    make_run(client, exp, "report", 1, root, cases=None, tags={"report": "true"})
    empty = client.create_experiment("unfinished", artifact_location=artifacts)
    make_run(client, empty, "unet", 1, root, status="RUNNING")
    return {"uri": uri, "client": client, "exp": exp, "ids": ids, "root": root}


@pytest.fixture(scope="module")
def reported(store: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of experiment ``cmp``, into a folder that already holds a README."""
    out = tmp_path_factory.mktemp("report") / "cmp"
    out.mkdir()
    (out / "README.md").write_text("keep me\n")
    (out / "case_dice_boxplot.png").write_text("stale")
    assert main(["--experiment", "cmp", "--tracking-uri", store["uri"], "--output", str(out)]) == 0
    return out


def test_files_written_and_others_kept(reported):
    names = {p.name for p in reported.iterdir()}
    assert names == {"README.md", *FILES}
    assert (reported / "README.md").read_text() == "keep me\n"
    assert (reported / "case_dice_boxplot.png").read_bytes()[:4] == b"\x89PNG"
    assert (reported / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in reported.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_summary_mean_std_over_runs(reported):
    summary = pd.read_csv(reported / "summary.csv").set_index("variant")
    assert list(summary.index) == ["unet", "attention_unet", "residual_unet"]
    assert summary["n_runs"].tolist() == [2, 2, 2]  # skipped runs do not count
    assert summary.loc["unet", "dice_wt_mean"] == pytest.approx(0.85)
    assert summary.loc["unet", "dice_wt_std"] == pytest.approx(math.sqrt(0.005))  # ddof 1
    assert summary.loc["attention_unet", "dice_wt_mean"] == pytest.approx(0.86)
    assert summary.loc["attention_unet", "iou_wt_mean"] == pytest.approx(0.76)
    assert summary.loc["residual_unet", "dice_wt_std"] == pytest.approx(0.06 / math.sqrt(2))
    assert summary.loc["unet", "dice_tc_std"] == 0.0
    assert summary.loc["attention_unet", "acc_wt_mean"] == pytest.approx(0.99)
    assert summary.loc[["unet", "residual_unet"], "acc_wt_mean"].isna().all()  # not logged
    text = (reported / "summary.md").read_text()
    assert "| unet | 2 | 0.850 ± 0.071 | 0.500 ± 0.000 |" in text
    assert "| residual_unet | 2 | 0.730 ± 0.042 |" in text


def test_summary_adds_lesion_wise_and_nsd_means_from_the_case_csvs(reported):
    summary = pd.read_csv(reported / "summary.csv").set_index("variant")
    # per run the mean over its cases, then mean ± std over the variant's runs: unet's WT
    # lesion Dice is mean(UNET) -/+ 0.01 per run; residual_unet has one run with cases
    assert summary.loc["unet", "lesion_dice_wt_mean"] == pytest.approx(np.mean(UNET["wt"]))
    assert summary.loc["unet", "lesion_dice_wt_std"] == pytest.approx(0.02 / math.sqrt(2))
    assert summary.loc["attention_unet", "lesion_dice_et_mean"] == pytest.approx(
        np.mean(np.add(UNET["et"], GAIN["et"]))
    )
    assert summary.loc["unet", "lesion_hd95_tc_mean"] == 3.0
    assert summary.loc["unet", "nsd_wt_mean"] == pytest.approx(0.7)
    assert summary.loc["unet", "nsd_wt_std"] == pytest.approx(0.2 / math.sqrt(2))
    assert summary.loc["attention_unet", "lesion_nsd_et_mean"] == pytest.approx(0.35)
    assert summary.loc["residual_unet", "nsd_wt_mean"] == pytest.approx(0.6)
    assert np.isnan(summary.loc["residual_unet", "nsd_wt_std"])
    assert "lesion_hd95_max_wt_mean" not in summary  # no case CSV has the max convention
    text = (reported / "summary.md").read_text()
    assert "WT lesion Dice" in text and "ET lesion HD95" in text and "TC NSD" in text
    row = next(line for line in text.splitlines() if line.startswith("| residual_unet |"))
    assert row.endswith("| 0.300 | 0.300 | 0.300 |")  # lesion NSD of its one run with cases


def test_summary_names_runs_without_case_results(reported, store):
    text = (reported / "summary.md").read_text()
    missing = store["ids"]["residual_unet", 2]
    assert f"`{missing}` | residual_unet | 2 | – | missing: no evaluation/test_cases.csv |" in text
    assert "1 run(s) without usable case-level results, left out of the box plot and the " in text
    assert f"`{store['ids']['unet', 1]}` | unet | 1 | – | 24 rows |" in text


def test_pairwise_wilcoxon_on_known_pairs(reported):
    pairs = pd.read_csv(reported / "pairwise.csv", keep_default_na=False, na_values=[""])
    pairs = pairs.set_index(["variant_a", "variant_b", "region"])
    assert len(pairs) == 9  # three pairs x three regions
    for region in ("wt", "et"):
        row = pairs.loc[("unet", "attention_unet", region)]
        unet = np.array(UNET[region])
        attention = unet + np.array(GAIN[region])
        assert row["n_cases"] == 8
        assert row["median_diff"] == pytest.approx(np.median(GAIN[region]))
        assert row["p_value"] == pytest.approx(wilcoxon(attention, unet).pvalue, rel=1e-9)
    tc = pairs.loc[("unet", "attention_unet", "tc")]
    assert math.isnan(tc["p_value"]) and tc["note"] == "all differences zero"
    assert tc["median_diff"] == 0.0
    few = pairs.loc[("unet", "residual_unet", "wt")]
    assert few["n_cases"] == 4 and math.isnan(few["p_value"])
    assert few["note"] == "fewer than 6 paired cases"
    text = (reported / "pairwise.md").read_text()
    p_wt = wilcoxon(np.add(UNET["wt"], GAIN["wt"]), UNET["wt"]).pvalue
    assert f"| unet | attention_unet | WT | 8 | +0.0350 | {p_wt:.4g} |  |" in text


def test_report_run_logged_and_skipped_next_time(reported, store, tmp_path):
    client = store["client"]
    runs = client.search_runs([store["exp"]], "tags.report = 'true' and params.filter = 'none'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "report" and run.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(run.info.run_id)} == set(FILES)
    # a second report does not count the first one as a training run
    out = tmp_path / "again"
    assert main(["--experiment", "cmp", "--tracking-uri", store["uri"], "--output", str(out)]) == 0
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "summary.csv"), pd.read_csv(reported / "summary.csv")
    )


def test_filter_selects_runs(store, tmp_path):
    out = tmp_path / "seed1"
    args = ["--experiment", "cmp", "--tracking-uri", store["uri"], "--output", str(out)]
    assert main([*args, "--filter", "tags.seed = '1'"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["n_runs"].tolist() == [1, 1, 1]
    assert summary["dice_wt_std"].isna().all()
    assert summary["dice_wt_mean"].tolist() == pytest.approx([0.80, 0.84, 0.70])


def test_epoch_from_lightning_steps_and_resumed_duplicates(store):
    client = store["client"]
    exp = client.create_experiment("history", artifact_location=(store["root"] / "h").as_uri())
    run_id = client.create_run(exp, run_name="resumed").info.run_id
    metrics = [
        Metric("val/dice_mean", 0.1, 1, 2),
        Metric("epoch", 0, 1, 2),
        Metric("val/dice_mean", 0.2, 2, 5),  # epoch 1, then killed and logged again
        Metric("val/dice_mean", 0.25, 3, 5),
        Metric("epoch", 1, 2, 5),
        Metric("val/dice_mean", 0.3, 4, 8),
        Metric("epoch", 2, 4, 8),
        Metric("epoch", 3, 5, 9),  # the test stage: no val metric there
    ]
    client.log_batch(run_id, metrics=metrics)
    history = metric_history(client, run_id)
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history["value"].tolist() == [0.1, 0.25, 0.3]


def test_case_csv_without_dice_is_unusable(tmp_path):
    path = tmp_path / "test_cases.csv"
    path.write_text("case_id,region,iou\nc1,wt,0.5\n")
    with pytest.raises(ValueError, match="missing column"):
        read_case_csv(path)
    path.write_text("case_id,region,dice\n007,WT,0.5\n007,whole,0.4\n")
    read = read_case_csv(path)
    assert read[["case_id", "region", "dice"]].to_dict("records") == [
        {"case_id": "007", "region": "wt", "dice": 0.5}
    ]
    assert read[list(CASE_METRICS[1:])].isna().all().all()  # absent metrics are NaN


def test_case_csv_with_every_region_keeps_wt_tc_et(tmp_path):
    """``tumorseg-evaluate`` and the test stage also write NETC, SNFH and (BraTS 2024) RC rows;
    the report compares variants on WT, TC and ET and leaves those rows out."""
    from tumorseg.evaluation.cases import case_table, scored_rows

    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:8, 2:8, 2:8], ref[3:6, 3:6, 3:6], ref[4, 4, 4] = 2, 1, 3
    ref[9:11, 9:11, 9:11] = 4  # resection cavity
    pred = np.roll(ref, 1, axis=0)
    rows = [
        r
        for cid in ("c1", "c2")
        for r in scored_rows(cid, pred, ref, (1, 1, 1), labels="brats2024")[0]
    ]
    table = case_table(rows)
    assert set(table.region) == {"wt", "tc", "et", "netc", "snfh", "rc"}
    path = tmp_path / "test_cases.csv"
    table.to_csv(path, index=False)
    read = read_case_csv(path)
    assert read.region.tolist() == ["wt", "tc", "et"] * 2
    expected = table[table.region.isin(["wt", "tc", "et"])]
    assert read.dice.tolist() == pytest.approx(expected.dice.tolist())
    assert read.lesion_dice.tolist() == pytest.approx(expected.lesion_dice.tolist())
    means = variant_case_means(read.assign(variant="unet"))
    assert set(means.region) == {"wt", "tc", "et"}


def test_paired_test_needs_six_cases():
    a = pd.Series([0.5, 0.6, 0.7, 0.8, 0.9], index=list("abcde"))
    b = pd.Series([0.6, 0.7, 0.8, 0.9, 1.0, 0.1], index=list("abcdef"))
    out = paired_test(a, b)
    assert out["n_cases"] == 5 and math.isnan(out["p_value"])
    assert out["median_diff"] == pytest.approx(0.1)


# ---------------------------------------------------------------- bad input


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


@pytest.mark.parametrize(
    ("experiment", "extra", "message"),
    [
        ("nope", [], "tumorseg-report: error: no experiment named 'nope' in the MLflow store"),
        ("unfinished", [], "experiment 'unfinished' has no FINISHED training runs"),
        ("cmp", ["--filter", "tags.seed = '7'"], "has no FINISHED training runs matching"),
        ("cmp", ["--filter", "tags.seed ~ 1"], "cannot search runs with filter"),
        ("cmp", ["--metric-prefix", "tset"], "no run has any tset/dice_wt"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(store, tmp_path, capsys, experiment, extra, message):
    out = tmp_path / "out"
    argv = ["--experiment", experiment, "--tracking-uri", store["uri"], "--output", str(out)]
    assert main(argv + extra) == 2
    assert message in error_line(capsys)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_store_is_not_created(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["--experiment", "cmp"]) == 2
    line = error_line(capsys)
    store = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"  # the project root's default store
    assert line == f"tumorseg-report: error: MLflow store {store} does not exist"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert main(["--experiment", "cmp"]) == 2
    assert "other.db does not exist" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_file(store, tmp_path, capsys):
    out = tmp_path / "file.md"
    out.write_text("x")
    argv = ["--experiment", "cmp", "--tracking-uri", store["uri"], "--output", str(out)]
    assert main(argv) == 2
    assert error_line(capsys).endswith("is not a folder")


# ---------------------------------------------------------------- real runs


@pytest.mark.slow
def test_report_on_tiny_training_runs(tmp_path, demo_root):
    res = run_train(
        tmp_path,
        "-m",
        "model=unet,attention_unet",
        "seed=1,2",
        "debug=tiny",
        f"data.root={demo_root}",
        "experiment_name=cmp",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "report"
    assert main(["--experiment", "cmp", "--tracking-uri", uri, "--output", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["variant"].tolist() == ["unet", "attention_unet"]
    assert summary["n_runs"].tolist() == [2, 2]
    runs = runs_of(uri)
    for column, key in (("dice_wt_mean", "test/dice_wt"), ("acc_et_mean", "test/acc_et")):
        by_variant = {
            v: np.mean([r.data.metrics[key] for r in runs if r.data.tags["variant"] == v])
            for v in ("unet", "attention_unet")
        }  # each variant's mean over its runs, straight from MLflow
        assert summary[column].tolist() == pytest.approx(list(by_variant.values())), column
    curves = learning_curves(MlflowClient(uri), runs_frame(runs_of(uri), "test"))
    assert sorted(curves["epoch"].unique()) == [0, 1]  # debug=tiny: two epochs
    assert len(curves) == 8
    assert (out / "learning_curves.png").stat().st_size > 0
    pairs = pd.read_csv(out / "pairwise.csv")
    assert len(pairs) == 3 and pairs["p_value"].isna().all()  # one test case: no p-value


def runs_of(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cmp")
    return [r for r in client.search_runs([exp.experiment_id]) if is_training_run(r)]


# ---------------------------------------------------------------- BraTS ranking


def means_frame(values: dict[str, dict[str, list[float]]], regions=("wt",)) -> pd.DataFrame:
    """Case means as ``variant_case_means`` returns them: values[variant][metric] per case."""
    rows = []
    for variant, metrics in values.items():
        n = len(next(iter(metrics.values())))
        for i in range(n):
            for region in regions:
                row = {"variant": variant, "case_id": f"c{i}", "region": region}
                rows.append(row | {m: v[i] for m, v in metrics.items()})
    return pd.DataFrame(rows).reindex(columns=["variant", "case_id", "region", *CASE_METRICS])


def test_ranking_ranks_per_case_and_metric_then_averages():
    means = means_frame(
        {
            "a": {
                "lesion_dice": [0.9, 0.8, 0.7],
                "lesion_hd95": [2.0, 3.0, 4.0],
                "dice": [0.0] * 3,
            },
            "b": {
                "lesion_dice": [0.8, 0.8, 0.9],
                "lesion_hd95": [5.0, 1.0, 4.0],
                "dice": [1.0] * 3,
            },
            "c": {
                "lesion_dice": [0.1, 0.2, 0.3],
                "lesion_hd95": [9.0, 9.0, 9.0],
                "dice": [0.5] * 3,
            },
        }
    )
    assert rank_metrics(means) == [("lesion_dice", True), ("lesion_hd95", False)]
    ranks = case_ranks(means, ["a", "b", "c"])
    a = ranks[ranks.variant == "a"].set_index(["case_id", "metric"])["rank"]
    assert a[("c1", "lesion_dice")] == 1.5  # a tie shares ranks 1 and 2
    assert a[("c2", "lesion_hd95")] == 1.5 and a[("c0", "lesion_dice")] == 1
    table = ranking_table(ranks, ["a", "b", "c"]).set_index("variant")
    # a: 1, 1.5, 2 (Dice) + 1, 2, 1.5 (HD95) = 9 / 6; b: 2, 1.5, 1 + 2, 1, 1.5 = 9 / 6; c: 3
    assert table["mean_rank"].to_dict() == pytest.approx({"a": 1.5, "b": 1.5, "c": 3.0})
    assert table["position"].to_dict() == {"a": 1, "b": 1, "c": 3}
    assert table.loc["c", "p_first"] == 0 and (
        table.loc["c", "pos_low"],
        table.loc["c", "pos_high"],
    ) == (3, 3)
    assert 0 < table.loc["a", "p_first"] < 1 and table.loc["a", "pos_low"] == 1


def test_ranking_falls_back_to_dice_and_hd95_and_is_stable_for_a_clear_winner():
    rng = np.random.default_rng(0)
    dice = rng.uniform(0.5, 0.8, size=20)
    means = means_frame(
        {
            "best": {"dice": list(dice + 0.1), "hd95": [1.0] * 20},
            "worst": {"dice": list(dice), "hd95": [2.0] * 20},
        },
        regions=("wt", "tc", "et"),
    )
    assert rank_metrics(means) == [("dice", True), ("hd95", False)]
    table = ranking_table(case_ranks(means, ["worst", "best"]), ["worst", "best"])
    assert table["variant"].tolist() == ["best", "worst"]
    assert table.set_index("variant")["p_first"].to_dict() == {"best": 1.0, "worst": 0.0}
    again = ranking_table(case_ranks(means, ["worst", "best"]), ["worst", "best"])
    pd.testing.assert_frame_equal(table, again)  # seeded bootstrap


def test_holm_adjusts_in_order_and_keeps_nan():
    adjusted = holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and np.isnan(adjusted[3])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_report_writes_the_ranking_and_holm_p_values(store, reported, tmp_path):
    ranking = pd.read_csv(reported / "ranking.csv").set_index("variant")
    # residual_unet was scored on 4 cases only: the ranking uses those 4, for all three.
    # Dice ranks (unet, attention_unet, residual_unet) on case_1..case_4, by hand from UNET,
    # GAIN and the seed offsets (residual_unet has one run: base + gain - 0.02):
    #   WT (3, 1, 2) (3, 1, 2) (1, 2, 3) (2.5, 1, 2.5)   sums 9.5, 5, 9.5
    #   TC (1.5, 1.5, 3) on every case                   sums 6, 6, 12
    #   ET (1, 2, 3) (2, 1, 3) (1, 2, 3) (1, 2, 3)       sums 5, 7, 12
    # HD95 is 3.0 everywhere: rank 2 for all on the 12 case-regions (sum 24 each).
    expected = {"unet": 44.5 / 24, "attention_unet": 42 / 24, "residual_unet": 57.5 / 24}
    assert ranking["mean_rank"].to_dict() == pytest.approx(expected)
    assert ranking["position"].to_dict() == {"attention_unet": 1, "unet": 2, "residual_unet": 3}
    assert set(ranking.n_cases) == {4}
    assert "Dice higher is better" in (reported / "ranking.md").read_text()
    assert "p_holm" not in pd.read_csv(reported / "pairwise.csv").columns

    out = tmp_path / "holm"
    args = ["--experiment", "cmp", "--tracking-uri", store["uri"], "--output", str(out), "--holm"]
    # a filter that keeps every run: the report run it logs is not one with filter 'none'
    assert main([*args, "--filter", "tags.data_source = 'demo'"]) == 0
    pairwise = pd.read_csv(out / "pairwise.csv").set_index(["variant_a", "variant_b", "region"])
    # two tests have a p-value (unet vs attention_unet on WT and ET; TC differences are all
    # zero, residual_unet has 4 cases): Holm with m = 2 doubles the smaller p, and the larger
    # stays as is unless that is below the doubled one
    p_wt = wilcoxon(np.add(UNET["wt"], GAIN["wt"]), UNET["wt"]).pvalue
    p_et = wilcoxon(np.add(UNET["et"], GAIN["et"]), UNET["et"]).pvalue
    low, high = sorted([p_wt, p_et])
    adjusted = {low: min(1.0, 2 * low), high: min(1.0, max(2 * low, high))}
    pair = pairwise.loc[("unet", "attention_unet")]
    assert pair.loc["wt", "p_holm"] == pytest.approx(adjusted[p_wt], rel=1e-6)
    assert pair.loc["et", "p_holm"] == pytest.approx(adjusted[p_et], rel=1e-6)
    assert pairwise.p_holm.notna().sum() == 2
    assert "p (Holm)" in (out / "pairwise.md").read_text()
