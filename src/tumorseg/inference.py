"""Inference: a trained checkpoint segments one case, replaying training's preprocessing.

``load_for_inference`` rebuilds the module from a checkpoint alone; ``predict_case`` takes a
raw case (any orientation, any voxel size) and returns canonical labels on the case's own
grid. What happens to the case is ``tumorseg.data.preprocess``: the checkpoint's recorded
``Preprocessing`` is replayed, slices go through the net in batches, and the probabilities are
mapped back step by step before the ``Target`` decides the labels. Used by ``tumorseg-predict``,
the training test stage and the benchmarks alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from tumorseg.data.nifti import Case
from tumorseg.data.preprocess import NetInput, Preprocessing, from_net, net_shape, to_net
from tumorseg.errors import DataError, first_line
from tumorseg.labels import target
from tumorseg.module import CheckpointError, SegModule, load_checkpoint
from tumorseg.precision import cpu_has_bf16

FLIPS: tuple[tuple[int, ...], ...] = ((), (-2,), (-1,), (-2, -1))  # slice dims (N, C, X, Y)
NCR, ET = 1, 3  # canonical labels

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the model


def pick_device(name: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a DataError."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CPUs with native bf16 and on bf16 GPUs, fp16 on older GPUs, else None (fp32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def load_for_inference(
    ckpt: str | Path, device: str | torch.device = "cpu", trust: bool = False
) -> SegModule:
    """The checkpoint's module in eval mode on ``device`` (tensors mapped there on load, so a
    checkpoint saved on a GPU loads on a CPU-only machine). Problems raise a DataError.

    The file is read as data (``weights_only``): a checkpoint holding any other object is
    refused, naming its type, unless ``trust`` (only for files from a source you trust).
    """
    path = Path(ckpt)
    device = pick_device(device)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file")
    try:
        module = load_checkpoint(path, map_location=device, trust=trust)
    except CheckpointError as err:
        raise DataError(str(err)) from None
    except Exception as err:  # torch.load, hydra and load_state_dict raise many types
        raise DataError(f"{path}: not a usable tumorseg checkpoint ({first_line(err)})") from None
    module.to(device).eval()
    if autocast_dtype(device) is not None:
        module.net.to(memory_format=torch.channels_last)
    return module


def preprocessing(module: SegModule) -> Preprocessing:
    """The preprocessing the module was trained with (recorded in its checkpoint)."""
    return module.preprocessing


def size_step(module: SegModule) -> int:
    """Net input height and width must be multiples of this."""
    return 2 ** (getattr(module.net, "levels", 1) - 1)


# ---------------------------------------------------------------- slices


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
    """Probabilities ``(N, C, H, W)`` of preprocessed slices ``(N, 4, H, W)`` at their size.

    The slices are padded and resized as training resized them (``preprocess.to_net``). With
    ``tta`` the mean over the four flips; terms are summed in pairs, so that a symmetric input
    gets an exactly symmetric result.
    """
    shape = (x.shape[-2], x.shape[-1])
    padded, net = net_shape(shape, module.preprocessing, size_step(module))
    activate = target(module.hparams.target).activate
    probs = []
    for dims in FLIPS if tta else FLIPS[:1]:
        flipped = x.flip(dims) if dims else x
        logits = from_net(run_net(module, to_net(flipped, padded, net), dtype), padded, shape)
        p = activate(logits)
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


# ---------------------------------------------------------------- a case


def predict_case(
    module: SegModule,
    case: Case,
    tta: bool = False,
    batch_size: int = 32,
    min_et_voxels: int = 0,
    *,
    autocast: bool = True,
    normalised: bool = False,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Canonical labels ``(X, Y, Z)`` uint8 (0 bg, 1 NCR, 2 ED, 3 ET) on ``case``'s grid.

    Args:
        module: from ``load_for_inference`` (its device is used).
        case: modalities in ``MODALITIES`` order, raw intensities, any axis-aligned affine.
        tta: average probabilities over four flips of each slice.
        batch_size: slices per forward pass.
        min_et_voxels: ET components smaller than this become NCR (0: keep all).
        autocast: bf16/fp16 autocast where the device supports it (False: fp32).
        normalised: the image is z-scored already (a store volume): skip that step.
        progress: called with the number of slices done after each batch.
    """
    device = module.device
    dtype = autocast_dtype(device) if autocast else None
    goal = target(module.hparams.target)
    replay = NetInput.of(case.image, case.affine, module.preprocessing, case.case_id, normalised)
    x_size, y_size, z_size = replay.oriented
    labels = np.zeros((x_size, y_size, z_size), dtype=np.uint8)
    keep = replay.keep
    if progress:
        progress(z_size - len(keep))  # skipped slices: background
    fill = goal.background()
    with torch.inference_mode():
        for start in range(0, len(keep), batch_size):
            x = replay.image[start : start + batch_size].to(device, non_blocking=True)
            probs = replay.back(slice_probs(module, x, tta, dtype), fill.to(device))
            out = goal.decide(probs)
            labels[:, :, keep[start : start + batch_size]] = out.permute(1, 2, 0).cpu().numpy()
            if progress:
                progress(len(x))
    return remove_small_et(replay.undo(labels), min_et_voxels)


# ---------------------------------------------------------------- the output file


def segmentation_image(
    labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None
) -> nib.Nifti1Image:
    """uint8 image of ``labels`` with the affine, qform/sform codes and units of ``header``."""
    img = nib.Nifti1Image(labels.astype(np.uint8), affine)
    if isinstance(header, nib.Nifti1Header):
        img.set_qform(header.get_qform(), code=int(header["qform_code"]))
        img.set_sform(header.get_sform(), code=int(header["sform_code"]))
        img.header.set_xyzt_units(*header.get_xyzt_units())
    img.set_data_dtype(np.uint8)
    return img
