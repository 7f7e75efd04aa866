"""What every benchmark report shares: the machine it ran on, and how it is written."""

from __future__ import annotations

import json
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

    from elmo_core.device import bf16_native, cpu_bf16_speedup, cpu_has_bf16

    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "bf16": bf16_flags(),
        # what precision "auto" picks here: AVX512-BF16 alone is timed against float32 (a CPU
        # without bf16 hardware is not timed: its bf16 is emulated)
        "bf16_picked": bf16_native(torch.device("cpu")),
        "bf16_matmul_speedup": round(cpu_bf16_speedup(), 3) if cpu_has_bf16() else None,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def write_report(path: str | Path, report: dict[str, Any], headline: str, hide: str = "") -> None:
    """Write ``report`` as JSON to ``path``, print it (less the bulky key ``hide``), then the
    one ``name=value`` line a reader or a script greps for."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != hide}, indent=2))
    print(headline)
