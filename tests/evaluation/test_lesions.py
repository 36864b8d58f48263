"""Lesion-wise and global BraTS metrics against the official evaluator's numbers.

``tests/fixtures/brats_parity/reference.json`` holds what the official ``BraTS-evaluation``
package (``gli`` config) reports for the committed NIfTI pairs; ``scripts/brats_reference.py``
regenerates it in a venv of its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial import cKDTree

from tumorseg.core.labels import CONVENTIONS
from tumorseg.core.labels import REGIONS as CANONICAL_REGIONS
from tumorseg.core.labels import REGIONS_BY_CONVENTION as REGIONS
from tumorseg.evaluation import lesions
from tumorseg.evaluation.lesions import score_case, score_region, surface

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "brats_parity"
REFERENCE = json.loads((DATA / "reference.json").read_text())
CASES = REFERENCE["cases"]
ISOTROPIC = [c for c, v in CASES.items() if v["spacing"] == [1.0, 1.0, 1.0]]
ANISOTROPIC = [c for c, v in CASES.items() if v["spacing"] != [1.0, 1.0, 1.0]]
GLOBAL = {"dsc": "global_dsc", "nsd": "global_nsd", "hd95": "global_hd95"}
LESION_WISE = [f"{kind}_{m}" for kind in ("lesion", "penalised") for m in ("dsc", "nsd", "hd95")]
COUNTS = {"n_ref": "n_ref", "n_pred": "n_pred", "matched": "tp", "missed": "fn", "false": "fp"}


def load(case_id: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Prediction, reference (BraTS 2024 GLI labels) and the header's voxel size."""
    ref = nib.load(DATA / "references" / f"{case_id}-seg.nii.gz")
    pred = nib.load(DATA / "predictions" / f"{case_id}.nii.gz")
    spacing = tuple(float(z) for z in ref.header.get_zooms()[:3])
    return np.asarray(pred.dataobj), np.asarray(ref.dataobj), spacing


def close(ours: float, official: float) -> bool:
    return ours == pytest.approx(official, abs=1e-6, nan_ok=True)


def matched_lesions(score) -> list[tuple[int, float, float, float]]:
    return sorted(
        (x.ref_voxels, x.dsc, x.nsd, x.hd95) for x in score.lesions if x.status == "matched"
    )


def official_matched(region: dict) -> list[tuple[int, float, float, float]]:
    return sorted(
        (x["voxels"], x["dsc"], x["nsd"], x["hd95"]) for x in region["lesions"] if x["matched"]
    )


def assert_lesions_equal(ours, theirs):
    assert [x[0] for x in ours] == [x[0] for x in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a[1:] == pytest.approx(b[1:], abs=1e-6)


@pytest.mark.parametrize("case_id", ISOTROPIC, ids=lambda c: CASES[c]["description"][:40])
def test_isotropic_case_equals_official_evaluator(case_id):
    pred, ref, spacing = load(case_id)
    scores = score_case(pred, ref, spacing, "brats2024")
    assert set(scores) == set(CASES[case_id]["regions"])
    for region, official in CASES[case_id]["regions"].items():
        row = scores[region].row()
        for ours, theirs in COUNTS.items():
            assert row[ours] == official[theirs], (region, ours)
        for ours, theirs in GLOBAL.items():
            assert close(row[ours], official[theirs]), (region, ours, row[ours], official[theirs])
        for name in LESION_WISE:
            assert close(row[name], official[name]), (region, name, row[name], official[name])
        assert_lesions_equal(matched_lesions(scores[region]), official_matched(official))
        missed = sorted(x.ref_voxels for x in scores[region].lesions if x.status == "missed")
        assert missed == sorted(x["voxels"] for x in official["lesions"] if not x["matched"])


def test_fixtures_cover_the_edge_cases():
    regions = [r for c in CASES.values() for r in c["regions"].values()]
    assert any(r["fn"] and r["tp"] for r in regions), "a missed lesion next to a found one"
    assert any(r["fp"] and r["tp"] for r in regions), "a false lesion next to a found one"
    assert any(r["n_pred"] == 0 < r["n_ref"] for r in regions), "an empty prediction"
    assert any(r["n_ref"] == 0 < r["n_pred"] for r in regions), "an empty reference"
    assert any(r["n_ref"] == r["n_pred"] == 0 for r in regions), "a region absent on both sides"
    merged = CASES["BraTS-GLI-00004-000"]["regions"]["wt"]
    assert (merged["n_ref"], merged["n_pred"], merged["tp"]) == (1, 2, 1)
    assert ANISOTROPIC, "an anisotropic case"
    assert sum(p.stat().st_size for p in DATA.rglob("*")) < 1_000_000


@pytest.mark.parametrize("case_id", ANISOTROPIC)
def test_anisotropic_case_differs_from_official_only_by_the_documented_causes(case_id):
    """The official evaluator (1) computes global NSD and HD95 without the voxel spacing, in
    voxel units, and (2) reads NIfTI with SimpleITK, whose (x, y, z) spacing it applies to the
    (z, y, x) array: per-lesion distances use the spacing in reversed axis order. tumorseg is in
    mm along the right axes; feeding it those two spacings reproduces the official numbers."""
    pred, ref, spacing = load(case_id)
    assert len(set(spacing)) > 1
    ours = score_case(pred, ref, spacing, "brats2024")
    in_voxels = score_case(pred, ref, (1.0, 1.0, 1.0), "brats2024")
    reversed_axes = score_case(pred, ref, spacing[::-1], "brats2024")
    differs = 0
    for region, official in CASES[case_id]["regions"].items():
        for ours_name, theirs in COUNTS.items():  # lesions and matching do not use the spacing
            assert ours[region].row()[ours_name] == official[theirs]
        assert close(ours[region].dsc, official["global_dsc"])
        for name in ("nsd", "hd95"):
            assert close(in_voxels[region].row()[name], official[GLOBAL[name]]), (region, name)
        for name in LESION_WISE:
            assert close(reversed_axes[region].row()[name], official[name]), (region, name)
        assert_lesions_equal(matched_lesions(reversed_axes[region]), official_matched(official))
        if official["tp"]:
            differs += not close(ours[region].lesion_hd95, official["lesion_hd95"])
            differs += not close(ours[region].hd95, official["global_hd95"])
    assert differs >= 4, "the fixture should show both differences"


def brute_force(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances from point clouds (no distance transform, no cropping)."""
    s = np.asarray(spacing)
    pts_p, pts_r = np.argwhere(surface(pred)) * s, np.argwhere(surface(ref)) * s
    return cKDTree(pts_p).query(pts_r)[0], cKDTree(pts_r).query(pts_p)[0]


@pytest.mark.parametrize("convention", ["pooled", "max"])
def test_global_and_lesion_distances_in_mm_match_brute_force(convention):
    pred, ref, spacing = load(ANISOTROPIC[0])
    wt = np.isin(pred, (1, 2, 3)), np.isin(ref, (1, 2, 3))
    d_ref, d_pred = brute_force(*wt, spacing)
    expected = (
        np.percentile(np.concatenate([d_ref, d_pred]), 95)
        if convention == "pooled"
        else max(np.percentile(d_ref, 95), np.percentile(d_pred, 95))
    )
    score = score_region(*wt, spacing, hd95=convention, nsd_tolerance=2.0)
    assert score.hd95 == pytest.approx(expected, abs=1e-9)
    within = (np.mean(d_ref <= 2.0) + np.mean(d_pred <= 2.0)) / 2
    assert score.nsd == pytest.approx(within, abs=1e-12)


def test_far_false_blob_pooled_hides_it_max_shows_it():
    ref = np.zeros((40, 40, 40), bool)
    ref[5:15, 5:15, 5:15] = True
    pred = ref.copy()
    pred[30:34, 30:34, 30:33] = True  # 44 of 532 predicted surface voxels (8 %)
    pooled = score_region(pred, ref, (1.0, 1.0, 1.0), hd95="pooled")
    worst = score_region(pred, ref, (1.0, 1.0, 1.0), hd95="max")
    assert pooled.hd95 == 0.0
    d_ref, d_pred = brute_force(pred, ref, (1.0, 1.0, 1.0))
    assert worst.hd95 == pytest.approx(np.percentile(d_pred, 95)) and worst.hd95 > 20
    # per lesion the blob is a false lesion, so it does not enter the matched lesion's HD95
    assert (pooled.matched, pooled.false, pooled.lesion_hd95, worst.lesion_hd95) == (1, 1, 0, 0)
    assert worst.hd95_convention == "max"


def test_matching_is_maximum_bipartite_not_greedy():
    """Reference lesions A [0, 10) and B [14, 20), predicted lesions Y [0, 3) and X [4, 16)
    along one axis. Greedy best-Dice-first takes A-X (0.55) and leaves B unmatched; the
    maximum matching takes A-Y (0.46) and B-X (0.22)."""
    ref, pred = np.zeros((24, 3, 3), bool), np.zeros((24, 3, 3), bool)
    ref[0:10, 1, 1] = ref[14:20, 1, 1] = True
    pred[0:3, 1, 1] = pred[4:16, 1, 1] = True
    score = score_region(pred, ref, (1.0, 1.0, 1.0))
    assert (score.n_ref, score.n_pred, score.matched, score.missed, score.false) == (2, 2, 2, 0, 0)
    assert sorted(round(x.dsc, 3) for x in score.lesions) == [0.222, 0.462]
    assert score.lesion_dsc == pytest.approx((6 / 13 + 4 / 18) / 2)


def test_lesions_are_26_connected():
    ref = np.zeros((8, 8, 8), bool)
    ref[1:3, 1:3, 1:3] = True
    ref[3:5, 3:5, 3:5] = True  # touches the first cube at one corner only
    score = score_region(ref, ref, (1.0, 1.0, 1.0))
    assert (score.n_ref, score.n_pred, score.matched) == (1, 1, 1)
    assert score.lesion_dsc == score.dsc == 1.0


def test_empty_and_disjoint_masks_follow_the_official_rules():
    empty = np.zeros((10, 10, 10), bool)
    a, b = empty.copy(), empty.copy()
    a[1:4, 1:4, 1:4] = True
    b[6:9, 6:9, 6:9] = True
    both_empty = score_region(empty, empty, (1, 1, 1))
    assert all(math.isnan(v) for k, v in both_empty.row().items() if k not in COUNTS)
    for pred, ref in ((empty, a), (b, empty), (b, a)):
        s = score_region(pred, ref, (1, 1, 1))
        assert (s.dsc, s.nsd, s.hd95, s.lesion_dsc, s.lesion_hd95) == (0, 0, math.inf, 0, math.inf)
        assert s.row()["hd95"] == lesions.REPORTED_INF == 373.0
    assert math.isnan(score_region(b, empty, (1, 1, 1)).penalised_dsc)  # no reference lesion
    missed = score_region(empty, a, (1, 1, 1))
    assert (missed.penalised_dsc, missed.penalised_hd95) == (0.0, 373.0)


def test_cropped_and_whole_volume_agree():
    pred, ref, spacing = load(ANISOTROPIC[0])
    cropped = score_case(pred, ref, spacing, "brats2024", hd95="max")
    whole = score_case(pred, ref, spacing, "brats2024", hd95="max", crop=False)
    for region in cropped:
        assert cropped[region] == whole[region]


def test_region_tables_agree_with_the_label_conventions():
    canonical = REGIONS["canonical"]
    for region, labels in CANONICAL_REGIONS.items():
        assert canonical[region] == labels
    for convention, table in REGIONS.items():
        if convention == "canonical":
            continue
        for region, values in table.items():
            mapped = {CONVENTIONS[convention][v] for v in values}
            expected = {0} if region == "rc" else set(canonical[region])
            assert mapped == expected, (convention, region)


def test_bad_input_is_refused():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        score_region(a, np.zeros((4, 4, 5), bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        score_region(a, a, (1, 0, 1))
    with pytest.raises(ValueError, match="HD95 convention"):
        score_region(a, a, (1, 1, 1), hd95="mean")
    with pytest.raises(ValueError, match="tolerance"):
        score_region(a, a, (1, 1, 1), nsd_tolerance=-1)


# ---------------------------------------------------------------- tumorseg-evaluate


def run_evaluate(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    """``tumorseg-evaluate`` on the parity fixtures as committed (``<id>-seg.nii.gz``
    references; ``--labels brats2024`` for the resection cavity label 4)."""
    from tumorseg.cli.evaluate import main

    out = tmp_path / "out" / "metrics.csv"
    args = ["--predictions", str(DATA / "predictions"), "--references", str(DATA / "references")]
    code = main([*args, "--output", str(out), "--labels", "brats2024", "--quiet", *extra])
    return code, out


@pytest.mark.filterwarnings("ignore:vert. bool was deprecated")
def test_evaluate_cli_reports_the_official_lesion_wise_numbers(tmp_path):
    import pandas as pd

    code, out = run_evaluate(tmp_path)
    assert code == 0
    df = pd.read_csv(out).set_index(["case_id", "region"])
    lesions = pd.read_csv(out.with_name("metrics_lesions.csv"))
    columns = {
        "lesions_ref": "n_ref",
        "lesions_pred": "n_pred",
        "matched": "tp",
        "missed": "fn",
        "false": "fp",
        "lesion_dice": "lesion_dsc",
        "lesion_nsd": "lesion_nsd",
        "penalised_dice": "penalised_dsc",
        "penalised_nsd": "penalised_nsd",
        "penalised_hd95": "penalised_hd95",
    }
    for case_id in ISOTROPIC:
        # every region of the BraTS 2024 labels: WT, TC, ET, NETC, SNFH and RC
        assert sorted(df.loc[case_id].index) == sorted(CASES[case_id]["regions"])
        for region, official in CASES[case_id]["regions"].items():
            row = df.loc[(case_id, region)]
            for ours, theirs in columns.items():
                assert close(row[ours], official[theirs]), (case_id, region, ours)
            assert close(row["lesion_hd95"], lesions_reported(official["lesion_hd95"]))
            assert close(row["nsd"], official["global_nsd"])
            if official["tp"]:  # overlapping masks: the case-level Dice and HD95 agree too
                assert close(row["dice"], official["global_dsc"])
                assert close(row["hd95"], official["global_hd95"])
            mine = lesions[(lesions.case_id == case_id) & (lesions.region == region)]
            assert sorted(mine[mine.status == "matched"].ref_voxels) == sorted(
                x["voxels"] for x in official["lesions"] if x["matched"]
            )
            assert (mine.status == "false").sum() == official["fp"]
            assert (mine.loc[mine.status != "matched", "hd95"] == 373.0).all()


def lesions_reported(value: float) -> float:
    return 373.0 if math.isinf(value) else value


@pytest.mark.filterwarnings("ignore:vert. bool was deprecated")
def test_evaluate_cli_hd95_max_names_its_columns(tmp_path):
    import pandas as pd

    code, out = run_evaluate(tmp_path, "--hd95", "max", "--nsd-tolerance", "2")
    assert code == 0
    df = pd.read_csv(out)
    assert {"hd95_max", "lesion_hd95_max", "penalised_hd95_max"} <= set(df.columns)
    assert not {"hd95", "lesion_hd95", "penalised_hd95"} & set(df.columns)
    assert (df.hd95_convention == "max").all()
    assert "hd95_max" in pd.read_csv(out.with_name("metrics_lesions.csv")).columns
    assert "hd95_max" in set(pd.read_csv(out.with_name("metrics_summary.csv")).metric)
    # the far false blob of case 3 is hidden by the pooled HD95 and not by max
    pred, ref, spacing = load("BraTS-GLI-00003-000")
    wt = score_region(np.isin(pred, (1, 2, 3)), np.isin(ref, (1, 2, 3)), spacing, hd95="max")
    row = df[(df.case_id == "BraTS-GLI-00003-000") & (df.region == "wt")].iloc[0]
    assert row["hd95_max"] == pytest.approx(wt.hd95) and wt.hd95 > 10 > row["lesion_hd95_max"]
    assert row["nsd"] == pytest.approx(
        score_region(*(np.isin(a, (1, 2, 3)) for a in (pred, ref)), spacing, nsd_tolerance=2).nsd
    )


def test_evaluate_cli_refuses_a_negative_tolerance(tmp_path, capsys):
    code, out = run_evaluate(tmp_path, "--nsd-tolerance", "-1")
    assert code == 2 and not out.parent.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nsd-tolerance" in err


def test_case_means_name_the_lesion_wise_metrics_for_mlflow():
    from tumorseg.evaluation.cases import case_means, case_table, scored_rows

    pred, ref, spacing = load("BraTS-GLI-00002-000")  # BraTS 2023 labels = canonical 1/2/3
    for hd95, suffix in (("pooled", ""), ("max", "_max")):
        rows, lesion_rows = scored_rows("c", pred, ref, spacing, hd95)
        means = case_means(case_table(rows, hd95))
        for name in ("lesion_dice", f"lesion_hd95{suffix}", f"hd95{suffix}", "nsd", "missed"):
            assert f"test/{name}_wt" in means and f"test/{name}_mean" in means, name
        assert means["test/missed_wt"] == 1 and means["test/lesion_dice_wt"] == pytest.approx(
            CASES["BraTS-GLI-00002-000"]["regions"]["wt"]["lesion_dsc"]
        )
        assert {x["status"] for x in lesion_rows} == {"matched", "missed"}
