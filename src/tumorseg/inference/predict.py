"""Inference: a trained checkpoint segments one case, replaying training's preprocessing.

``load_for_inference`` rebuilds the net from a checkpoint alone, as a ``Predictor`` (without
importing Lightning, Hydra or MLflow, which took seconds of ``tumorseg-predict``'s start-up);
``predict_case`` takes a
raw case (any orientation, any voxel size) and returns canonical labels on the case's own
grid. What happens to the case is ``tumorseg.data.preprocess``: the checkpoint's recorded
``Preprocessing`` is replayed, slices go through the net in batches, and the probabilities are
mapped back step by step before the ``Target`` decides the labels. Used by ``tumorseg-predict``,
the training test stage and the benchmarks alike.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from tumorseg.core.errors import DataError, first_line
from tumorseg.core.labels import labels_from_regions, target
from tumorseg.data.case import Case
from tumorseg.data.preprocess import NetInput, Preprocessing, from_net, net_shape, to_net
from tumorseg.training.checkpoint import CheckpointError, plain_state_dict, read_checkpoint
from tumorseg.training.precision import cpu_has_bf16

if TYPE_CHECKING:
    from tumorseg.training.module import SegModule

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


class HParams(dict):
    """The hyper-parameters a prediction reads (``target``, ``name``, ``channels_last``), by
    key and as attributes, as on a LightningModule's ``hparams``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Predictor(torch.nn.Module):
    """A checkpoint's net with what a prediction needs besides it (target, preprocessing,
    config), without the LightningModule around it: in place of a ``SegModule`` wherever one
    predicts (``predict_case``, the test stage, export, the MLflow model). Its ``state_dict``
    has the checkpoint's keys (``net.*``)."""

    def __init__(
        self, net: torch.nn.Module, hparams: dict, config: dict, pre: Preprocessing
    ) -> None:
        super().__init__()
        self.net = net
        self.hparams = HParams(hparams)
        self.config = config
        self.preprocessing = pre

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("channels_last", True):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def predict_regions(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> boolean regions ``(N, 3, H, W)``."""
        return target(self.hparams.target).regions(logits)


def build(config: Any) -> Any:
    """The object a Hydra ``_target_`` config describes, with its arguments built first;
    without Hydra (which ``tumorseg-predict`` would otherwise import) for plain ``_target_``
    configs, through Hydra for any other ``_``-option."""
    if isinstance(config, dict) and any(k.startswith("_") and k != "_target_" for k in config):
        from hydra.utils import instantiate

        return instantiate(config)
    if isinstance(config, list):
        return [build(v) for v in config]
    if not isinstance(config, dict):
        return config
    args = {k: build(v) for k, v in config.items() if not k.startswith("_")}
    if "_target_" not in config:
        return args
    module_name, _, name = config["_target_"].rpartition(".")
    return getattr(importlib.import_module(module_name), name)(**args)


# what a SegModule takes besides the net and optimiser (``save_hyperparameters``)
HPARAM_DEFAULTS = {
    "target": "regions",
    "channels_last": True,
    "name": "unet",
    "dice_weight": 1.0,
    "ce_weight": 1.0,
    "compile": False,
}


def predictor_from_checkpoint(ckpt: dict, path: Path) -> Predictor:
    """The ``Predictor`` of a checkpoint dict (``read_checkpoint``): its net built from the
    stored model config, with the stored weights; ValueError for a checkpoint without one."""
    config = ckpt.get("tumorseg_config")
    if not config:
        raise ValueError(f"{path}: checkpoint holds no tumorseg config")
    model = config["model"]
    net = build(model["net"])
    hparams = {k: model.get(k, v) for k, v in HPARAM_DEFAULTS.items()}
    target(hparams["target"])  # a DataError for an unknown target
    state = plain_state_dict(ckpt["state_dict"])
    weights = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    net.load_state_dict(weights)
    if ckpt.get("tumorseg_preprocessing"):
        pre = Preprocessing.from_dict(ckpt["tumorseg_preprocessing"])
    else:
        from tumorseg.data.preprocess import preprocessing_from_config

        pre = preprocessing_from_config(config)
    if hparams["channels_last"]:
        net.to(memory_format=torch.channels_last)
    return Predictor(net, hparams, config, pre).eval()


def load_for_inference(
    ckpt: str | Path,
    device: str | torch.device = "cpu",
    trust: bool = False,
    compile: bool = False,
) -> Predictor:
    """The checkpoint's net in eval mode on ``device`` (tensors mapped there on load, so a
    checkpoint saved on a GPU loads on a CPU-only machine), as a ``Predictor``. Problems raise
    a DataError.

    The file is read as data (``weights_only``): a checkpoint holding any other object is
    refused, naming its type, unless ``trust`` (only for files from a source you trust).
    ``compile``: ``torch.compile`` the net in place (its first batches then take the compile
    time; worth it on GPUs and for many cases).
    """
    path = Path(ckpt)
    device = pick_device(device)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file")
    try:
        module = predictor_from_checkpoint(read_checkpoint(path, device, trust), path)
    except CheckpointError as err:
        raise DataError(str(err)) from None
    except Exception as err:  # torch.load, the net and load_state_dict raise many types
        raise DataError(f"{path}: not a usable tumorseg checkpoint ({first_line(err)})") from None
    module.to(device).eval()
    if autocast_dtype(device) is not None:
        module.net.to(memory_format=torch.channels_last)
    if compile:
        module.net.compile()
    return module


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


def slice_logits(module: SegModule, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Float logits ``(N, C, H, W)`` of preprocessed slices at their own size (no TTA)."""
    shape = (x.shape[-2], x.shape[-1])
    padded, net = net_shape(shape, module.preprocessing, size_step(module))
    logits = run_net(module, to_net(x, padded, net), dtype)
    # the net's output is channels-last; resizing 3 channels is faster in plain layout
    return from_net(logits.contiguous(), padded, shape)


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


def prepare_case(module: SegModule, case: Case, normalised: bool = False) -> NetInput:
    """Step one of ``predict_case``: the case replayed through the module's preprocessing (no
    torch work; ``tumorseg-predict`` runs it for the next case while the net runs)."""
    return NetInput.of(case.image, case.affine, module.preprocessing, case.case_id, normalised)


def label_slices(
    module: SegModule,
    replay: NetInput,
    tta: bool = False,
    batch_size: int = 32,
    *,
    autocast: bool = True,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Step two of ``predict_case``: canonical labels ``(X, Y, Z)`` uint8 of the replayed case
    in the training orientation (``replay.undo`` maps them onto the case's own voxels).

    For a regions target without TTA whose way back is the identity (no crop, no resampling),
    labels come from the logits' sign on the slice grid: ``sigmoid(x) > 0.5`` is ``x > 0`` but
    for logits under 1.2e-7, where float32's sigmoid rounds to 0.5; the sigmoid is not run.
    """
    device = module.device
    dtype = autocast_dtype(device) if autocast else None
    goal = target(module.hparams.target)
    x_size, y_size, z_size = replay.oriented
    labels = np.zeros((x_size, y_size, z_size), dtype=np.uint8)
    keep = replay.keep
    if progress:
        progress(z_size - len(keep))  # skipped slices: background
    fill = goal.background()
    on_logits = goal.name == "regions" and not tta and replay.identity_back
    with torch.inference_mode():
        for start in range(0, len(keep), batch_size):
            x = replay.image[start : start + batch_size].to(device, non_blocking=True)
            if on_logits:
                out = labels_from_regions(slice_logits(module, x, dtype) > 0)
            else:
                probs = replay.back(slice_probs(module, x, tta, dtype), fill.to(device))
                out = goal.decide(probs)
            labels[:, :, keep[start : start + batch_size]] = out.permute(1, 2, 0).cpu().numpy()
            if progress:
                progress(len(x))
    return labels


def finish_case(replay: NetInput, labels: np.ndarray, min_et_voxels: int = 0) -> np.ndarray:
    """Step three of ``predict_case``: labels back on the case's voxels, small ET removed."""
    return remove_small_et(replay.undo(labels), min_et_voxels)


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

    The three steps (``prepare_case``, ``label_slices``, ``finish_case``) can run apart, as
    ``tumorseg-predict`` pipelines them over a folder of cases.
    """
    replay = prepare_case(module, case, normalised)
    labels = label_slices(module, replay, tta, batch_size, autocast=autocast, progress=progress)
    return finish_case(replay, labels, min_et_voxels)


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
