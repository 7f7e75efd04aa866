"""The only module that talks to MLflow. Stage folders are logged as child runs of a parent run.

A stage that trains opens its child run when it starts (``stage_run``): its per-step and
per-epoch metrics stream into it while it trains, and the run's start, end and duration are the
stage's own. At the end the stage folder's figures (config.json, metrics.json, PNGs, reports) and
its dataset inputs are logged to it. A cached stage (or one built without a tracking target) is
logged after the fact by ``log_stage`` from the same folder, tagged with the run that first
produced it, so every parent run is complete in the UI. Client calls take explicit run ids (no
fluent active-run stack), so threads are safe.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from storage.paths import file_lock, read_json, write_json

EXPERIMENT = "elmo-news"
ARTIFACT_SUFFIXES = {".png", ".txt", ".json", ".md", ".csv"}
# MLflow 3's way to say what an experiment is (model training, not GenAI). MLflow 3.17's own UI
# routes by its GenAI / model-training switch instead while that is on (see ``runs_path``)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
SPLIT_CONTEXT = {"train": "training", "val": "validation", "test": "test"}
log = logging.getLogger("elmo_news.tracking")


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
    if exp is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=artifact_location(uri),
                tags={EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]},
            )
        except Exception:  # created concurrently by another run
            exp = client.get_experiment_by_name(name)
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # made by an older version
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def _flat(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, list | tuple) else str(obj)


def store_lock(uri: str) -> AbstractContextManager[None]:
    """Serialise first use of a local sqlite store: MLflow creates and migrates its schema on first
    connection, and two processes doing that at once collide."""
    db = _sqlite_db(uri)
    return nullcontext() if db is None else file_lock(db)


class Tracker:
    """An MLflow parent run for one flow run, and child runs under it."""

    def __init__(self, uri: str, parent_run_id: str | None = None) -> None:
        self.uri = uri
        with store_lock(uri):
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

    def target(self) -> dict[str, str]:
        """What a stage task needs to open its own child run under this parent (plain strings:
        it travels as a task parameter, outside every cache key)."""
        return {"uri": self.uri, "parent_run_id": self.parent_run_id or ""}

    def log_stage(
        self,
        name: str,
        stage_dir: Path,
        tags: dict[str, str],
        datasets: dict[str, Path] | None = None,
    ) -> tuple[str, bool]:
        """The stage's child run of this parent. Returns its run id and whether the stage was a
        cache hit. A stage that trained in this flow run already has its child run (opened by
        ``stage_run``); any other folder gets a new child run from its files, linked to the
        run that first produced it (``cached_from_run_id``)."""
        produced = stage_dir / "mlflow_source.json"
        source = read_json(produced)["run_id"] if produced.exists() else None
        if source is not None and self._is_own_child(source):
            from mlflow.entities import RunTag

            # the live run was opened by its task; the flow's tags (data hash, ...) join it here,
            # so live and cached child runs carry the same tags
            self.client.log_batch(source, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            return source, False
        all_tags = {"mlflow.parentRunId": self.parent_run_id or "", "stage": name, **tags}
        all_tags["cached"] = "true" if source else "false"
        if source:
            all_tags["cached_from_run_id"] = source
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        rid = run.info.run_id
        if (stage_dir / "history.json").exists():
            from mlflow.entities import Metric

            hist = read_json(stage_dir / "history.json")
            items = [
                Metric(h["key"], float(h["value"]), int(h["ts"]), int(h["step"])) for h in hist
            ]
            for i in range(0, len(items), 500):
                self.client.log_batch(rid, metrics=items[i : i + 500])
        self.fill_run(rid, stage_dir, datasets)
        self.finish(rid)
        if source is None:
            write_json(produced, {"run_id": rid})
        return rid, source is not None

    def _is_own_child(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except Exception:  # another store, or deleted
            return False
        return bool(self.parent_run_id) and run.data.tags.get("mlflow.parentRunId") == (
            self.parent_run_id
        )

    def fill_run(
        self, run_id: str, stage_dir: Path, datasets: dict[str, Path] | None = None
    ) -> None:
        """A finished stage folder's config (params), final metrics, artifacts and dataset
        inputs on its run."""
        if (stage_dir / "config.json").exists():
            self.log_params(run_id, read_json(stage_dir / "config.json"))
        if (stage_dir / "metrics.json").exists():
            metrics = read_json(stage_dir / "metrics.json")
            self.log_metrics(run_id, {k: v for k, v in metrics.items() if not isinstance(v, str)})
            for k, v in metrics.items():  # words (why training stopped) are tags
                if isinstance(v, str):
                    self.client.set_tag(run_id, k, v)
        for p in sorted(stage_dir.iterdir()):
            if p.suffix in ARTIFACT_SUFFIXES and p.is_file() and not p.name.startswith("."):
                if p.name not in ("mlflow_source.json", "history.json"):
                    self.client.log_artifact(run_id, str(p))
        if datasets:
            self.log_datasets(run_id, datasets)

    def log_datasets(self, run_id: str, datasets: dict[str, Path]) -> None:
        """Split name -> Parquet file, logged as the run's MLflow dataset inputs (the runs
        table's Dataset column): name ``<ingest key>-<split>``, digest from the file's sha256
        in its stage manifest, context training / validation / test."""
        import mlflow.data
        import polars as pl
        from mlflow.data.dataset_source_registry import get_registered_sources
        from mlflow.entities import DatasetInput, InputTag

        # the local-file source by name: resolving a bare path leaves MLflow two candidates
        # (and a warning saying so)
        sources: list[Any] = list(get_registered_sources())  # classes, typed as instances
        local = next(c for c in sources if c.__name__.startswith("LocalArtifact"))
        inputs = []
        for split, path in datasets.items():
            path = Path(path)
            manifest = path.parent / "DONE"
            sha = None
            if manifest.exists():
                sha = read_json(manifest)["files"].get(path.name, {}).get("sha256")
            df = pl.read_parquet(path, columns=["text", "label"])
            ds = mlflow.data.from_polars(  # type: ignore[attr-defined]  # set by mlflow.data's lazy loader
                df,
                source=local(str(path.resolve())),
                targets="label",
                name=f"{path.parent.name}-{split}",
                digest=(sha or "")[:16] or None,
            )
            context = SPLIT_CONTEXT.get(split, split)
            inputs.append(
                DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])
            )
        self.client.log_inputs(run_id, datasets=inputs)

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def link_model(self, run_id: str, model_id: str | None) -> None:
        """Show a logged model (a registered version's) among a run's outputs ("Logged
        models" of the parent run)."""
        if not model_id:
            return
        from mlflow.entities import LoggedModelOutput

        self.client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)])

    def parent_id(self) -> str:
        """The parent run's id (``start_parent`` first)."""
        if self.parent_run_id is None:
            raise RuntimeError("no parent run: start_parent() first")
        return self.parent_run_id

    def link_input_model(self, run_id: str, model_id: str | None) -> None:
        """Show a logged model (the reused biLM's) among a run's inputs."""
        if not model_id:
            return
        from mlflow.entities import LoggedModelInput

        self.client.log_inputs(run_id, models=[LoggedModelInput(model_id)])

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)


def runs_path(experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI route (after ``#``) of the experiment's training runs (or one run).

    MLflow 3.17's UI ignores ``mlflow.experimentKind`` while its GenAI / model-training switch
    is on (it is, by default): a browser lands where that switch last was, the GenAI overview
    on a fresh one. ``workflowType=machine_learning`` in the link turns it to model training
    (and the UI remembers it)."""
    route = f"/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{route}?workflowType=machine_learning"


def find_runs(uri: str, filter_string: str = "") -> list[Any]:
    """Runs of the elmo-news experiment (for tests, summaries and the registry)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000)


class StageRun:
    """A stage's live child run: metrics stream in as the stage trains. A tracking outage
    never fails training: the first failed call is logged as a warning and the run stops
    streaming (the stage folder still holds everything for ``log_stage``)."""

    def __init__(self, tracker: Tracker | None, run_id: str | None) -> None:
        self.tracker = tracker
        self.run_id = run_id

    def target(self) -> dict[str, str] | None:
        """What another process (a torchrun rank) needs to stream into this run."""
        if self.tracker is None or self.run_id is None:
            return None
        return {"uri": self.tracker.uri, "run_id": self.run_id}

    @classmethod
    def attach(cls, target: dict[str, str] | None) -> StageRun:
        """This run, from another process (``target()``); a no-op run without a target."""
        if not target:
            return cls(None, None)
        return cls(Tracker(target["uri"]), target["run_id"])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is None or self.run_id is None:
            return
        try:
            self.tracker.log_metrics(self.run_id, metrics, step)
        except Exception as e:
            log.warning("MLflow run %s stopped streaming metrics: %s", self.run_id, e)
            self.tracker = None

    def complete(self, stage_dir: Path, datasets: dict[str, Path] | None = None) -> None:
        """Figures of the finished folder onto the run, which then ends; the folder records
        the run that produced it (``mlflow_source.json``, outside the manifest)."""
        if self.tracker is None or self.run_id is None:
            return
        try:
            self.tracker.fill_run(self.run_id, stage_dir, datasets)
            self.tracker.finish(self.run_id)
            write_json(stage_dir / "mlflow_source.json", {"run_id": self.run_id})
        except Exception as e:
            log.warning("MLflow run %s could not be completed: %s", self.run_id, e)
        self.tracker = None


@contextmanager
def stage_run(
    target: dict[str, str] | None, name: str, tags: dict[str, str] | None = None
) -> Iterator[StageRun]:
    """Open the child run ``name`` under ``target`` (``{"uri", "parent_run_id"}``, from
    ``Tracker.target``) for a stage that is about to build; a failure marks it FAILED. Without
    a target (tests of a task body, a tracking server that cannot be reached) it is a no-op."""
    tracker, run_id = None, None
    if target:
        try:
            tracker = Tracker(target["uri"], target["parent_run_id"])
            all_tags = {
                "mlflow.parentRunId": target["parent_run_id"],
                "stage": name,
                "cached": "false",
                **(tags or {}),
            }
            run = tracker.client.create_run(
                tracker.experiment_id,
                run_name=name,
                tags=all_tags,
                start_time=int(time.time() * 1000),
            )
            run_id = run.info.run_id
        except Exception as e:
            log.warning("no live MLflow run for %s: %s", name, e)
            tracker, run_id = None, None
    live = StageRun(tracker, run_id)
    try:
        yield live
    except BaseException:
        if live.tracker is not None and live.run_id is not None:
            try:
                live.tracker.finish(live.run_id, "FAILED")
            except Exception:
                pass
        raise
    else:
        if live.tracker is not None and live.run_id is not None:  # not completed: end it
            try:
                live.tracker.finish(live.run_id)
            except Exception:
                pass
