"""Reference values from the official BraTS evaluator for the lesion-wise parity fixtures.

The official evaluator is the ``BraTS-evaluation`` package (built on ``panoptica``). It is
AGPL-3.0 and pins ``pandas<3`` and ``numpy<2.3``, so it never enters tumorseg's environment:
this script builds it in a venv of its own, re-runs itself there, scores the fixture pairs in
``tests/fixtures/brats_parity/`` with the package's ``gli`` config exactly as ``brats-evaluate``
and ``brats-parse-metrics seg`` do, and writes ``tests/fixtures/brats_parity/reference.json``::

    python scripts/brats_reference.py                      # venv in /tmp/brats_eval_venv
    python scripts/brats_reference.py --venv ~/venvs/brats --fixtures   # also rewrite fixtures

``--fixtures`` regenerates the NIfTI pairs (deterministic) before scoring. Only numpy,
nibabel, pandas and the official package are used, so the script runs inside that venv
without tumorseg installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "brats_parity"
PACKAGES = ("BraTS-evaluation==0.0.10", "panoptica==2.1.7")
REGIONS = ("netc", "snfh", "et", "rc", "tc", "wt")

# ---------------------------------------------------------------- fixtures
# BraTS 2023 GLI labels: 1 NETC, 2 SNFH, 3 ET, 4 RC. File names follow BraTS 2023
# (``<id>-seg.nii.gz`` references, ``<id>.nii.gz`` predictions) so that the official
# ``brats-evaluate --ref_path references --pred_path predictions --config gli`` pairs them too.

CASES = {
    "BraTS-GLI-00001-000": "several lesions, each predicted slightly shifted, grown or shrunk",
    "BraTS-GLI-00002-000": "a missed lesion: two reference lesions, one predicted",
    "BraTS-GLI-00003-000": "a false lesion: a small predicted blob far from the only reference",
    "BraTS-GLI-00004-000": "two predicted lesions over one reference lesion (one-to-one match)",
    "BraTS-GLI-00005-000": "empty prediction",
    "BraTS-GLI-00006-000": "empty reference",
    "BraTS-GLI-00007-000": "anisotropic 0.9 x 0.9 x 2.5 mm, several lesions, shifted along x and z",
    "BraTS-GLI-00008-000": "resection cavity (4), no ET anywhere, prediction disjoint from NETC",
}


def _ball(shape, centre, radii, rng=None, lumps=0):
    """Boolean ellipsoid; ``lumps`` random bumps make its surface irregular."""
    import numpy as np

    grid = np.indices(shape, dtype=np.float64)
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    mask = d <= 1.0
    for _ in range(lumps):
        axis_dir = rng.normal(size=3)
        axis_dir /= np.linalg.norm(axis_dir)
        at = np.asarray(centre) + axis_dir * np.asarray(radii) * 0.9
        rad = np.asarray(radii) * rng.uniform(0.25, 0.45)
        mask |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, at, rad, strict=True)) <= 1.0
    return mask


def _tumour(seg, centre, radius, rng, lumps=3, cavity=False):
    """Paint a tumour: SNFH (2) around an ET (3) rim around a NETC (1) core; or RC (4)."""
    import numpy as np

    r = np.asarray(radius, dtype=np.float64)
    seg[_ball(seg.shape, centre, r, rng, lumps)] = 2
    if cavity:
        seg[_ball(seg.shape, centre, r * 0.55, rng, 1)] = 4
        return seg
    seg[_ball(seg.shape, centre, r * 0.6, rng, 2)] = 3
    seg[_ball(seg.shape, centre, r * 0.35, rng, 1)] = 1
    return seg


def _shift(seg, offset):
    import numpy as np

    return np.roll(seg, offset, axis=(0, 1, 2))


def _grow(seg, label_from, label_to):
    """Dilate label ``label_from`` by one voxel into voxels of ``label_to`` (or background)."""
    from scipy import ndimage

    out = seg.copy()
    grown = ndimage.binary_dilation(seg == label_from) & (seg == label_to)
    out[grown] = label_from
    return out


def _pairs():
    """``{case_id: (reference, prediction, spacing)}``: uint8 label volumes and mm spacing."""
    import numpy as np

    rng = np.random.default_rng(2023)
    iso, shape = (1.0, 1.0, 1.0), (48, 48, 48)
    z = lambda: np.zeros(shape, np.uint8)  # noqa: E731
    pairs = {}

    ref = z()
    _tumour(ref, (14, 14, 16), (7, 6, 6), rng)
    _tumour(ref, (33, 32, 30), (8, 7, 7), rng)
    _tumour(ref, (12, 35, 36), (4, 5, 4), rng, lumps=1)
    pred = _shift(ref, (1, 0, -1))
    pred = _grow(pred, 3, 2)  # ET grows into edema
    pred[36:, :, :] = np.where(pred[36:, :, :] == 2, 0, pred[36:, :, :])  # edema cut off
    pairs["BraTS-GLI-00001-000"] = (ref, pred, iso)

    ref = z()
    _tumour(ref, (15, 15, 15), (7, 7, 6), rng)
    _tumour(ref, (34, 33, 32), (6, 6, 7), rng)
    pred = z()
    _tumour(pred, (16, 15, 14), (7, 6, 6), np.random.default_rng(1))
    pairs["BraTS-GLI-00002-000"] = (ref, pred, iso)

    ref = z()
    _tumour(ref, (16, 18, 18), (9, 8, 8), rng)
    pred = _shift(ref, (0, 1, 0))
    pred[_ball(shape, (40, 40, 40), (2.5, 2.5, 2.5))] = 2  # far false-positive blob
    pairs["BraTS-GLI-00003-000"] = (ref, pred, iso)

    ref = z()
    _tumour(ref, (24, 24, 24), (14, 6, 6), rng, lumps=0)
    pred = ref.copy()
    pred[23:26] = 0  # a gap splits the prediction in two
    pred = _shift(pred, (0, 1, 0))
    pairs["BraTS-GLI-00004-000"] = (ref, pred, iso)

    ref = z()
    _tumour(ref, (20, 24, 26), (8, 8, 7), rng)
    pairs["BraTS-GLI-00005-000"] = (ref, z(), iso)

    pred = z()
    _tumour(pred, (26, 22, 20), (7, 8, 7), rng)
    pairs["BraTS-GLI-00006-000"] = (z(), pred, iso)

    shape_a, spacing_a = (64, 64, 40), (0.9, 0.9, 2.5)
    ref = np.zeros(shape_a, np.uint8)
    _tumour(ref, (20, 22, 12), (9, 10, 4), rng)
    _tumour(ref, (44, 42, 26), (10, 9, 4), rng)
    _tumour(ref, (46, 16, 30), (5, 5, 2), rng, lumps=1)
    pred = np.roll(ref, (3, 1), axis=(0, 2))
    pred = _grow(pred, 1, 3)
    pairs["BraTS-GLI-00007-000"] = (ref, pred, spacing_a)

    ref = z()
    _tumour(ref, (18, 18, 20), (9, 8, 8), rng, cavity=True)
    ref[_ball(shape, (36, 36, 34), (3, 3, 3))] = 1  # a NETC island
    pred = _shift(ref, (1, 1, 0))
    pred[pred == 1] = 0
    pred[_ball(shape, (8, 40, 40), (2, 2, 2))] = 1  # NETC predicted elsewhere only
    pairs["BraTS-GLI-00008-000"] = (ref, pred, iso)
    return pairs


def write_fixtures(folder: Path = FIXTURES) -> None:
    """Write ``references/<id>-seg.nii.gz``, ``predictions/<id>.nii.gz`` and ``cases.json``."""
    import nibabel as nib
    import numpy as np

    for sub in ("references", "predictions"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    meta = {}
    for case_id, (ref, pred, spacing) in _pairs().items():
        affine = np.diag([*spacing, 1.0])
        for arr, path in (
            (ref, folder / "references" / f"{case_id}-seg.nii.gz"),
            (pred, folder / "predictions" / f"{case_id}.nii.gz"),
        ):
            img = nib.Nifti1Image(arr.astype(np.uint8), affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, path)
        meta[case_id] = {
            "description": CASES[case_id],
            "shape": list(ref.shape),
            "spacing": list(spacing),
        }
    (folder / "cases.json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------- official scoring


def _number(value):
    """JSON-safe float: ``inf`` and ``nan`` stay as Python's json writes them."""
    if value is None:
        return None
    return float(value)


def score(folder: Path = FIXTURES) -> dict:
    """Score every fixture pair with the official evaluator (``gli`` config)."""
    import importlib.metadata as md

    import pandas as pd
    from brats_evaluation import config_path, evaluate_single_exam
    from brats_evaluation.metrics_parser import parse_mets_results, parse_seg_results
    from panoptica import Panoptica_Evaluator

    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    cases = json.loads((folder / "cases.json").read_text())
    raw = {"metrics": [], "missings": []}
    for case_id in cases:
        result = evaluate_single_exam(
            prediction_filepath=str(folder / "predictions" / f"{case_id}.nii.gz"),
            reference_filepath=str(folder / "references" / f"{case_id}-seg.nii.gz"),
            subject_identifier=case_id,
            evaluator=evaluator,
        )
        if "error" in result:
            raise RuntimeError(f"{case_id}: official evaluator failed: {result['error']}")
        raw["metrics"].append(result)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "raw.json").write_text(json.dumps(raw))
        parse_seg_results(str(tmp / "raw.json"), str(tmp / "seg.csv"))
        # volume threshold 0: every lesion counts as "large", so missed and false lesions
        # enter the lesion-wise means as DSC 0 / HD95 373 (the penalised definition).
        parse_mets_results(str(tmp / "raw.json"), 0.0, 0.1, str(tmp / "mets.csv"))
        seg = pd.read_csv(tmp / "seg.csv").set_index("subject_id")
        mets = pd.read_csv(tmp / "mets.csv").set_index("subject_id")

    out = {
        "generator": "scripts/brats_reference.py",
        "packages": {
            p: md.version(p)
            for p in (
                "BraTS-evaluation",
                "panoptica",
                "numpy",
                "scipy",
                "connected-components-3d",
                "SimpleITK",
            )
        },
        "config": "gli",
        "cases": {},
    }
    for result in raw["metrics"]:
        case_id = result["subject_name"]
        regions = {}
        for region in REGIONS:
            r = result[region]
            lesions = [
                {
                    "matched": bool(row["is_matched"]),
                    "voxels": int(row["voxel_count"]),
                    "dsc": _number(row.get("sq_dsc")),
                    "nsd": _number(row.get("sq_nsd")),
                    "hd95": _number(row.get("sq_hd95")),
                }
                for row in r.get("reference_instances", [])
            ]
            regions[region] = {
                "n_ref": int(r["num_ref_instances"])
                if "num_ref_instances" in r
                else int(r["n_ref_instances"]),
                "n_pred": int(r["n_pred_instances"]),
                "tp": int(r["tp"]),
                "fp": int(r["fp"]),
                "fn": int(r["fn"]),
                "raw_global_hd95": _number(r.get("global_bin_hd95")),
                "global_dsc": _number(seg.loc[case_id, f"global_dsc_{region}"]),
                "global_nsd": _number(seg.loc[case_id, f"global_nsd_{region}"]),
                "global_hd95": _number(seg.loc[case_id, f"global_hd95_{region}"]),
                "lesion_dsc": _number(seg.loc[case_id, f"lesionwise_dsc_mean_{region}"]),
                "lesion_nsd": _number(seg.loc[case_id, f"lesionwise_nsd_mean_{region}"]),
                "lesion_hd95": _number(seg.loc[case_id, f"lesionwise_hd95_mean_{region}"]),
                "penalised_dsc": _number(mets.loc[case_id, f"lesionwise_dsc_mean_{region}"]),
                "penalised_nsd": _number(mets.loc[case_id, f"lesionwise_nsd_mean_{region}"]),
                "penalised_hd95": _number(mets.loc[case_id, f"lesionwise_hd95_mean_{region}"]),
                "lesions": lesions,
            }
        out["cases"][case_id] = {**cases[case_id], "regions": regions}
    return out


# ---------------------------------------------------------------- driver


def _inside_venv() -> bool:
    try:
        import brats_evaluation  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv",
        type=Path,
        default=Path("/tmp/brats_eval_venv"),
        help="venv for the official evaluator (created if missing)",
    )
    parser.add_argument(
        "--fixtures", action="store_true", help="regenerate the fixture NIfTI pairs before scoring"
    )
    parser.add_argument("--output", type=Path, default=FIXTURES / "reference.json")
    args = parser.parse_args(argv)

    if not _inside_venv():
        python = args.venv / "bin" / "python"
        if not python.exists():
            print(f"creating {args.venv} with {' '.join(PACKAGES)}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "venv", str(args.venv)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True)
        env = {**os.environ, "PYTHONNOUSERSITE": "1"}
        cmd = [str(python), str(Path(__file__).resolve()), *(argv or sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode

    if args.fixtures:
        write_fixtures(FIXTURES)
    values = score(FIXTURES)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(values, indent=1) + "\n")
    tmp.replace(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
