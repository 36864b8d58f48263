"""Batch augmentation of training slices: torch ops on ``image (N, C, H, W)``, ``labels (N, H, W)``.

Each sample draws its own parameters; spatial transforms move image and labels together
(bilinear for the image, nearest for the labels), intensity transforms touch brain pixels only
(any channel non-zero), so the z-scored background stays 0. Randomness comes from torch's
global generator (seeded by ``seed_everything`` and per DataLoader worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Augment:
    """Random augmentation; every probability 0 (or range 0) switches that part off.

    Args:
        flip_x: probability of mirroring along x, the slice's H axis: left-right in the
            training orientation (LPS), where brains are close to symmetric.
        flip_y: probability of mirroring along y (W): anterior-posterior, which brains are not
            symmetric about; off by default.
        p_spatial: probability of a rotation + scaling of a sample.
        rotate: largest rotation in degrees (uniform in ``[-rotate, rotate]``).
        scale: largest relative zoom (factor uniform in ``[1 - scale, 1 + scale]``).
        p_intensity: probability of a per-channel intensity scale and shift.
        intensity_scale: ``a`` of ``x * (1 + U(-a, a)) + U(-b, b)`` per channel.
        intensity_shift: ``b`` of the same.
        p_gamma: probability of a gamma change per sample.
        gamma: gamma drawn log-uniformly in ``[1 / (1 + gamma), 1 + gamma]``, applied to the
            intensities rescaled to [0, 1] per channel and mapped back.
    """

    flip_x: float = 0.5
    flip_y: float = 0.0
    p_spatial: float = 0.0
    rotate: float = 15.0
    scale: float = 0.1
    p_intensity: float = 0.0
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    p_gamma: float = 0.0
    gamma: float = 0.3

    def __call__(
        self, image: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = flip(image, labels, self.flip_x, -2)
        image, labels = flip(image, labels, self.flip_y, -1)
        if self.p_spatial > 0:
            image, labels = rotate_scale(image, labels, self.p_spatial, self.rotate, self.scale)
        if self.p_intensity > 0:
            image = scale_shift(image, self.p_intensity, self.intensity_scale, self.intensity_shift)
        if self.p_gamma > 0:
            image = gamma(image, self.p_gamma, self.gamma)
        return image, labels


def _chosen(n: int, p: float, device: torch.device) -> torch.Tensor:
    """Indices of the samples picked with probability ``p``."""
    return (torch.rand(n, device=device) < p).nonzero()[:, 0]


def flip(
    image: torch.Tensor, labels: torch.Tensor, p: float, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each sample along ``dim`` (-2 or -1) with probability ``p``."""
    if p <= 0:
        return image, labels
    rows = _chosen(len(image), p, image.device)
    if len(rows):
        image, labels = image.clone(), labels.clone()
        image[rows] = image[rows].flip(dim)
        labels[rows] = labels[rows].flip(dim)
    return image, labels


def rotate_scale(
    image: torch.Tensor, labels: torch.Tensor, p: float, degrees: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate by ``U(-degrees, degrees)`` and zoom by ``U(1 - scale, 1 + scale)`` about the
    centre, each picked sample with probability ``p``; outside the slice becomes 0."""
    rows = _chosen(len(image), p, image.device)
    if not len(rows):
        return image, labels
    n = len(rows)
    angle = (torch.rand(n, device=image.device) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, device=image.device) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, device=image.device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    part = image[rows].float()
    grid = F.affine_grid(theta, list(part.shape), align_corners=False)
    moved = F.grid_sample(part, grid, mode="bilinear", align_corners=False)
    moved_labels = F.grid_sample(
        labels[rows, None].float(), grid, mode="nearest", align_corners=False
    )
    image, labels = image.clone(), labels.clone()
    image[rows] = moved.to(image.dtype)
    labels[rows] = moved_labels[:, 0].to(labels.dtype)
    return image, labels


def scale_shift(image: torch.Tensor, p: float, scale: float, shift: float) -> torch.Tensor:
    """``x * (1 + U(-scale, scale)) + U(-shift, shift)`` per sample and channel, on brain."""
    rows = _chosen(len(image), p, image.device)
    if not len(rows):
        return image
    part = image[rows]
    shape = (len(rows), image.shape[1], 1, 1)
    a = 1 + (torch.rand(shape, device=image.device) * 2 - 1) * scale
    b = (torch.rand(shape, device=image.device) * 2 - 1) * shift
    brain = (part != 0).any(1, keepdim=True)
    image = image.clone()
    image[rows] = torch.where(brain, part * a + b, part)
    return image


def gamma(image: torch.Tensor, p: float, spread: float) -> torch.Tensor:
    """Gamma ``exp(U(-log(1 + spread), log(1 + spread)))`` per sample on the brain intensities,
    rescaled to [0, 1] per channel for the power and mapped back to their range."""
    rows = _chosen(len(image), p, image.device)
    if not len(rows):
        return image
    part = image[rows].float()
    brain = (part != 0).any(1, keepdim=True)
    big = torch.finfo(part.dtype).max
    lo = torch.where(brain, part, big).amin((2, 3), keepdim=True)
    hi = torch.where(brain, part, -big).amax((2, 3), keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    u = torch.rand(len(rows), 1, 1, 1, device=image.device) * 2 - 1
    g = torch.exp(u * math.log1p(spread))
    unit = ((part - lo) / span).clamp(0, 1)
    out = torch.where(brain, unit.pow(g) * span + lo, part)
    image = image.clone()
    image[rows] = out.to(image.dtype)
    return image
