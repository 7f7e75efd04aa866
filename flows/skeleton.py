"""The skeleton run, sweep and pretrain share: the home, the allocator, one MLflow parent run
per flow run, stage timings, the summary (MLflow text, Prefect artifact, a JSON file in the
home, the UI link) and the parent marked FAILED when anything raises."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows.runtime import tune_allocator
from storage.paths import Home, write_json
from storage.tracking import Tracker, runs_path


@dataclass
class ParentRun:
    """One flow run's MLflow parent run and what the flow reports into it."""

    home: Home
    tracker: Tracker
    run_id: str
    log: Any  # Prefect's run logger
    timings: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the wall time of the block under ``name``."""
        t = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t

    def log_timings(self) -> None:
        """Close the clock (``total``) and log every stage's wall time on the parent."""
        self.timings["total"] = time.perf_counter() - self.started
        self.tracker.log_metrics(self.run_id, {f"wall_s.{k}": v for k, v in self.timings.items()})

    def publish(
        self, title: str, md: str, key: str, description: str, summary: dict[str, Any], path: Path
    ) -> dict[str, Any]:
        """The run's summary as MLflow text, a Prefect artifact, log lines and ``path`` (JSON);
        then the parent run ends FINISHED. Returns ``summary`` with the parent's id first."""
        self.tracker.log_text(self.run_id, md, "summary.md")
        create_markdown_artifact(markdown=f"# {title}\n\n{md}", key=key, description=description)
        self.log.info("summary\n%s", md)
        self.log.info(
            "MLflow UI (mlflow ui --backend-store-uri %s --host 127.0.0.1): "
            "http://127.0.0.1:5000/#%s",
            self.home.mlflow_uri(),
            runs_path(self.tracker.experiment_id, self.run_id),
        )
        summary = {"parent_run_id": self.run_id, "home": str(self.home.root), **summary}
        write_json(path, summary)
        self.tracker.finish(self.run_id)
        return summary


@contextmanager
def parent_run(
    home_dir: str, profile: str, params: dict[str, Any], kind: str = "", name_prefix: str = ""
) -> Iterator[ParentRun]:
    """Open the flow run's parent run (named after the Prefect flow run, tagged with its id,
    the profile and ``kind``); a raise inside marks it FAILED."""
    home = Home(home_dir)
    home.check_writable()  # a deployment's home: one clear error before any stage
    log = get_run_logger()
    # reuse freed memory instead of page-faulting it in again every training step
    log.info("allocator tuned for training: %s", tune_allocator())
    tracker = Tracker(home.mlflow_uri())
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("parent_run() runs inside a flow run")
    flow_run = context.flow_run
    tags = {"prefect_flow_run_id": str(flow_run.id), "profile": profile}
    if kind:
        tags["kind"] = kind
    run_id = tracker.start_parent(
        run_name=f"{name_prefix}{flow_run.name}", params=params, tags=tags
    )
    try:
        yield ParentRun(home, tracker, run_id, log)
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
