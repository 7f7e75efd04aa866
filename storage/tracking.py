"""The only module that talks to MLflow. Stage folders are logged as child runs of a parent run.

Stages write their figures into their folder (config.json, history.json, metrics.json, PNGs,
reports); ``log_stage`` turns a folder into an MLflow child run. A cached stage is logged the same
way, tagged with the run that first produced it, so every parent run is complete in the UI.
Client calls take explicit run ids (no fluent active-run stack), so threads are safe.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from storage.paths import file_lock, read_json, write_json

EXPERIMENT = "elmo-news"
ARTIFACT_SUFFIXES = {".png", ".txt", ".json", ".md", ".csv"}


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _sqlite_db(uri: str) -> Path | None:
    """The database file of a local ``sqlite:///`` tracking URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local sqlite store (``mlartifacts/``
    next to the .db, so everything stays under the home folder), else the server's default.

    MLflow's own default for a sqlite store is ``./mlruns`` of whatever directory the process
    happens to run in, which scatters artifacts and models outside the home folder.
    """
    db = _sqlite_db(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts").as_uri()


def _experiment_id(client: Any, uri: str, name: str = EXPERIMENT) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # created concurrently by another run
        return client.get_experiment_by_name(name).experiment_id


def _flat(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, list | tuple) else str(obj)


def _store_lock(uri: str) -> AbstractContextManager[None]:
    """Serialise first use of a local sqlite store: MLflow creates and migrates its schema on first
    connection, and two processes doing that at once collide."""
    db = _sqlite_db(uri)
    return nullcontext() if db is None else file_lock(db)


class Tracker:
    """An MLflow parent run for one flow run, and child runs under it."""

    def __init__(self, uri: str, parent_run_id: str | None = None) -> None:
        self.uri = uri
        with _store_lock(uri):
            self.client = _client(uri)
            self.experiment_id = _experiment_id(self.client, uri)
        self.parent_run_id = parent_run_id

    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_run_id = run.info.run_id
        self.log_params(self.parent_run_id, params)
        return self.parent_run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        _flat("", params, flat)
        items = [Param(k[:250], v[:6000]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_stage(self, name: str, stage_dir: Path, tags: dict[str, str]) -> tuple[str, bool]:
        """One child run from a stage folder. Returns its run id and whether the stage was a
        cache hit (already logged by an earlier run, which the new run links to)."""
        produced = stage_dir / "mlflow_source.json"
        source = read_json(produced)["run_id"] if produced.exists() else None
        all_tags = {"mlflow.parentRunId": self.parent_run_id or "", "stage": name, **tags}
        all_tags["cached"] = "true" if source else "false"
        if source:
            all_tags["cached_from_run_id"] = source
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        rid = run.info.run_id
        if (stage_dir / "config.json").exists():
            self.log_params(rid, read_json(stage_dir / "config.json"))
        if (stage_dir / "history.json").exists():
            from mlflow.entities import Metric

            hist = read_json(stage_dir / "history.json")
            items = [
                Metric(h["key"], float(h["value"]), int(h["ts"]), int(h["step"])) for h in hist
            ]
            for i in range(0, len(items), 500):
                self.client.log_batch(rid, metrics=items[i : i + 500])
        if (stage_dir / "metrics.json").exists():
            self.log_metrics(rid, read_json(stage_dir / "metrics.json"))
        for p in sorted(stage_dir.iterdir()):
            if p.suffix in ARTIFACT_SUFFIXES and p.is_file() and not p.name.startswith("."):
                self.client.log_artifact(rid, str(p))
        self.finish(rid)
        if source is None:
            write_json(produced, {"run_id": rid})
        return rid, source is not None

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)


def find_runs(uri: str, filter_string: str = "") -> list[Any]:
    """Runs of the elmo-news experiment (for tests, summaries and the registry)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000)
