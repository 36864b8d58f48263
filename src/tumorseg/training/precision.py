"""Hardware-dependent trainer settings: a fast precision, GPU or not."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_bf16_hardware(cpuinfo: str | None = None) -> str | None:
    """The CPU's native bf16 instructions, from ``/proc/cpuinfo`` (or the text ``cpuinfo``):
    ``AMX`` (matrix tiles, which also has AVX-512 BF16), ``AVX-512 BF16``, or None."""
    try:
        flags = set((cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()).split())
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return None


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX-512 BF16 or AMX)."""
    return cpu_bf16_hardware() is not None


def uses_gpu(accelerator: str) -> bool:
    """Whether a Trainer ``accelerator`` setting ends up on CUDA GPUs."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def auto_precision(accelerator: str) -> str:
    """``bf16-mixed`` where the device runs bf16 natively, else ``16-mixed`` on GPUs, else fp32."""
    if uses_gpu(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("cpu", "auto"):
        return "bf16-mixed" if cpu_has_bf16() else "32-true"
    return "32-true"
