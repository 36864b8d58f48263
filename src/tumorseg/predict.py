"""Segment new patients with a trained checkpoint: ``tumorseg-predict``.

Inputs, one of:

* ``--input CASE_DIR``: a BraTS case folder, 2020/2021 naming ``ID/ID_{flair,t1,t1ce,t2}.nii[.gz]``
  or 2023 naming ``ID/ID-{t2f,t1n,t1c,t2w}.nii[.gz]``; a ``seg`` file is optional (only the
  overlay uses it, as ground truth);
* ``--input IMAGE``: an MSD Task01 4D image ``(X, Y, Z, 4)`` (its label in ``../labelsTr/``, if
  any, is the overlay's ground truth);
* ``--input ROOT``: a folder of BraTS case folders or an MSD Task01 folder (``imagesTr/``,
  ``imagesTs/``); ``--output`` is then a folder receiving ``<case_id>.nii.gz`` per case;
* ``--flair F --t1 F --t1ce F --t2 F``: four 3D NIfTI files given explicitly (no ``--input``).

Output: a uint8 segmentation NIfTI with the input's shape, affine, qform/sform codes and units
(copied from the header of the first modality file, or of the MSD image). Labels follow
``--labels``; by default the input's own convention: ``brats2023`` (0/1/2/3) for 2023 naming,
``msd`` (1 edema, 2 non-enhancing, 3 enhancing) for MSD images, ``brats2020`` (0/1/2/4)
otherwise.

Inference repeats training's preprocessing: z-score per volume over brain voxels, axial slices
area-resized to the checkpoint's ``data.image_size``; the logits are resized back to the native
slice size (bilinear) before thresholding (region nets: sigmoid > 0.5, turned into labels by
``labels_from_regions``) or argmax (label nets). Slices without any brain voxel are background
and skip the net. Slices go through the net in batches, in bf16 autocast with channels-last
memory on CPUs with native bf16 (and on GPUs), fp32 otherwise. ``--tta`` averages the
probabilities over four flips of each slice (none, left-right, up-down, both).

``--min-et-voxels N`` relabels enhancing-tumour connected components (26-connected, in 3D) of
fewer than N voxels as necrotic core (NCR): they stay in the tumour core and whole tumour, as
is usual in BraTS post-processing, but no longer count as enhancing.

Bad input (missing modality, unreadable file, mismatched geometry, bad checkpoint) prints one
line naming the file and exits with status 2; nothing is written, also for a folder of cases
(all outputs are written to temporary files and renamed at the end).

``tumorseg-predict --benchmark [--checkpoint CKPT]`` times one demo case (240x240x155) with and
without TTA next to a naive one-slice-at-a-time fp32 loop, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from tumorseg import cli
from tumorseg.bench import cpu_name
from tumorseg.cli import ArgError, Parser
from tumorseg.data.nifti import MODALITIES, SUFFIXES, Case, read_images, zscore
from tumorseg.data.readers import CaseRef, list_cases, read_any
from tumorseg.errors import DataError
from tumorseg.labels import CONVENTIONS, from_canonical, labels_from_regions
from tumorseg.module import SegModule, load_checkpoint
from tumorseg.precision import cpu_has_bf16

PROG = "tumorseg-predict"
FLIPS: tuple[tuple[int, ...], ...] = ((), (-2,), (-1,), (-2, -1))  # slice dims (N, C, X, Y)
NCR, ET = 1, 3  # canonical labels
OVERLAY_MODALITIES = ("flair", "t1ce")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- model


def pick_device(name: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a DataError."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def first_line(err: BaseException) -> str:
    """An exception as one short line."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_for_inference(ckpt: str | Path, device: str | torch.device = "cpu") -> SegModule:
    """The checkpoint's module in eval mode on ``device`` (tensors mapped there on load, so a
    checkpoint saved on a GPU loads on a CPU-only machine). Problems raise a DataError."""
    path = Path(ckpt)
    device = pick_device(device)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file")
    try:
        module = load_checkpoint(path, map_location=device)
    except Exception as err:  # torch.load, hydra and load_state_dict raise many types
        raise DataError(f"{path}: not a usable tumorseg checkpoint ({first_line(err)})") from None
    module.to(device).eval()
    if autocast_dtype(device) is not None:
        module.net.to(memory_format=torch.channels_last)
    return module


def training_size(module: SegModule) -> int | None:
    """Slice size the net was trained at (``data.image_size``), None for native size."""
    size = ((module.config or {}).get("data") or {}).get("image_size")
    return int(size) if size else None


def size_step(module: SegModule) -> int:
    """Net input height and width must be multiples of this."""
    return 2 ** (getattr(module.net, "levels", 1) - 1)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CPUs with native bf16 and on bf16 GPUs, fp16 on older GPUs, else None (fp32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


# ---------------------------------------------------------------- inference


def to_net(x: torch.Tensor, size: int | None, step: int) -> torch.Tensor:
    """Slices ``(N, 4, H, W)`` at the net's size: area-resized to ``size`` as in training, or
    (native size) zero-padded at the end up to a multiple of ``step``."""
    if size is not None:
        if tuple(x.shape[-2:]) == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="area")
    pad_h, pad_w = (-x.shape[-2]) % step, (-x.shape[-1]) % step
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def from_net(logits: torch.Tensor, native: tuple[int, int], size: int | None) -> torch.Tensor:
    """Float logits back at the native slice size: bilinear resize, or crop of the padding."""
    logits = logits.float()
    if size is None:
        return logits[..., : native[0], : native[1]]
    if tuple(logits.shape[-2:]) == native:
        return logits
    return F.interpolate(logits, size=native, mode="bilinear", align_corners=False)


def activate(logits: torch.Tensor, target: str) -> torch.Tensor:
    """Logits -> probabilities: sigmoid per region, or softmax over labels."""
    return torch.sigmoid(logits) if target == "regions" else torch.softmax(logits, 1)


def decide(probs: torch.Tensor, target: str) -> torch.Tensor:
    """Probabilities ``(N, C, H, W)`` -> canonical labels ``(N, H, W)`` uint8."""
    if target == "regions":
        return labels_from_regions(probs > 0.5)
    return probs.argmax(1).to(torch.uint8)


def run_net(module: SegModule, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """One forward pass, under autocast (and in channels-last memory) when ``dtype`` is set."""
    if dtype is None:
        return module(x)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=dtype):
        return module.net(x)


def slice_probs(
    module: SegModule,
    x: torch.Tensor,
    tta: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Probabilities ``(N, C, H, W)`` of z-scored slices ``(N, 4, H, W)`` at their own size.

    With ``tta`` the mean over the four flips; terms are summed in pairs, so that a symmetric
    input gets an exactly symmetric result.
    """
    size, step = training_size(module), size_step(module)
    native = (x.shape[-2], x.shape[-1])
    probs = []
    for dims in FLIPS if tta else FLIPS[:1]:
        flipped = x.flip(dims) if dims else x
        logits = from_net(run_net(module, to_net(flipped, size, step), dtype), native, size)
        p = activate(logits, module.hparams.target)
        probs.append(p.flip(dims) if dims else p)
    if not tta:
        return probs[0]
    return ((probs[0] + probs[1]) + (probs[2] + probs[3])) / 4


def remove_small_et(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Enhancing-tumour components (26-connected) under ``min_voxels`` voxels become NCR."""
    if min_voxels <= 0:
        return labels
    components, count = ndimage.label(labels == ET, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return labels
    small = np.bincount(components.ravel()) < min_voxels
    small[0] = False  # not enhancing
    out = labels.copy()
    out[small[components]] = NCR
    log.info("relabelled %d of %d ET components as NCR", int(small.sum()), count)
    return out


def brain_slices(image: np.ndarray) -> np.ndarray:
    """Indices of the axial slices of ``(4, X, Y, Z)`` holding any non-zero voxel."""
    return np.flatnonzero((image != 0).any(axis=(0, 1, 2)))


def predict_case(
    module: SegModule,
    case: Case,
    tta: bool = False,
    batch_size: int = 32,
    min_et_voxels: int = 0,
    *,
    autocast: bool = True,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Canonical labels ``(X, Y, Z)`` uint8 (0 bg, 1 NCR, 2 ED, 3 ET) for one case.

    Args:
        module: from ``load_for_inference`` (its device is used).
        case: modalities in ``MODALITIES`` order, raw intensities.
        tta: average probabilities over four flips of each slice.
        batch_size: slices per forward pass.
        min_et_voxels: ET components smaller than this become NCR (0: keep all).
        autocast: bf16/fp16 autocast where the device supports it (False: fp32).
        progress: called with the number of slices done after each batch.
    """
    device = module.device
    dtype = autocast_dtype(device) if autocast else None
    image = zscore(case.image)
    keep = brain_slices(image)
    slices = torch.from_numpy(np.ascontiguousarray(image.transpose(3, 0, 1, 2)[keep]))
    labels = np.zeros(case.image.shape[1:], dtype=np.uint8)
    if progress:
        progress(labels.shape[2] - len(keep))  # empty slices: background
    with torch.inference_mode():
        for start in range(0, len(keep), batch_size):
            x = slices[start : start + batch_size].to(device, non_blocking=True)
            out = decide(slice_probs(module, x, tta, dtype), module.hparams.target)
            labels[:, :, keep[start : start + batch_size]] = out.permute(1, 2, 0).cpu().numpy()
            if progress:
                progress(len(x))
    return remove_small_et(labels, min_et_voxels)


def predict_case_naive(
    net: torch.nn.Module, case: Case, target: str, size: int | None
) -> np.ndarray:
    """Baseline for the benchmark: every slice alone through ``net``, fp32, no TTA."""
    image = torch.from_numpy(zscore(case.image))
    labels = np.zeros(case.image.shape[1:], dtype=np.uint8)
    native = tuple(image.shape[1:3])
    step = 2 ** (getattr(net, "levels", 1) - 1)
    with torch.inference_mode():
        for z in range(image.shape[3]):
            logits = from_net(net(to_net(image[None, ..., z], size, step)), native, size)
            labels[:, :, z] = decide(activate(logits, target), target)[0].numpy()
    return labels


# ---------------------------------------------------------------- inputs


@dataclass
class Job:
    """One case to segment and where its results go."""

    case_id: str
    load: Callable[[], Case]
    reference: Path  # file whose header geometry the output copies
    convention: str  # the input's own label convention
    output: Path
    overlay: Path | None = None


def strip_nifti(name: str) -> str:
    """File name without ``.nii.gz`` / ``.nii``."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def explicit_case(paths: list[Path]) -> tuple[str, Callable[[], Case], str]:
    """Case id, loader and convention of four files given as ``--flair --t1 --t1ce --t2``."""
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
    stem = strip_nifti(paths[0].name)
    new = stem.endswith("-t2f")
    cid = stem.removesuffix("-t2f" if new else "_flair") or stem

    def load() -> Case:
        image, affine = read_images(paths)
        return Case(cid, image, None, affine)

    return cid, load, "brats2023" if new else "brats2020"


def case_refs(root: Path) -> tuple[list[CaseRef], bool]:
    """Cases of a folder input, and whether the folder is itself one case folder."""
    refs = list_cases(root, labelled=False)
    if not refs:
        raise DataError(f"{root}: no cases found")
    single = len(refs) == 1 and refs[0].paths[0].parent == root and refs[0].format == "brats"
    ids = [r.case_id for r in refs]
    dup = next((c for c in ids if ids.count(c) > 1), None)
    if dup:
        raise DataError(f"{root}: case id {dup} appears twice")
    return refs, single


def target_path(given: Path, case_id: str, suffix: str, many: bool, flag: str) -> Path:
    """Output file of a case: ``given`` itself (one case, a file name), else inside it."""
    if many or given.is_dir():
        if given.exists() and not given.is_dir():
            raise DataError(f"{flag} {given}: must be a folder for a folder of cases")
        return given / f"{case_id}{suffix}"
    return given


def check_output_name(path: Path, suffixes: tuple[str, ...], flag: str) -> None:
    if not path.name.endswith(suffixes):
        raise DataError(f"{flag} {path}: expected a file name ending in {' or '.join(suffixes)}")


def plan(args: argparse.Namespace) -> list[Job]:
    """The cases named on the command line, with their output files. Reads headers only."""
    explicit = [args.flair, args.t1, args.t1ce, args.t2]
    with_seg = args.overlay is not None  # the seg is read only as the overlay's ground truth
    jobs: list[Job] = []
    many = False
    if args.input is None:
        cid, load, convention = explicit_case(explicit)
        jobs.append(Job(cid, load, explicit[0], convention, args.output))
    elif args.input.is_file():
        load = functools.partial(read_any, args.input, "msd", None if with_seg else False)
        jobs.append(Job(strip_nifti(args.input.name), load, args.input, "msd", args.output))
    elif args.input.is_dir():
        refs, single = case_refs(args.input)
        many = not single
        for ref in refs:
            ref = ref if with_seg else dataclasses.replace(ref, labelled=False)
            jobs.append(Job(ref.case_id, ref.load, ref.paths[0], ref.convention, args.output))
    else:
        raise DataError(f"{args.input}: no such file or directory")
    for job in jobs:
        job.output = target_path(args.output, job.case_id, ".nii.gz", many, "--output")
        check_output_name(job.output, SUFFIXES, "--output")
        if args.overlay is not None:
            job.overlay = target_path(args.overlay, job.case_id, ".png", many, "--overlay")
            check_output_name(job.overlay, (".png",), "--overlay")
    return jobs


# ---------------------------------------------------------------- outputs


def reference_header(path: Path) -> nib.Nifti1Header:
    """Header of the input file whose geometry the output copies."""
    try:
        return nib.load(path).header
    except Exception as err:  # nibabel raises several types for broken files
        raise DataError(f"{path}: cannot read NIfTI header ({first_line(err)})") from None


def segmentation_image(
    labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header
) -> nib.Nifti1Image:
    """uint8 image of ``labels`` with the affine, qform/sform codes and units of ``header``."""
    img = nib.Nifti1Image(labels.astype(np.uint8), affine)
    if isinstance(header, nib.Nifti1Header):
        img.set_qform(header.get_qform(), code=int(header["qform_code"]))
        img.set_sform(header.get_sform(), code=int(header["sform_code"]))
        img.header.set_xyzt_units(*header.get_xyzt_units())
    img.set_data_dtype(np.uint8)
    return img


@contextmanager
def staged_outputs() -> Iterator[Callable[[Path], Path]]:
    """Yields ``temp_for(target)``: a hidden temporary file beside ``target``.

    On normal exit every temporary file is renamed onto its target; on an exception all of
    them, and the folders created for them, are removed, so nothing is written.
    """
    temps: list[tuple[Path, Path]] = []
    created: list[Path] = []
    umask = os.umask(0)
    os.umask(umask)

    def temp_for(target: Path) -> Path:
        missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
        created.extend(reversed(missing))
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(fd)
        os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual mode
        temps.append((Path(name), target))
        return Path(name)

    try:
        yield temp_for
        for tmp, target in temps:
            os.replace(tmp, target)
        created.clear()  # committed: the new folders hold the outputs
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)  # only left when something failed
        for folder in reversed(created):  # deepest first
            with suppress(OSError):
                folder.rmdir()


def save_overlay(path: Path, case: Case, labels: np.ndarray, modality: str) -> None:
    """The overlay PNG of one case (ground truth drawn when the case has a seg)."""
    from tumorseg.overlay import overlay_figure

    fig = overlay_figure(
        case.image[MODALITIES.index(modality)],
        case.seg,
        labels,
        case.affine,
        title=case.case_id,
        modality=modality.upper() if modality == "flair" else "T1ce",
    )
    fig.savefig(path, format="png", dpi=100, facecolor=fig.get_facecolor())


# ---------------------------------------------------------------- run


def progress_bar(quiet: bool):
    """A rich progress bar on stderr (transient), or a no-op context when ``quiet``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=quiet,
    )


def segment(args: argparse.Namespace, jobs: list[Job], module: SegModule) -> None:
    """Predict every job and write its outputs, all or nothing."""
    with staged_outputs() as temp_for, progress_bar(args.quiet) as bar:
        cases_task = bar.add_task("cases", total=len(jobs))
        slices_task = bar.add_task("slices", total=None)
        for job in jobs:
            header = reference_header(job.reference)
            case = job.load()
            bar.reset(slices_task, total=case.image.shape[3], description=job.case_id)
            labels = predict_case(
                module,
                case,
                tta=args.tta,
                batch_size=args.batch_size,
                min_et_voxels=args.min_et_voxels,
                progress=lambda n: bar.advance(slices_task, n),
            )
            convention = args.labels or job.convention
            image = segmentation_image(from_canonical(labels, convention), case.affine, header)
            nib.save(image, temp_for(job.output))
            if job.overlay is not None:
                save_overlay(temp_for(job.overlay), case, labels, args.overlay_modality)
            log.info("%s: %s labels, %d tumour voxels", job.case_id, convention, (labels > 0).sum())
            bar.advance(cases_task)
    for job in jobs:
        print(f"wrote {job.output}" + (f" and {job.overlay}" if job.overlay else ""))


# ---------------------------------------------------------------- benchmark


def default_module(device: torch.device) -> SegModule:
    """Module of the default training config (U-Net 16-32-64-128, 128x128), random weights."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tumorseg.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train")
    module: SegModule = instantiate(cfg.model)
    module.config = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {"image_size": cfg.data.image_size},
    }
    module.to(device).eval()
    if autocast_dtype(device) is not None:
        module.net.to(memory_format=torch.channels_last)
    return module


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best seconds of each call over ``repeats`` rounds, after one warm-up call each.

    Each round calls every function once, in turn, so that load from other processes on a
    shared machine slows them alike; the best time is the least disturbed one.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def demo_case(folder: Path) -> tuple[Case, Path]:
    """One generated demo case (240x240x155) and its folder."""
    from tumorseg.data.demo import write_demo

    write_demo(folder, cases=1, seed=0, progress=False)
    ref = list_cases(folder, labelled=False)[0]
    return ref.load(), ref.paths[0].parent


def describe(module: SegModule, device: torch.device, case: Case) -> list[str]:
    """Benchmark header: software, hardware, model and case."""
    features = ",".join(str(f) for f in module.config["model"]["net"].get("features", []))
    shape = case.image.shape[1:]
    return [
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, device {device} "
        f"({cpu_name()}; native bf16: {'yes' if cpu_has_bf16() else 'no'})",
        f"- model {module.hparams.name} features {features}, target {module.hparams.target}, "
        f"slices resized {shape[0]}x{shape[1]} -> {training_size(module) or 'native'}",
        f"- case {'x'.join(map(str, shape))}: {len(brain_slices(case.image))} of {shape[2]} "
        "slices hold brain (the batched paths skip the others; the naive loop runs all)",
    ]


def bench(checkpoint: Path | None, device: str, repeats: int, batch_size: int) -> str:
    """Markdown report: seconds per case of the naive loop, batched, batched + TTA."""
    load_start = os.getloadavg()[0]
    dev = pick_device(device)
    module = load_for_inference(checkpoint, dev) if checkpoint else default_module(dev)
    naive_net = copy.deepcopy(module.net).float().to(memory_format=torch.contiguous_format)
    mode = "bf16+cl" if autocast_dtype(dev) else "fp32"
    rows = [
        ("naive: 1 slice at a time", 1, "fp32", "no"),
        ("batched", batch_size, mode, "no"),
        ("batched + TTA (4 flips)", batch_size, mode, "yes"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        case, folder = demo_case(Path(tmp))
        header = reference_header(folder / f"{case.case_id}_flair.nii.gz")

        def io() -> None:
            loaded = list_cases(folder, labelled=False)[0].load()
            image = segmentation_image(np.zeros(loaded.image.shape[1:]), case.affine, header)
            nib.save(image, Path(tmp) / "seg.nii.gz")

        naive = functools.partial(
            predict_case_naive, naive_net, case, module.hparams.target, training_size(module)
        )
        fast = functools.partial(predict_case, module, case, batch_size=batch_size)
        *seconds, io_s = best_times([naive, fast, functools.partial(fast, tta=True), io], repeats)
    lines = [
        *describe(module, dev, case),
        f"- best of {repeats} interleaved rounds after a warm-up; z-score, resizing and "
        f"post-processing included; reading the 4 NIfTI files + writing the result: {io_s:.2f} s",
        f"- 1-minute load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at "
        "the end (other processes on these cores slow every row)",
        "",
        "| method | batch | precision | TTA | s / case | speed-up |",
        "|---|---:|---|---|---:|---:|",
    ]
    for (name, batch, precision, tta), sec in zip(rows, seconds, strict=True):
        lines.append(
            f"| {name} | {batch} | {precision} | {tta} | {sec:.2f} | {seconds[0] / sec:.2f}x |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def count(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Segment brain tumours with a trained checkpoint.",
        epilog="Input: --input PATH (case folder, MSD 4D image or folder of cases), or the four "
        "files --flair F --t1 F --t1ce F --t2 F. Bad input exits 2 and writes nothing.",
    )
    add = parser.add_argument
    add("--checkpoint", type=Path, metavar="CKPT", help="trained .ckpt (stores its config)")
    add("--input", type=Path, metavar="PATH", help="case folder, MSD 4D image, or case folders")
    for mod in MODALITIES:
        add(f"--{mod}", type=Path, metavar="F", help=f"{mod} NIfTI file (the four, no --input)")
    add("--output", type=Path, metavar="PATH", help=".nii.gz file (a folder for many cases)")
    add("--labels", choices=sorted(CONVENTIONS), help="output convention (default: the input's)")
    add("--tta", action="store_true", help="average probabilities over 4 flips per slice")
    add("--min-et-voxels", type=count(0), default=0, metavar="N", help="smaller ET parts -> NCR")
    add("--overlay", type=Path, metavar="PNG", help="overlay figure (a folder for many cases)")
    add("--overlay-modality", choices=OVERLAY_MODALITIES, default="flair", help="default flair")
    add("--batch-size", type=count(1), default=32, metavar="B", help="slices per pass (32)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    add("--quiet", action="store_true", help="no progress bar")
    add("--benchmark", action="store_true", help="time one demo case; print a Markdown table")
    add("--repeats", type=count(1), default=5, metavar="N", help="timed rounds (5)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.benchmark:
        return
    explicit = [getattr(args, m) for m in MODALITIES]
    if args.checkpoint is None:
        raise ArgError("--checkpoint is required")
    if args.output is None:
        raise ArgError("--output is required")
    if args.input is not None and any(explicit):
        raise ArgError("give --input or the four --flair --t1 --t1ce --t2 files, not both")
    if args.input is None and not all(explicit):
        missing = [f"--{m}" for m, p in zip(MODALITIES, explicit, strict=True) if p is None]
        raise ArgError(
            "give --input, or all four modality files (missing " + " ".join(missing) + ")"
        )


def error(message: str) -> None:
    cli.error(PROG, message)


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0, 2 for bad input (nothing written) or 1 if writing fails."""
    args = cli.start(PROG, lambda: cli.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args
    try:
        if args.benchmark:
            print(bench(args.checkpoint, args.device, args.repeats, args.batch_size))
            return 0
        jobs = plan(args)
        module = load_for_inference(args.checkpoint, args.device)
        segment(args, jobs, module)
    except DataError as err:
        error(str(err))
        return 2
    except OSError as err:
        error(f"cannot write: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
