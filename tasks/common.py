"""What every stage task shares: cache keys, stage folders, progress logging, run history."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext

from storage.hashing import stage_key
from storage.paths import write_json

STAGE_OPTS: dict[str, Any] = {"persist_result": True, "cache_result_in_memory": False}


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger("elmo_news")


def set_threads() -> None:
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("ELMO_NEWS_THREADS", os.cpu_count() or 1))))


class Stage:
    """A stage's identity: name, the code it depends on, and how its key is made."""

    def __init__(self, name: str, modules: Iterable[str]) -> None:
        self.name = name
        self.modules = tuple(modules)

    def key(self, inputs: dict[str, str], config: Any) -> str:
        return stage_key(self.name, inputs, config, self.modules)


def cache_key(key_fn: Callable[..., str]) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A Prefect cache_key_fn from a function of the task's parameters."""

    def fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return key_fn(**parameters)

    return fn


class History:
    """The ``log_metrics`` callback handed to training loops: keeps every point for the stage
    folder (history.json), streams it to the stage's live MLflow run (``sink``) and logs a line
    through Prefect's logger for every epoch-level point (keys ``val_*``) but for step-level
    ones at most every ``log_every_s`` seconds: the progress bar and artifact show the rest."""

    def __init__(
        self,
        prefix: str = "",
        sink: Callable[[dict[str, float], int], None] | None = None,
        log_every_s: float = 60.0,
    ) -> None:
        self.points: list[dict[str, Any]] = []
        self.prefix = prefix
        self.sink = sink
        self.log_every_s = log_every_s
        self._last_line = 0.0
        self.log = logger()

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            self.points.append({"key": k, "value": float(v), "step": int(step), "ts": ts})
        if self.sink is not None:
            self.sink(metrics, step)
        now = time.monotonic()
        if any(k.startswith("val_") for k in metrics) or now - self._last_line >= self.log_every_s:
            self._last_line = now
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            self.log.info("%s step %d: %s", self.prefix, step, shown)

    def save(self, path: Path) -> None:
        write_json(path, self.points)
