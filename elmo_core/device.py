"""Where and in what precision a loop runs: the device, native bf16, autocast."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

# autocast choices of the training loops; ``auto`` = bf16 where the device runs it natively
PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def pick_device(prefer: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


def bf16_native(device: torch.device) -> bool:
    """Does ``device`` run bf16 matmuls natively? CUDA with bf16 support; a CPU with AMX or
    AVX512-BF16 (elsewhere bf16 is emulated: slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(
            bool(getattr(cpu, name, lambda: False)())
            for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        )
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device runs it natively, else ``fp32``."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto") -> Any:
    """bf16 autocast (weights and optimizer state stay float32) or nothing for ``fp32``.

    Both are deterministic on a CPU: the same machine repeats a run bit for bit.
    """
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
