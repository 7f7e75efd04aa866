"""Where and in what precision a loop runs: the device, native bf16, autocast."""

from __future__ import annotations

import functools
import time
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


# how much faster than float32 a CPU's bf16 matmul must run for ``auto`` to pick bf16: far
# from what was seen (AMX: bf16 matmuls several times float32's; AMD Zen 5's AVX512-BF16: bf16
# biLM steps ~1.8x; an Intel Xeon with the flag but AMX hidden: bf16 matmuls 0.5-0.7x), so one
# machine always makes the same choice
BF16_MIN_GAIN = 1.25


def bf16_native(device: torch.device) -> bool:
    """Does ``device`` run bf16 faster than float32? CUDA with bf16 support; a CPU with AMX; a
    CPU with AVX512-BF16 alone where its bf16 matmul beats float32 by ``BF16_MIN_GAIN`` (timed
    once a process: the flag alone does not say it, see ``cpu_bf16_speedup``). A CPU with
    neither emulates bf16: slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if _cpu_has("_is_amx_tile_supported"):
            return True
        if _cpu_has("_is_avx512_bf16_supported"):
            return cpu_bf16_speedup() >= BF16_MIN_GAIN
    return False


def _cpu_has(check: str) -> bool:
    """One of ``torch.cpu``'s private feature checks; False where this torch lacks it."""
    return bool(getattr(torch.cpu, check, lambda: False)())


def cpu_has_bf16() -> bool:
    """bf16 in the CPU's hardware (AMX or AVX512-BF16), whether or not it is the faster."""
    return _cpu_has("_is_amx_tile_supported") or _cpu_has("_is_avx512_bf16_supported")


@functools.cache
def cpu_bf16_speedup(size: int = 768, repeats: int = 5) -> float:
    """float32 time / bf16 time of a ``size``-square matmul on this CPU's compute threads (best
    of ``repeats`` each, after a warm-up): > 1 where bf16 is the faster."""

    gen = torch.Generator().manual_seed(0)  # the global generator stays where a seed put it

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, generator=gen).to(dtype)
        b = torch.randn(size, size, generator=gen).to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device runs it faster (``bf16_native``), else ``fp32``."""
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
