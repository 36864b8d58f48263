"""`tumorseg.evaluate`: hand-computed metrics, HD95 with anisotropic spacing, the CLI's files,
the regions of each label convention, overlays from every layout, the test stage's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from tumorseg.cli.evaluate import main
from tumorseg.evaluation.cases import (
    BASE_METRICS,
    EMPTY_HD95,
    METRICS,
    case_metrics,
    hd95,
    summarise,
)
from tumorseg.evaluation.lesions import REPORTED_INF

# seaborn 0.13 passes matplotlib 3.11's deprecated ``vert`` to boxplot
pytestmark = pytest.mark.filterwarnings("ignore:vert. bool was deprecated")

SHAPE = (20, 20, 10)
SPACING = (1.0, 1.0, 2.0)
OUTPUTS = ("metrics.csv", "metrics_summary.csv", "metrics_boxplot.png", "metrics_lesions.csv")
CANONICAL_REGIONS = ["wt", "tc", "et", "netc", "snfh"]  # every convention's; RC only brats2024


def blob(center: tuple[int, int, int], radius: int, label: int) -> np.ndarray:
    """Canonical volume with a cube of ``label`` around ``center``."""
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[tuple(slice(c - radius, c + radius + 1) for c in center)] = label
    return seg


def tumour(shift: int = 0) -> np.ndarray:
    """Canonical volume with edema, a necrotic core and enhancing tumour, shifted along x."""
    seg = blob((10 + shift, 10, 5), 4, 2)
    seg[7 + shift : 12 + shift, 8:12, 3:7] = 1
    seg[9 + shift : 11 + shift, 9:11, 4:6] = 3
    return seg


# ---------------------------------------------------------------- metrics


def test_perfect_prediction():
    seg = tumour()
    for region, m in case_metrics(seg, seg, SPACING).items():
        assert m == {
            "dice": 1.0,
            "iou": 1.0,
            "acc": 1.0,
            "sens": 1.0,
            "spec": 1.0,
            "hd95": 0.0,
        }, region


def test_disjoint_masks():
    pred, ref = blob((4, 4, 2), 1, 2), blob((15, 15, 7), 1, 2)
    wt = case_metrics(pred, ref, SPACING)["wt"]
    assert wt["dice"] == 0 and wt["iou"] == 0 and wt["sens"] == 0
    assert wt["acc"] == pytest.approx(1 - 54 / 4000)
    assert wt["spec"] == pytest.approx(1 - 27 / (4000 - 27))
    assert wt["hd95"] > 0  # exact value in test_disjoint_hd95_value


def test_both_empty_and_one_empty_with_one_hd95_for_infinity():
    seg = blob((10, 10, 5), 2, 2)  # edema only: TC and ET empty in both
    both_empty = case_metrics(seg, seg, SPACING)
    for region in ("tc", "et"):
        assert both_empty[region]["dice"] == 1 and both_empty[region]["iou"] == 1
        assert both_empty[region]["hd95"] == 0
        assert both_empty[region]["sens"] == 1 and both_empty[region]["spec"] == 1

    empty = np.zeros(SHAPE, dtype=np.uint8)
    for pred, ref in ((empty, seg), (seg, empty)):
        wt = case_metrics(pred, ref, SPACING)["wt"]
        assert wt["dice"] == 0 and wt["iou"] == 0
        # the one value every written HD95 uses for infinity, as the official reports write it
        assert wt["hd95"] == EMPTY_HD95 == REPORTED_INF == 373.0
        assert wt["sens"] == 0  # empty reference, non-empty prediction -> 0


def test_counts_on_a_small_example():
    ref = np.zeros((4, 5, 1), dtype=np.uint8)
    pred = np.zeros_like(ref)
    ref[0, :4] = 2  # 4 reference voxels
    pred[0, :3] = 2  # 3 of them found ...
    pred[3, 3:] = 2  # ... and 2 false positives; 14 true negatives of 20
    wt = case_metrics(pred, ref, (1.0, 1.0, 1.0))["wt"]
    assert wt["dice"] == pytest.approx(6 / 9)
    assert wt["iou"] == pytest.approx(3 / 6)
    assert wt["acc"] == pytest.approx(17 / 20)
    assert wt["sens"] == pytest.approx(3 / 4)
    assert wt["spec"] == pytest.approx(14 / 16)


def test_regions_nest_labels():
    ref = tumour()
    pred = ref.copy()
    pred[pred == 3] = 1  # enhancing called necrotic: WT and TC perfect, ET missed
    m = case_metrics(pred, ref, SPACING)
    assert m["wt"]["dice"] == 1 and m["tc"]["dice"] == 1
    assert m["et"]["dice"] == 0 and m["et"]["hd95"] == EMPTY_HD95


@pytest.mark.parametrize(
    ("axis", "expected"),
    [(0, 3.0), (2, 6.0)],  # 3 voxels apart: 3 mm along x (1 mm), 6 mm along z (2 mm)
)
def test_hd95_single_voxels_anisotropic(axis, expected):
    pred, ref = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    pred[5, 5, 2] = True
    index = [5, 5, 2]
    index[axis] += 3
    ref[tuple(index)] = True
    assert hd95(pred, ref, SPACING) == pytest.approx(expected)


def test_hd95_lines_displaced_along_z():
    pred, ref = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    pred[2:18, 10, 2] = True
    ref[2:18, 10, 6] = True  # 4 slices of 2 mm away
    assert hd95(pred, ref, SPACING) == pytest.approx(8.0)
    assert hd95(pred, ref, (1.0, 1.0, 0.5)) == pytest.approx(2.0)


def test_hd95_ignores_a_lone_outlier():
    ref = blob((6, 6, 4), 2, 1).astype(bool)  # 5x5x5 cube: 98 surface voxels
    pred = ref.copy()
    pred[18, 18, 9] = True  # one far voxel among ~200 pooled distances
    assert hd95(pred, ref, SPACING) == 0.0


def brute_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """Pooled 95th percentile of surface distances from all surface voxel pairs."""
    ps = np.argwhere(pred & ~ndimage.binary_erosion(pred)) * spacing
    rs = np.argwhere(ref & ~ndimage.binary_erosion(ref)) * spacing
    d = cdist(ps, rs)
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred = ndimage.binary_dilation(rng.random(SHAPE) > 0.995, iterations=2)
    ref = ndimage.binary_dilation(rng.random(SHAPE) > 0.995, iterations=2)
    pred[0, :, :3] = True  # touching the volume's border
    assert hd95(pred, ref, SPACING) == pytest.approx(brute_hd95(pred, ref, np.array(SPACING)))


def test_disjoint_hd95_value():
    pred, ref = blob((4, 4, 2), 1, 2), blob((15, 15, 7), 1, 2)
    expected = brute_hd95(pred > 0, ref > 0, np.array(SPACING))
    assert case_metrics(pred, ref, SPACING)["wt"]["hd95"] == pytest.approx(expected)


def test_case_metrics_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), SPACING)


# ---------------------------------------------------------------- summary


def test_summarise():
    values = [0.2, 0.4, 0.6, 0.8, 1.0]
    df = pd.DataFrame(
        [
            {"case_id": f"c{i}", "region": r, **{m: v for m in METRICS}}
            for i, v in enumerate(values)
            for r in ("wt", "tc", "et")
        ]
    )
    summary = summarise(df)
    assert len(summary) == len(METRICS) * 3
    assert list(summary.columns) == [
        "metric",
        "region",
        "n",
        "mean",
        "median",
        "std",
        "ci_low",
        "ci_high",
    ]
    row = summary.iloc[0]
    assert (row.metric, row.region, row.n) == ("dice", "wt", 5)
    assert row["mean"] == pytest.approx(0.6) and row["median"] == pytest.approx(0.6)
    assert row["std"] == pytest.approx(np.std(values, ddof=1))
    assert 0.2 <= row.ci_low < 0.6 < row.ci_high <= 1.0
    pd.testing.assert_frame_equal(summary, summarise(df))  # seeded


def test_summarise_constant_values_give_a_point_ci():
    df = pd.DataFrame([{"case_id": "a", "region": "wt", **{m: 0.5 for m in METRICS}}] * 3)
    row = summarise(df).iloc[0]
    assert row.ci_low == row.ci_high == pytest.approx(0.5)


# ---------------------------------------------------------------- command line

# brats2020 values for canonical 0..3
TO_BRATS2020 = np.array([0, 1, 2, 4], dtype=np.uint8)


def save(path: Path, seg: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(seg, np.diag([*SPACING, 1.0])), path)
    return path


def write_cases(
    root: Path, layout: str, cases: dict[str, tuple[np.ndarray | None, np.ndarray | None]]
):
    """Prediction files in ``root/pred``, references in ``root/ref`` as files or folders."""
    for cid, (pred, ref) in cases.items():
        if pred is not None:
            save(root / "pred" / f"{cid}.nii.gz", TO_BRATS2020[pred])
        if ref is None:
            continue
        if layout == "files":
            save(root / "ref" / f"{cid}.nii", TO_BRATS2020[ref])
        else:
            save(root / "ref" / cid / f"{cid}_seg.nii.gz", TO_BRATS2020[ref])
    (root / "pred").mkdir(exist_ok=True)
    (root / "ref").mkdir(exist_ok=True)
    return root / "pred", root / "ref"


def run_cli(root: Path, *extra: str) -> int:
    return main(
        [
            "--predictions",
            str(root / "pred"),
            "--references",
            str(root / "ref"),
            "--output",
            str(root / "out" / "metrics.csv"),
            "--quiet",
            *extra,
        ]
    )


def no_outputs(root: Path) -> bool:
    return not (root / "out").exists() or not any((root / "out").iterdir())


@pytest.mark.parametrize("layout", ["files", "folders"])
def test_cli_writes_metrics_summary_and_plot(tmp_path, layout, capsys):
    write_cases(
        tmp_path,
        layout,
        {
            "case_a": (tumour(), tumour()),
            "case_b": (tumour(1), tumour()),
            "case_c": (tumour(2), tumour()),
        },
    )
    assert run_cli(tmp_path) == 0

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temp files left
    df = pd.read_csv(out / "metrics.csv")
    assert list(df.columns) == ["case_id", "region", *METRICS, "hd95_convention"]
    assert (df.hd95_convention == "pooled").all()  # the default convention, named
    lesions = pd.read_csv(out / "metrics_lesions.csv")
    assert (lesions.hd95_convention == "pooled").all()
    assert list(df.region) == CANONICAL_REGIONS * 3
    perfect = df[df.case_id == "case_a"].set_index("region")
    assert (perfect.dice == 1).all() and (perfect.hd95 == 0).all()
    shifted = df[df.case_id == "case_b"].set_index("region")
    expected = case_metrics(tumour(1), tumour(), SPACING)
    for region in CANONICAL_REGIONS:
        for metric in BASE_METRICS:
            assert shifted.loc[region, metric] == pytest.approx(expected[region][metric])
    summary = pd.read_csv(out / "metrics_summary.csv")
    assert len(summary) == len(METRICS) * 5 and set(summary.n) == {3}
    assert (out / "metrics_boxplot.png").read_bytes()[:4] == b"\x89PNG"
    stdout = capsys.readouterr().out
    assert "dice" in stdout and "WT" in stdout and "3 cases" in stdout


def test_cli_missing_partner_and_shape_mismatch(tmp_path, capsys):
    small = np.zeros((10, 10, 10), dtype=np.uint8)
    write_cases(
        tmp_path,
        "folders",
        {
            "ok": (tumour(), tumour()),
            "no_ref": (tumour(), None),
            "no_pred": (None, tumour()),
            "bad_shape": (small, tumour()),
        },
    )
    assert run_cli(tmp_path) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "case " in line and ": " in line]
    assert any("case no_ref: no reference" in line for line in lines)
    assert any("case no_pred: no prediction" in line for line in lines)
    assert any("case bad_shape: prediction shape (10, 10, 10)" in line for line in lines)
    assert "Traceback" not in err
    assert no_outputs(tmp_path)

    assert run_cli(tmp_path, "--allow-missing") == 0
    df = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert set(df.case_id) == {"ok"}
    stdout = capsys.readouterr().out
    assert "skipped 3 case(s): bad_shape, no_pred, no_ref" in stdout


def test_cli_unknown_label_value(tmp_path, capsys):
    write_cases(tmp_path, "files", {"a": (tumour(), tumour()), "b": (tumour(), tumour())})
    bad = TO_BRATS2020[tumour()]
    bad[0, 0, 0] = 5
    path = save(tmp_path / "pred" / "b.nii.gz", bad)
    assert run_cli(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(path) in err and "unexpected label value 5" in err
    assert no_outputs(tmp_path)


def test_cli_label_conventions(tmp_path):
    write_cases(tmp_path, "files", {"a": (tumour(), tumour())})  # written as brats2020
    assert run_cli(tmp_path, "--labels", "brats2023") == 2  # value 4 is not brats2023
    assert run_cli(tmp_path, "--labels", "brats2020") == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--predictions", "/nonexistent", "--references", "."],
        ["--predictions", ".", "--references", ".", "--labels", "brats1999"],
        ["--bogus"],
    ],
)
def test_cli_bad_arguments(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tumorseg-evaluate: error:") and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--predictions", "--references"])
def test_cli_names_the_path_first_for_a_folder_that_is_not_one(tmp_path, flag, capsys):
    folders = {"--predictions": str(tmp_path), "--references": str(tmp_path), flag: "nope"}
    assert main([arg for pair in folders.items() for arg in pair]) == 2
    err = capsys.readouterr().err
    assert err == f"tumorseg-evaluate: error: nope: not a folder ({flag})\n"


def test_cli_logs_to_mlflow(tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("eval", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    write_cases(tmp_path, "files", {"a": (tumour(), tumour()), "b": (tumour(1), tumour())})

    assert run_cli(tmp_path, "--mlflow-run", "does-not-exist", "--tracking-uri", uri) == 2
    assert no_outputs(tmp_path)
    assert run_cli(tmp_path, "--mlflow-run", run_id, "--tracking-uri", uri) == 0

    metrics = client.get_run(run_id).data.metrics
    assert client.get_run(run_id).data.tags["hd95_convention"] == "pooled"
    assert len(metrics) == len(METRICS) * 5
    df = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert metrics["case/dice_wt"] == pytest.approx(df[df.region == "wt"].dice.mean())
    artifacts = {f.path for f in client.list_artifacts(run_id, "evaluation")}
    assert artifacts == {f"evaluation/{name}" for name in OUTPUTS}

    other = client.create_run(exp).info.run_id
    assert run_cli(tmp_path, "--mlflow-run", other, "--tracking-uri", uri, "--hd95", "max") == 0
    run = client.get_run(other).data
    assert run.tags["hd95_convention"] == "max" and "case/hd95_max_wt" in run.metrics


def test_test_stage_tags_its_run_with_the_hd95_convention(tmp_path, monkeypatch):
    """The training test stage names the convention of its HD95 metrics on the run."""
    from mlflow import MlflowClient

    from tumorseg.evaluation import test_stage as case_eval
    from tumorseg.evaluation.cases import case_table, lesion_table, scored_rows

    def scored(module, cases, normalised, predictions, hd95="pooled", **_):
        rows, lesions = scored_rows("a", tumour(1), tumour(), SPACING, hd95)
        return case_table(rows, hd95), lesion_table(lesions, hd95)

    monkeypatch.setattr(case_eval, "score_cases", scored)
    monkeypatch.setattr(case_eval, "write_overlays", lambda *args, **kwargs: [])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("test", artifact_location=(tmp_path / "art").as_uri())

    class Logger:  # the part of Lightning's MLFlowLogger the test stage uses
        def __init__(self):
            self.experiment, self.run_id = client, client.create_run(exp).info.run_id

        def log_metrics(self, metrics, step=None):
            for key, value in metrics.items():
                client.log_metric(self.run_id, key, value, step=step or 0)

    class Module:
        def eval(self):
            return self

    for convention, metric in (("pooled", "test/hd95_wt"), ("max", "test/hd95_max_wt")):
        logger = Logger()
        case_eval.test_stage(Module(), [object()], [], logger, hd95=convention)
        run = client.get_run(logger.run_id).data
        assert run.tags["hd95_convention"] == convention and metric in run.metrics


# ---------------------------------------------------------------- reference layouts

# canonical 0..3 -> source values: brats2023 keeps them, MSD swaps edema and core
FROM_CANONICAL = {
    "brats2020": TO_BRATS2020,
    "brats2023": np.array([0, 1, 2, 3], dtype=np.uint8),
    "msd": np.array([0, 2, 1, 3], dtype=np.uint8),
}
MODALITY_FILES = {
    "brats2020": ("flair", "t1", "t1ce", "t2"),
    "brats2023": ("t2f", "t1n", "t1c", "t2w"),
}
FLAIR = 7.0  # the FLAIR's voxels; each other modality holds its index (1, 2, 3)


def brats_case(root: Path, cid: str, convention: str, seg_name: str | None, images: bool) -> None:
    """A BraTS case folder: the four modality images (FLAIR first) and the segmentation."""
    sep = "-" if convention == "brats2023" else "_"
    if images:
        for k, mod in enumerate(MODALITY_FILES[convention]):
            value = FLAIR if k == 0 else k
            save(root / cid / f"{cid}{sep}{mod}.nii.gz", np.full(SHAPE, value, np.float32))
    name = seg_name or f"{cid}{sep}seg.nii.gz"
    save(root / cid / name, FROM_CANONICAL[convention][tumour()])


def write_layout(root: Path, layout: str) -> tuple[str, str]:
    """References in ``layout`` under ``root/ref``; returns (case id, label convention)."""
    ref = root / "ref"
    if layout == "brats2020 case folders":
        cid, conv = "BraTS20_Training_001", "brats2020"
        brats_case(ref, cid, conv, None, images=True)
    elif layout == "brats2020 case 355":
        cid, conv = "BraTS20_Training_355", "brats2020"
        brats_case(ref, cid, conv, "W39_1998.09.19_Segm.nii", images=True)
    elif layout == "brats2023 case folders":
        cid, conv = "BraTS-GLI-00001-000", "brats2023"
        brats_case(ref, cid, conv, None, images=True)
    elif layout == "brats2023 segmentation folders":
        cid, conv = "BraTS-GLI-00002-000", "brats2023"
        brats_case(ref, cid, conv, None, images=False)
    elif layout == "brats2020 flat _seg files":
        cid, conv = "BraTS20_Training_004", "brats2020"
        save(ref / f"{cid}_seg.nii.gz", FROM_CANONICAL[conv][tumour()])
    elif layout == "brats2023 flat -seg files":
        cid, conv = "BraTS-GLI-00003-000", "brats2023"
        save(ref / f"{cid}-seg.nii.gz", FROM_CANONICAL[conv][tumour()])
    elif layout in ("msd task", "msd labelsTr", "msd task, FLAIR second in dataset.json"):
        cid, conv = "BRATS_001", "msd"
        task = ref / "Task01_BrainTumour"
        image = np.stack([np.full(SHAPE, v, np.float32) for v in (FLAIR, 1, 2, 3)], -1)
        if layout.endswith("dataset.json"):
            image = image[..., [1, 0, 2, 3]]
            names = {"0": "T1w", "1": "FLAIR", "2": "t1gd", "3": "T2w"}
            task.mkdir(parents=True)
            (task / "dataset.json").write_text(json.dumps({"modality": names}))
        save(task / "imagesTr" / f"{cid}.nii.gz", image)
        save(task / "labelsTr" / f"{cid}.nii.gz", FROM_CANONICAL[conv][tumour()])
        if layout == "msd labelsTr":
            (root / "ref_labels").mkdir()
            (task / "labelsTr").rename(root / "ref_labels" / "labelsTr")
    else:
        raise ValueError(layout)
    save(root / "pred" / f"{cid}.nii.gz", FROM_CANONICAL[conv][tumour(1)])
    return cid, conv


@pytest.mark.parametrize(
    "layout",
    [
        "brats2020 case folders",
        "brats2020 case 355",
        "brats2023 case folders",
        "brats2023 segmentation folders",
        "brats2020 flat _seg files",
        "brats2023 flat -seg files",
        "msd task",
        "msd labelsTr",
    ],
)
def test_cli_finds_references_in_every_layout_with_their_labels(tmp_path, layout):
    """No --labels: each layout's convention is inferred (a wrong one either refuses a label
    value or mixes edema and core, and the Dice values below differ)."""
    cid, _ = write_layout(tmp_path, layout)
    refs = tmp_path / ("ref_labels/labelsTr" if layout == "msd labelsTr" else "ref")
    out = tmp_path / "out" / "metrics.csv"
    code = main(
        ["--predictions", str(tmp_path / "pred"), "--references", str(refs), "--output", str(out)]
        + ["--quiet"]
    )
    assert code == 0
    df = pd.read_csv(out).set_index("region")
    assert list(df.case_id.unique()) == [cid]
    expected = case_metrics(tumour(1), tumour(), SPACING)
    for region in ("wt", "tc", "et"):
        assert df.loc[region, "dice"] == pytest.approx(expected[region]["dice"]), region
    assert expected["tc"]["dice"] != expected["wt"]["dice"]


def test_cli_labels_overrides_the_layout(tmp_path, capsys):
    write_layout(tmp_path, "brats2023 case folders")
    args = ["--predictions", str(tmp_path / "pred"), "--references", str(tmp_path / "ref")]
    out = ["--output", str(tmp_path / "out" / "metrics.csv"), "--quiet"]
    assert main([*args, *out, "--labels", "brats2020"]) == 2  # 3 is not a brats2020 value
    assert "unexpected label value 3" in capsys.readouterr().err
    assert main([*args, *out, "--labels", "brats2023", "--pred-labels", "brats2023"]) == 0


# ---------------------------------------------------------------- regions of each convention


def evaluate(root: Path, refs: Path, *extra: str) -> tuple[int, Path]:
    out = root / "out" / "metrics.csv"
    args = ["--predictions", str(root / "pred"), "--references", str(refs), "--output", str(out)]
    return main([*args, "--quiet", *extra]), out


@pytest.mark.parametrize("layout", ["brats2020 case folders", "brats2023 case folders", "msd task"])
def test_cli_scores_netc_and_snfh_and_no_cavity_where_the_convention_has_none(tmp_path, layout):
    """NETC and SNFH are single labels, different in each convention (MSD swaps them): their
    rows equal the canonical necrotic core's and edema's; no RC row without a cavity label."""
    cid, _ = write_layout(tmp_path, layout)
    code, out = evaluate(tmp_path, tmp_path / "ref")
    assert code == 0
    df = pd.read_csv(out).set_index("region")
    assert list(df.index) == CANONICAL_REGIONS and list(df.case_id.unique()) == [cid]
    expected = case_metrics(tumour(1), tumour(), SPACING)
    for region in ("netc", "snfh"):
        for metric in BASE_METRICS:
            assert df.loc[region, metric] == pytest.approx(expected[region][metric]), region
        assert df.loc[region, ["lesions_ref", "lesions_pred", "matched"]].tolist() == [1, 1, 1]
        assert df.loc[region, "lesion_dice"] == pytest.approx(expected[region]["dice"])
    assert expected["netc"]["dice"] != expected["snfh"]["dice"]
    lesions = pd.read_csv(out.with_name("metrics_lesions.csv"))
    assert set(lesions.region) == set(CANONICAL_REGIONS)
    summary = pd.read_csv(out.with_name("metrics_summary.csv"))
    assert set(summary.region) == set(CANONICAL_REGIONS)


CAVITY = (slice(1, 4), slice(16, 19), slice(3, 7))  # away from the tumour
CAVITY_PRED = (slice(2, 5), slice(16, 19), slice(3, 7))  # shifted by one voxel: Dice 2/3


def test_cli_scores_the_resection_cavity_of_brats2024_references(tmp_path):
    """BraTS 2024 label 4 (resection cavity) is no tumour: WT, TC and ET ignore it and the RC
    row scores it. A prediction read as brats2020 has no cavity: RC is one missed lesion."""
    ref, pred = tumour(), tumour(1)  # BraTS 2024 keeps 1/2/3 and adds 4
    ref[CAVITY], pred[CAVITY_PRED] = 4, 4
    save(tmp_path / "ref" / "c.nii.gz", ref)
    save(tmp_path / "pred" / "c.nii.gz", pred)
    code, out = evaluate(tmp_path, tmp_path / "ref", "--labels", "brats2024")
    assert code == 0
    df = pd.read_csv(out).set_index("region")
    assert list(df.index) == [*CANONICAL_REGIONS, "rc"]
    expected = case_metrics(tumour(1), tumour(), SPACING)
    for region in CANONICAL_REGIONS:
        assert df.loc[region, "dice"] == pytest.approx(expected[region]["dice"]), region
    rc = df.loc["rc"]
    assert rc.dice == pytest.approx(2 / 3) and rc.lesion_dice == pytest.approx(2 / 3)
    assert (rc.lesions_ref, rc.lesions_pred, rc.matched, rc.missed, rc.false) == (1, 1, 1, 0, 0)
    lesions = pd.read_csv(out.with_name("metrics_lesions.csv"))
    assert lesions[lesions.region == "rc"].status.tolist() == ["matched"]
    assert "rc" in set(pd.read_csv(out.with_name("metrics_summary.csv")).region)

    save(tmp_path / "pred" / "c.nii.gz", TO_BRATS2020[tumour(1)])
    code, out = evaluate(
        tmp_path, tmp_path / "ref", "--labels", "brats2024", "--pred-labels", "brats2020"
    )
    assert code == 0
    df = pd.read_csv(out).set_index("region")
    assert df.loc["et", "dice"] == pytest.approx(expected["et"]["dice"])  # 4 read as ET
    assert df.loc["rc", ["dice", "lesions_ref", "lesions_pred", "missed"]].tolist() == [0, 1, 0, 1]


class _Module:
    def eval(self):
        return self


def test_test_stage_logs_netc_and_snfh_and_averages_wt_tc_et(monkeypatch):
    """The training test stage scores canonical labels: NETC and SNFH reach the MLflow means
    (there is no cavity label), and ``*_mean`` stays the mean of WT, TC and ET."""
    from tumorseg.data.case import Case
    from tumorseg.evaluation import test_stage as case_eval

    monkeypatch.setattr(case_eval, "predict_case", lambda module, case, **kwargs: tumour(1))
    image = np.zeros((4, *SHAPE), np.float32)
    cases = [Case(cid, image, tumour(), np.diag([*SPACING, 1.0])) for cid in ("a", "b")]
    means = case_eval.test_stage(_Module(), cases, [], logger=None)
    expected = case_metrics(tumour(1), tumour(), SPACING)
    for region in CANONICAL_REGIONS:
        assert means[f"test/dice_{region}"] == pytest.approx(expected[region]["dice"]), region
        assert f"test/lesion_dice_{region}" in means and f"test/lesion_hd95_{region}" in means
    assert not [name for name in means if name.endswith("_rc")]
    wt_tc_et = np.mean([expected[r]["dice"] for r in ("wt", "tc", "et")])
    assert means["test/dice_mean"] == pytest.approx(wt_tc_et)


# ---------------------------------------------------------------- overlays


@pytest.mark.parametrize(
    "layout",
    [
        "brats2020 case folders",
        "brats2023 case folders",
        "msd task",
        "msd task, FLAIR second in dataset.json",
    ],
)
def test_cli_overlays_show_the_flair_of_every_layout(tmp_path, layout, monkeypatch):
    """The FLAIR is found as tumorseg-prepare finds it: ``_flair``, ``-t2f``, the MSD image's
    FLAIR channel (``dataset.json`` order); the overlay is drawn on it."""
    from tumorseg.inference import overlay

    drawn = {}
    draw = overlay.overlay_figure

    def spy(image, truth, pred, affine, title="", **kwargs):
        drawn[title] = (image, truth, pred)
        return draw(image, truth, pred, affine, title, **kwargs)

    monkeypatch.setattr(overlay, "overlay_figure", spy)
    cid, _ = write_layout(tmp_path, layout)
    code, _ = evaluate(tmp_path, tmp_path / "ref", "--overlays", str(tmp_path / "overlays"))
    assert code == 0
    assert [p.name for p in (tmp_path / "overlays").iterdir()] == [f"{cid}.png"]
    assert (tmp_path / "overlays" / f"{cid}.png").read_bytes()[:4] == b"\x89PNG"
    image, truth, pred = drawn[cid]
    assert np.all(image == FLAIR)
    assert np.array_equal(truth, tumour()) and np.array_equal(pred, tumour(1))  # canonical


@pytest.mark.parametrize("problem", ["truncated", "shape"])
def test_cli_bad_flair_for_overlays_writes_nothing(tmp_path, problem, capsys):
    cid, _ = write_layout(tmp_path, "brats2023 case folders")
    flair = tmp_path / "ref" / cid / f"{cid}-t2f.nii.gz"
    if problem == "truncated":
        flair.write_bytes(flair.read_bytes()[:-20])  # cut off the end of the gzip stream
    else:  # every modality of another shape: a consistent case whose grid is not the reference's
        for path in flair.parent.glob(f"{cid}-t*.nii.gz"):
            save(path, np.ones((8, 8, 8), np.float32))
    code, out = evaluate(tmp_path, tmp_path / "ref", "--overlays", str(tmp_path / "overlays"))
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tumorseg-evaluate: error: {flair.parent}")
    assert not out.parent.exists() and not (tmp_path / "overlays").exists()


def test_cli_overlays_for_the_complete_cases_of_an_incomplete_data_set(tmp_path):
    """One case folder holds only its segmentation, so the data set does not list as a whole;
    the case folder that has its images still gets its overlay."""
    cid, conv = write_layout(tmp_path, "brats2023 case folders")
    brats_case(tmp_path / "ref", "BraTS-GLI-00009-000", conv, None, images=False)
    save(tmp_path / "pred" / "BraTS-GLI-00009-000.nii.gz", FROM_CANONICAL[conv][tumour(1)])
    code, out = evaluate(tmp_path, tmp_path / "ref", "--overlays", str(tmp_path / "overlays"))
    assert code == 0
    assert set(pd.read_csv(out).case_id) == {cid, "BraTS-GLI-00009-000"}
    assert [p.name for p in (tmp_path / "overlays").iterdir()] == [f"{cid}.png"]
