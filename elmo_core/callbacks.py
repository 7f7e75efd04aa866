"""What every training loop shares: the metric and progress callbacks it reports through,
and resuming from an atomic checkpoint. Loops never touch tracking systems."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from elmo_core.checkpoint import CheckpointError, safe_load

LogFn = Callable[[dict[str, float], int], None]


# progress(done, total, info): units done of total in the current stretch (steps of an epoch,
# documents of a split), info = what a display shows beside it (epoch, tokens/s). Called often:
# the receiver throttles; the loops only count
ProgressFn = Callable[[int, int, dict[str, float]], None]


def no_log(metrics: dict[str, float], step: int) -> None:
    return None


def no_progress(done: int, total: int, info: dict[str, float]) -> None:
    return None


def report_epoch_progress(
    progress: ProgressFn, done: int, total: int, epoch: int, epochs: int, tokens: int, t0: float
) -> None:
    """The training loops' progress call: step ``done`` of ``total`` in epoch ``epoch``
    (0-based) of ``epochs``, and this epoch's tokens/s since ``t0``."""
    rate = tokens / max(time.perf_counter() - t0, 1e-9)
    progress(done, total, {"epoch": epoch + 1, "epochs": epochs, "tokens_per_s": rate})


def rng_state() -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])


def try_resume(path: Path | None, kind: str) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        state = safe_load(path)
    except CheckpointError:
        path.unlink(missing_ok=True)  # corrupt: never loaded, rebuilt from scratch
        return None
    return state if state.get("kind") == kind else None
