"""The whole flow on a small real slice under a Prefect test harness: MLflow runs and metrics,
cache hits on a second run, only classifiers re-run when only their config changes, and a bad
input file fails with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elmo_core.classifier_training import STOP_REASONS
from flows.params import PROFILES, RunParams
from storage.errors import DataError
from storage.registry import logged_model_id
from storage.tracking import find_runs
from tests.conftest import REUTERS

pytestmark = pytest.mark.e2e
CHILDREN = {
    "ingest",
    "bilm-pretrain",
    "classifier-sum",
    "classifier-wsum",
    "classifier-function",
    "classifier-static",
    "baseline-tfidf",
}
FINAL = {"test_accuracy", "test_macro_f1", "test_weighted_f1", "test_precision", "test_recall"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, monkeypatch_module):
    home = tmp_path_factory.mktemp("e2e_home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", uri)
    return home, uri


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# what these tests check is caching, invalidation and tracking, not what the biLM learns: 100
# Reuters articles instead of the smoke profile's 300 shorten each of their five pretrainings
CORPUS = {"corpus": {"max_docs": 100}}


def _run(harness, ag_slice: Path, home: Path, overrides: dict | None = None, **kw):
    from flows.pipeline import elmo_news

    state = elmo_news(
        params=RunParams(
            profile="smoke",
            data=str(ag_slice),
            pretrain_corpus=[str(REUTERS)],
            home=str(home),
            overrides={**CORPUS, **(overrides or {})},
            **kw,
        ),
        return_state=True,
    )
    return state.result(), _task_states(state.state_details.flow_run_id)


def _task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    out: dict[str, list[str]] = {}
    for tr in runs:
        out.setdefault(tr.name.rsplit("-", 1)[0], []).append(
            tr.state.name
        )  # "ingest-3fa" -> "ingest"
    return out


def _dir(summary: dict, child: str) -> str:
    return {"bilm-pretrain": summary["bilm"]}.get(child) or summary["models"][child]["dir"]


def _progress_artifacts() -> dict[str, float]:
    """The newest value of every progress artifact on the Prefect server, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"]))
        )
    out: dict[str, float] = {}
    for a in sorted(arts, key=lambda a: a.created):
        if a.key:
            out[a.key] = float(a.data)
    return out


HEAVY = [
    "ingest",
    "read-corpus",
    "build-vocab",
    "pretrain-bilm",
    "extract-layers",
    "train-classifier",
    "baseline-tfidf",
]


def test_flow_end_to_end(harness, env, ag_slice):
    home, uri = env
    first, states1 = _run(harness, ag_slice, home)
    assert all(s == "Completed" for name in HEAVY for s in states1[name]), states1
    assert len(states1["train-classifier"]) == 4  # 3 strategies + the static ablation

    # MLflow: one parent with every child, final metrics, per-epoch history, artifacts
    parent = find_runs(uri, f"attributes.run_id = '{first['parent_run_id']}'")[0]
    for key in ("rows_in_train", "rows_accepted_train", "rows_quarantined_train", "rows_in_test"):
        assert key in parent.data.metrics
    assert parent.data.metrics["rows_in_train"] == 480
    # the smoke profile caps documents at 32 tokens: what was cut is counted, per split
    assert parent.data.metrics["docs_cut_train"] > 0
    assert parent.data.metrics["tokens_cut_train"] >= parent.data.metrics["docs_cut_train"]
    assert parent.data.metrics["doc_tokens_max_train"] > 32
    children = find_runs(uri, f"tags.mlflow.parentRunId = '{first['parent_run_id']}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == CHILDREN
    first_sha = by_name["ingest"].data.tags["data_sha256"]
    static_acc = by_name["classifier-static"].data.metrics["test_accuracy"]
    for s in ("sum", "wsum", "function"):  # each strategy's gain over the static ablation
        acc = by_name[f"classifier-{s}"].data.metrics["test_accuracy"]
        assert parent.data.metrics[f"elmo_gain_{s}"] == pytest.approx(acc - static_acc)
        assert first["elmo_gains"][f"elmo_gain_{s}"] == pytest.approx(acc - static_acc)
    assert "elmo_gain_static" not in parent.data.metrics
    assert by_name["classifier-static"].data.tags["strategy"] == "static"
    for name in (
        "classifier-sum",
        "classifier-wsum",
        "classifier-function",
        "classifier-static",
        "baseline-tfidf",
    ):
        run = by_name[name]
        assert FINAL <= set(run.data.metrics), name
        assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
        assert run.data.tags["cached"] == "false"
        assert run.data.tags["data_sha256"] == first_sha  # the flow's tags on the live run too
    assert by_name["classifier-wsum"].data.tags["strategy"] == "wsum"
    assert "val_perplexity" in by_name["bilm-pretrain"].data.metrics
    assert by_name["bilm-pretrain"].data.params["bilm.hidden_dim"] == "24"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    hist = client.get_metric_history(by_name["classifier-sum"].info.run_id, "val_accuracy")
    assert len(hist) >= 1
    f1_hist = client.get_metric_history(by_name["classifier-sum"].info.run_id, "val_macro_f1")
    assert [h.step for h in f1_hist] == [h.step for h in hist]
    # why training stopped: a tag on the run, a word in the summary table
    sum_run = by_name["classifier-sum"].data
    assert sum_run.tags["stop_reason"] in STOP_REASONS
    assert sum_run.tags["selected_on"] == "accuracy"  # the default: best validation accuracy
    loss_hist = client.get_metric_history(by_name["classifier-sum"].info.run_id, "val_loss")
    assert [h.step for h in loss_hist] == [h.step for h in hist]
    assert sum_run.metrics["best_step"] <= sum_run.metrics["steps"] <= 340  # smoke's max_steps
    # the 480-row slice is far too little text for an in-run biLM: the summary says so
    assert len(first["notes"]) == 1 and "--bilm models:/elmo-news-bilm/N" in first["notes"][0]
    arts = {a.path for a in client.list_artifacts(by_name["classifier-wsum"].info.run_id)}
    # artifacts live beside the sqlite store under the home folder, not in ./mlruns of the cwd
    art_uri = client.get_run(by_name["classifier-wsum"].info.run_id).info.artifact_uri
    assert art_uri.startswith((home / "mlartifacts").resolve().as_uri()), art_uri
    assert (home / "mlartifacts").is_dir()
    assert {
        "confusion_matrix.png",
        "classification_report.txt",
        "layer_weights.json",
        "curves.png",
    } <= arts
    weights = json.loads(
        (Path(first["models"]["classifier-wsum"]["dir"]) / "layer_weights.json").read_text()
    )
    assert len(weights["weights"]) == 3 and abs(sum(weights["weights"]) - 1) < 1e-5

    # the experiment opens on its training runs in MLflow 3's UI, not on the GenAI overview
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # each run that reads the splits has them as dataset inputs, digests from the manifest
    manifest = json.loads((Path(first["dataset"]) / "DONE").read_text())["files"]
    for name in ("ingest", "classifier-sum", "baseline-tfidf"):
        inputs = client.get_run(by_name[name].info.run_id).inputs.dataset_inputs
        got = {
            next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
            for i in inputs
        }
        assert set(got) == {"training", "validation", "test"}, (name, got)
        assert got["training"].digest == manifest["train.parquet"]["sha256"][:16]
        assert got["test"].name == f"{Path(first['dataset']).name}-test"
    bilm_inputs = client.get_run(by_name["bilm-pretrain"].info.run_id).inputs.dataset_inputs
    assert [i.dataset.name.rsplit("-", 1)[1] for i in bilm_inputs] == ["train"]
    # a stage that trained has its own start and end: its duration covers its training
    for name in ("bilm-pretrain", "classifier-sum", "baseline-tfidf"):
        info = client.get_run(by_name[name].info.run_id).info
        wall = json.loads((Path(_dir(first, name)) / "metrics.json").read_text())["wall_s"]
        assert info.status == "FINISHED"
        assert (info.end_time - info.start_time) / 1000 >= wall, (name, info, wall)
    # the parent run: comparison chart, and the registered version among its logged models
    parent_run = client.get_run(first["parent_run_id"])
    assert f"{first['parent_run_id']}-comparison.png" in {
        a.path for a in client.list_artifacts(first["parent_run_id"])
    }
    assert first["registry"]["version"] >= 1
    version = client.get_model_version("elmo-news-classifier", str(first["registry"]["version"]))
    assert [o.model_id for o in parent_run.outputs.model_outputs] == [logged_model_id(version)]
    assert logged_model_id(version).startswith("m-")
    # Prefect UI: each training stage left a progress artifact that reached 100 %
    progress = _progress_artifacts()
    for key in ("progress-biLM", "progress-classifier-sum", "progress-layers-test"):
        assert progress.get(key.lower()) == 100.0, progress

    # second identical run: every heavy task is served from Prefect's cache, MLflow still complete
    second, states2 = _run(harness, ag_slice, home)
    assert all(s == "Cached" for name in HEAVY for s in states2[name]), states2
    assert second["models"] == first["models"]
    children2 = find_runs(uri, f"tags.mlflow.parentRunId = '{second['parent_run_id']}'")
    assert {c.info.run_name for c in children2} == CHILDREN
    for c in children2:
        assert c.data.tags["cached"] == "true"
        assert c.data.tags["cached_from_run_id"] in {x.info.run_id for x in children}
    sum2 = next(c for c in children2 if c.info.run_name == "classifier-sum")
    assert (
        sum2.data.metrics["test_accuracy"]
        == by_name["classifier-sum"].data.metrics["test_accuracy"]
    )

    # only the classifier config changes: only the classifier tasks run again
    third, states3 = _run(harness, ag_slice, home, overrides={"classifier": {"lr": 0.004}})
    for name in (
        "ingest",
        "read-corpus",
        "build-vocab",
        "pretrain-bilm",
        "extract-layers",
        "baseline-tfidf",
    ):
        assert states3[name] == ["Cached"], (name, states3)
    assert states3["train-classifier"] == ["Completed"] * 4


def test_bad_input_file_fails_with_a_clear_error(harness, env, tmp_path):
    home, _ = env
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("")
    (bad / "test.csv").write_text('"1","t","d"\n')
    from flows.pipeline import elmo_news

    with pytest.raises(DataError, match=r"train\.csv: file is empty"):
        elmo_news(params=RunParams(profile="smoke", data=str(bad), home=str(home)))


def test_invalidation_matrix_and_corrupt_outputs(harness, env, ag_slice, tmp_path):
    """biLM config change re-runs biLM, layers and classifiers only; changed data behind the same
    path re-runs everything; a truncated Parquet or checkpoint is rebuilt, never loaded."""
    home, _ = env
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "test.csv"):
        (data / name).write_bytes((ag_slice / name).read_bytes())
    first, _ = _run(harness, data, home)

    _, states = _run(harness, data, home, overrides={"bilm": {"dropout": 0.2}})
    for name in ("ingest", "read-corpus", "build-vocab", "baseline-tfidf"):
        assert states[name] == ["Cached"], (name, states)
    for name in ("pretrain-bilm", "extract-layers"):
        assert states[name] == ["Completed"], (name, states)
    assert states["train-classifier"] == ["Completed"] * 4

    # a truncated Parquet file and a damaged checkpoint: detected, rebuilt, results unchanged
    train_parquet = Path(first["dataset"]) / "train.parquet"
    train_parquet.write_bytes(train_parquet.read_bytes()[:100])
    bilm_pt = Path(first["bilm"]) / "bilm.pt"
    raw = bytearray(bilm_pt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bilm_pt.write_bytes(bytes(raw))
    again, states = _run(harness, data, home)
    assert (
        states["ingest"].count("Completed") == 1 and states["pretrain-bilm"].count("Completed") == 1
    )
    assert (
        again["models"]["classifier-sum"]["test_accuracy"]
        == first["models"]["classifier-sum"]["test_accuracy"]
    )
    assert again["bilm"] == first["bilm"]

    with open(data / "train.csv", "a", encoding="utf-8") as f:
        f.write('"2","A brand new sports story","The home team won the final again."\n')
    changed, states = _run(harness, data, home)
    for name in HEAVY:
        if name != "read-corpus":  # the Reuters corpus did not change
            assert set(states[name]) == {"Completed"}, (name, states)
    assert changed["dataset"] != first["dataset"]
    assert changed["rows"]["rows_in_train"] == first["rows"]["rows_in_train"] + 1


def test_stage_metrics_stream_to_mlflow_while_the_flow_runs(
    harness, env, ag_slice, tmp_path, monkeypatch
):
    """A classifier held after its first validation: its child run is already there, RUNNING,
    with that validation's metrics, while the flow has not finished; afterwards it is the run's
    only classifier-wsum child and holds every validation."""
    import threading

    from mlflow.tracking import MlflowClient

    from tasks.common import History

    _, uri = env
    first_epoch, release = threading.Event(), threading.Event()
    original = History.__call__

    def gated(self, metrics, step):
        original(self, metrics, step)
        if self.prefix == "classifier-wsum" and "val_accuracy" in metrics:
            if not first_epoch.is_set():
                first_epoch.set()
                assert release.wait(300)

    monkeypatch.setattr(History, "__call__", gated)
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = _run(
                harness,
                ag_slice,
                tmp_path / "home",
                strategies=["wsum"],
                register_model=False,
                overrides={"classifier": {"seed": 11}},
            )
        except BaseException as e:  # surfaced below
            out["error"] = e
        finally:
            release.set()

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert first_epoch.wait(600), out.get("error")
        live = find_runs(
            uri, "attributes.run_name = 'classifier-wsum' and attributes.status = 'RUNNING'"
        )
        assert len(live) == 1, live
        client = MlflowClient(uri)
        hist = client.get_metric_history(live[0].info.run_id, "val_accuracy")
        # logged at the first validation's optimizer step
        assert [h.step for h in hist] == [PROFILES["smoke"]["classifier"]["eval_every"]]
        parent_id = live[0].data.tags["mlflow.parentRunId"]
        assert client.get_run(parent_id).info.status == "RUNNING"
    finally:
        release.set()
        worker.join(600)
    assert "error" not in out, out.get("error")
    summary, _ = out["result"]
    assert summary["parent_run_id"] == parent_id
    children = find_runs(uri, f"tags.mlflow.parentRunId = '{parent_id}'")
    wsum = [c for c in children if c.info.run_name == "classifier-wsum"]
    assert [c.info.run_id for c in wsum] == [live[0].info.run_id]
    assert wsum[0].info.status == "FINISHED" and wsum[0].data.tags["cached"] == "false"
    hist = client.get_metric_history(wsum[0].info.run_id, "val_accuracy")
    # every epoch the stage trained (its own history.json), the held first one included
    stage_dir = Path(summary["models"]["classifier-wsum"]["dir"])
    epochs = [p["step"] for p in json.loads((stage_dir / "history.json").read_text())
              if p["key"] == "val_accuracy"]  # fmt: skip
    assert len(epochs) >= 2 and sorted(h.step for h in hist) == sorted(epochs)
