"""Fan-out on a real Dask cluster (a scheduler and two single-threaded workers on 127.0.0.1):
the classifiers and the baseline run on those workers with one torch thread each, give the
thread runner's results, and a second run is served from cache; a sweep on the same cluster
reuses the run's biLM and layers. Plus the runner's parameter checks and the workers' checks."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from flows.fanout import check_workers, resolve_runner, thread_shares
from flows.params import RunParams
from flows.sweep import SweepParams
from storage.tracking import find_runs
from tests.test_flow_e2e import _task_states

pytestmark = pytest.mark.e2e
# two strategies (wsum: the sweep below reuses its classifier) + the ablation + the baseline:
# four tasks for the two workers, two classifier trainings fewer in each of the two runs
STRATEGIES = ["sum", "wsum"]
MODELS = [
    "classifier-sum",
    "classifier-wsum",
    "classifier-static",
    "baseline-tfidf",
]


def _smoke(ag_slice: Path, home: Path, **kw):
    from flows.pipeline import elmo_news

    state = elmo_news(params=RunParams(profile="smoke", data=str(ag_slice), home=str(home), register_model=False, strategies=STRATEGIES, **kw), return_state=True)  # fmt: skip
    return state.result(), _task_states(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def runs(harness, ag_slice, dask_cluster, tmp_path_factory):
    """The same smoke run on the thread runner and twice on the cluster (1 torch thread in
    the flow process too, so the two runners compute the same floats)."""
    address, _ = dask_cluster
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("fanout")
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("ELMO_NEWS_THREADS", "1")
    try:
        thread = _smoke(ag_slice, root / "thread", task_runner="thread")
        dask1 = _smoke(ag_slice, root / "dask", task_runner="dask", dask_address=address)
        dask2 = _smoke(ag_slice, root / "dask", dask_address=address)  # the address implies dask
        yield {"root": root, "thread": thread, "dask1": dask1, "dask2": dask2}
    finally:
        mp.undo()


def test_classifiers_run_on_the_cluster_workers(runs, dask_cluster):
    _, workers = dask_cluster
    summary, states = runs["dask1"]
    assert summary["task_runner"] == "dask"
    # two single-threaded workers on this machine's cores: one torch thread per task
    assert set(summary["dask_workers"]) == set(workers)
    assert set(summary["dask_workers"].values()) == {max(1, _cores() // 2)}
    assert states["train-classifier"] == ["Completed"] * 3
    uri = f"sqlite:///{runs['root'] / 'mlflow.db'}"
    children = find_runs(uri, f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    by_name = {c.info.run_name: c.data.tags for c in children}
    used = set()
    for name in MODELS:
        tags = by_name[name]
        assert tags["executor"] == "dask", (name, tags)
        assert tags["dask_worker"] in workers
        assert tags["torch_threads"] == str(max(1, _cores() // 2))
        used.add(tags["dask_worker"])
    assert used == set(workers), f"the fan-out used only {used}"
    # the thread runner's run ran them in the flow process
    thread_summary, _ = runs["thread"]
    thread_children = find_runs(
        uri, f"tags.mlflow.parentRunId = '{thread_summary['parent_run_id']}'"
    )
    assert {c.data.tags.get("executor") for c in thread_children if c.info.run_name in MODELS} == {
        "flow-process"
    }


def _cores() -> int:
    from tasks.common import visible_cores

    return visible_cores()


def test_dask_results_equal_the_thread_runners(runs):
    thread, _ = runs["thread"]
    dask, _ = runs["dask1"]
    for name in MODELS:
        a, b = thread["models"][name], dask["models"][name]
        assert a["test_accuracy"] == b["test_accuracy"], name
        assert a["test_macro_f1"] == b["test_macro_f1"], name
        # the stage folders' keys are the same: only the home differs
        assert Path(a["dir"]).name == Path(b["dir"]).name
        if name.startswith("classifier-"):
            pa = pl.read_parquet(Path(a["dir"]) / "predictions.parquet")
            pb = pl.read_parquet(Path(b["dir"]) / "predictions.parquet")
            assert pa["pred"].to_list() == pb["pred"].to_list(), name
            assert pa["p_World"].to_list() == pb["p_World"].to_list(), name


def test_second_dask_run_is_served_from_cache(runs):
    first, _ = runs["dask1"]
    second, states = runs["dask2"]
    assert set(states["train-classifier"]) == {"Cached"}, states
    assert states["baseline-tfidf"] == ["Cached"]
    for name in MODELS:
        assert second["models"][name]["dir"] == first["models"][name]["dir"]
        assert second["models"][name]["test_accuracy"] == first["models"][name]["test_accuracy"]


def test_sweep_on_the_cluster_reuses_the_runs_layers(runs, dask_cluster, harness, ag_slice):
    from flows.sweep import elmo_news_sweep

    address, _ = dask_cluster
    run_summary, _ = runs["dask1"]
    home = Path(run_summary["home"])
    out = elmo_news_sweep(
        params=SweepParams(
            grid={"classifier.lr": [0.005, 0.01]},
            seeds=2,
            profile="smoke",
            data=str(ag_slice),
            home=str(home),
            strategies=["wsum"],
            dask_address=address,
        )
    )
    assert out["features"] == run_summary["features"] and out["bilm"] == run_summary["bilm"]
    # 2 points x (wsum + the static ablation)
    assert sorted((p["point_index"], p["strategy"]) for p in out["points"]) == [
        (0, "static"),
        (0, "wsum"),
        (1, "static"),
        (1, "wsum"),
    ]
    rows = {(p["point"]["classifier.lr"], p["strategy"]): p for p in out["points"]}
    # lr 0.005 with the first seed is the run's own classifiers: the same folders, cached
    for s in ("wsum", "static"):
        base = rows[0.005, s]
        assert base["seeds"] == [7, 8]
        assert base["dirs"][0] == run_summary["models"][f"classifier-{s}"]["dir"]
        assert base["cached"][0] is True
    assert len({d for p in out["points"] for d in p["dirs"]}) == 8
    uri = f"sqlite:///{runs['root'] / 'mlflow.db'}"
    points = find_runs(uri, f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    point_runs = {r.info.run_name: r for r in points if r.data.tags.get("stage") == "sweep-point"}
    assert set(point_runs) == {"point-0-wsum", "point-1-wsum", "point-0-static", "point-1-static"}
    for p in out["points"]:
        r = point_runs[f"point-{p['point_index']}-{p['strategy']}"]
        assert float(r.data.params["classifier.lr"]) == p["point"]["classifier.lr"]
        accs = [
            json.loads((Path(d) / "metrics.json").read_text())["test_accuracy"] for d in p["dirs"]
        ]
        assert r.data.metrics["test_accuracy_mean"] == pytest.approx(statistics.fmean(accs))
        assert r.data.metrics["test_accuracy_std"] == pytest.approx(statistics.stdev(accs))
        seeds = find_runs(uri, f"tags.mlflow.parentRunId = '{r.info.run_id}'")
        assert sorted(s.info.run_name for s in seeds) == [
            f"classifier-{p['strategy']}-seed7",
            f"classifier-{p['strategy']}-seed8",
        ]
        if p["strategy"] == "wsum":  # its gain over the same point's ablation, paired by seed
            static = rows[p["point"]["classifier.lr"], "static"]["test_accuracy"]
            gains = [a - b for a, b in zip(accs, static, strict=True)]
            assert r.data.metrics["elmo_gain_mean"] == pytest.approx(statistics.fmean(gains))
            assert r.data.metrics["elmo_gain_std"] == pytest.approx(statistics.stdev(gains))
            history = MlflowClient(uri).get_metric_history(r.info.run_id, "elmo_gain")
            assert {m.step: m.value for m in history} == pytest.approx({7: gains[0], 8: gains[1]})
        else:
            assert "elmo_gain_mean" not in r.data.metrics
    assert "± " in out["markdown"] and "gain over static" in out["markdown"]


def test_runner_parameters():
    assert resolve_runner() == ("thread", "")
    assert resolve_runner("", "tcp://127.0.0.1:8786") == ("dask", "tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="'processes'"):
        resolve_runner("processes")
    with pytest.raises(ValueError, match="with task_runner 'thread'"):
        resolve_runner("thread", "tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="tcp://HOST:PORT, got '127.0.0.1:8786'"):
        resolve_runner("dask", "127.0.0.1:8786")


def test_runner_from_the_environment(monkeypatch):
    monkeypatch.setenv("ELMO_NEWS_TASK_RUNNER", "dask")
    assert resolve_runner() == ("dask", "")
    monkeypatch.setenv("ELMO_NEWS_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    assert resolve_runner() == ("dask", "tcp://10.0.0.5:8786")
    assert resolve_runner("thread") == ("thread", "")  # explicit: the env's address is not used
    monkeypatch.setenv("ELMO_NEWS_TASK_RUNNER", "threads")
    with pytest.raises(ValueError, match="'threads'"):
        resolve_runner()


def test_thread_shares_split_each_hosts_cores():
    workers = {
        "tcp://a:1": {"host": "a", "nthreads": 1},
        "tcp://a:2": {"host": "a", "nthreads": 1},
        "tcp://b:1": {"host": "b", "nthreads": 2},
        "tcp://c:1": {"host": "c", "nthreads": 4},
    }
    cores = {"tcp://a:1": 2, "tcp://a:2": 2, "tcp://b:1": 16, "tcp://c:1": 2}
    assert thread_shares(workers, cores) == {
        "tcp://a:1": 1,  # two workers share host a's 2 cores
        "tcp://a:2": 1,
        "tcp://b:1": 8,  # 2 task slots on 16 cores
        "tcp://c:1": 1,  # more slots than cores: never 0
    }


class _FakeClient:
    """A cluster whose second worker mounts other storage at the home's path."""

    class scheduler:
        address = "tcp://127.0.0.1:1"

    def __init__(self, blind: set[str]):
        self.blind = blind
        self.ran: list[str] = []

    def scheduler_info(self, n_workers=-1):
        return {"workers": {a: {"host": "h", "nthreads": 1} for a in ("tcp://w:1", "tcp://w:2")}}

    def run(self, fn, *args):
        self.ran.append(fn.__name__)
        if fn.__name__ == "_probe":
            out = {}
            for a in ("tcp://w:1", "tcp://w:2"):
                out[a] = {"cores": 2, "pid": 1, "sees_home": a not in self.blind}
                if a in self.blind:
                    out[a]["error"] = "[Errno 2] No such file or directory"
            return out
        return {}


def test_a_worker_that_cannot_see_the_home_fails_clearly(tmp_path):
    client = _FakeClient({"tcp://w:2"})
    with pytest.raises(ValueError, match=r"\['tcp://w:2'\] cannot see the home folder .*same path"):
        check_workers(client, tmp_path / "home")
    assert client.ran == ["_probe"]  # nothing else ran, no share was set
    assert not list((tmp_path / "home").glob(".worker-check-*"))  # the token is gone
    ok = _FakeClient(set())
    assert check_workers(ok, tmp_path / "home") == {"tcp://w:1": 1, "tcp://w:2": 1}
