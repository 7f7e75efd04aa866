"""The machine a benchmark ran on, as every report names it."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def bf16_flags() -> str:
    """Which native bf16 the CPU has: AMX, AVX512-BF16, or none (float32 only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    if "amx_bf16" in flags:
        return "AMX bf16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return "none (AVX2 fp32)"


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": cpu_model(),
        "bf16": bf16_flags(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
