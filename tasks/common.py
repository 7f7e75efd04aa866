"""What every stage task shares: cache keys, stage folders, progress logging, run history."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.paths import write_json


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger("elmo_news")


THREADS_ENV = "ELMO_NEWS_THREADS"  # the user's override: torch threads per task
# set on each Dask worker by the flow (flows.fanout) from the cluster's layout: its share of
# its host's cores
WORKER_THREADS_ENV = "ELMO_NEWS_WORKER_THREADS"
PARALLEL_ENV = "ELMO_NEWS_PARALLEL_TASKS"  # thread runner: tasks at once in the flow process


def visible_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def dask_worker() -> Any | None:
    """The Dask worker running this task, None outside one."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def task_threads() -> tuple[int, str]:
    """How many torch threads a task should use, and why.

    A task must use only its share of the cores: a biLM step whose threads share their
    cores with another process runs many times slower, not 2x (threads of one op wait on
    each other). ``ELMO_NEWS_THREADS``
    wins; in a Dask worker the share the flow set from the cluster's layout, else the
    worker's cores over its thread count; in the flow process the cores over the tasks the
    thread runner runs at once (``ELMO_NEWS_PARALLEL_TASKS``)."""
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV])), f"{THREADS_ENV}"
    cores = visible_cores()
    worker = dask_worker()
    if worker is not None:
        if os.environ.get(WORKER_THREADS_ENV):
            return max(1, int(os.environ[WORKER_THREADS_ENV])), "share of the host's cores"
        n = max(1, int(getattr(worker.state, "nthreads", 1)))
        return max(1, cores // n), f"{cores} cores / {n} worker threads"
    parallel = max(1, int(os.environ.get(PARALLEL_ENV, "1")))
    return max(1, cores // parallel), f"{cores} cores / {parallel} parallel tasks"


def set_threads() -> int:
    """Set torch's intra-op threads to this task's share (``task_threads``); returns it."""
    import torch

    n, why = task_threads()
    torch.set_num_threads(n)
    logger().info("torch threads: %d (%s)", n, why)
    return n


def runtime_tags(threads: int | None = None) -> dict[str, str]:
    """Where a task ran (MLflow child-run tags): the Dask worker's address or the flow
    process, the host and the torch threads it used."""
    import socket

    worker = dask_worker()
    tags = {
        "executor": "dask" if worker is not None else "flow-process",
        "host": socket.gethostname(),
    }
    if worker is not None:
        tags["dask_worker"] = str(worker.address)
    if threads is not None:
        tags["torch_threads"] = str(threads)
    return tags


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
