"""prefect.yaml as a team runs it: PostgreSQL, an MLflow server on it that serves the artifacts,
a Prefect server on it, the process and docker pools, `prefect deploy --all`, a process worker,
`prefect deployment run` of the smoke profile; then the parent and child runs, the artifacts
(through the MLflow server), the registry alias, the schedule and the docker deployment's job
variables are checked, and two runs registering the same model at once make one version (the
Prefect server's registry slot, not a file lock, serialises them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage.registry import MODEL_NAME
from storage.tracking import find_runs
from tests.conftest import ROOT, stop_group
from tests.servers import team_servers

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _prefect(args: list[str], env: dict[str, str], timeout: int = 180) -> str:
    res = subprocess.run(
        [str(BIN / "prefect"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def team(tmp_path_factory, ag_slice):
    """The servers, the pools, the deployments, a worker and one finished smoke run."""
    root = tmp_path_factory.mktemp("team")
    with team_servers(root / "servers") as urls:
        env = {
            **os.environ,
            "PREFECT_HOME": str(root / "client"),
            "PREFECT_API_URL": urls["prefect_api"],
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "MLFLOW_TRACKING_URI": urls["mlflow"],
            "ELMO_NEWS_THREADS": "1",
        }
        _prefect(["work-pool", "create", "elmo-news-pool", "--type", "process"], env)
        _prefect(["work-pool", "create", "elmo-news-docker", "--type", "docker"], env)
        _prefect(["--no-prompt", "deploy", "--all"], env)
        worker_log = root / "worker.log"
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "elmo-news-pool"],
                                  env=env, cwd=ROOT, start_new_session=True,
                                  stdout=open(worker_log, "w"), stderr=subprocess.STDOUT)  # fmt: skip
        try:
            params = {
                "profile": "smoke",
                "data": str(ag_slice),
                "pretrain_corpus": [],
                "home": str(root / "home"),
            }
            out = _prefect(
                [
                    "deployment",
                    "run",
                    "elmo-news/elmo-news",
                    "--params",
                    json.dumps({"params": params}),
                ],
                env,
            )
            run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: urls["prefect_api"]}):
                with get_client(sync_client=True) as client:
                    deadline = time.time() + 420
                    while True:
                        state = client.read_flow_run(run_id).state
                        if state.is_final():
                            break
                        assert time.time() < deadline, f"flow run still {state.name}"
                        time.sleep(2)
                    assert state.name == "Completed", worker_log.read_text()[-4000:]
                yield {**urls, "root": root, "run_id": run_id, "home": root / "home"}
        finally:
            stop_group(worker)


def test_deployments_as_declared(team):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: team["prefect_api"]}):
        with get_client(sync_client=True) as client:
            pre = client.read_deployment_by_name("elmo-news-pretrain/pretrain-bilm")
            pre_params = pre.parameters["params"]
            assert pre_params["profile"] == "news" and len(pre_params["corpus"]) == 2
            scheduled = client.read_deployment_by_name("elmo-news/scheduled-retrain")
            limit = scheduled.global_concurrency_limit
            assert (limit.limit if limit is not None else scheduled.concurrency_limit) == 1
            schedules = [s.schedule for s in scheduled.schedules]
            assert [(s.cron, s.timezone) for s in schedules] == [("0 3 * * 1", "UTC")]
            on_demand = client.read_deployment_by_name("elmo-news/elmo-news")
            assert on_demand.parameters["params"]["profile"] == "sample" and not on_demand.schedules
            # the container deployment: the docker pool, the image, the tracking server's env
            docker = client.read_deployment_by_name("elmo-news/elmo-news-docker")
            assert docker.work_pool_name == "elmo-news-docker"
            jv = docker.job_variables
            assert jv["image"] == "elmo-news:cpu"
            assert jv["env"]["MLFLOW_TRACKING_URI"].startswith("http://")
            assert jv["env"]["ELMO_NEWS_TASK_RUNNER"] == "dask"
            assert docker.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/elmo-news"}}
            ]
            # and the pool's job template accepts those variables
            pool = client.read_work_pool("elmo-news-docker")
            props = pool.base_job_template["variables"]["properties"]
            assert {"image", "env", "volumes"} <= set(props)


def test_runs_and_artifacts_through_the_mlflow_server(team, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = team["mlflow"]
    parents = find_runs(uri, f"tags.prefect_flow_run_id = '{team['run_id']}'")
    assert len(parents) == 1
    parent = parents[0]
    children = find_runs(uri, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} >= {
        "ingest",
        "bilm-pretrain",
        "classifier-sum",
        "classifier-wsum",
        "classifier-function",
        "baseline-tfidf",
    }
    # artifacts live on the server (proxied): nothing under the run's home
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/"), parent.info.artifact_uri
    client = MlflowClient(uri)
    got = client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))
    assert "classifier-wsum" in Path(got).read_text()
    served = list(Path(team["artifacts"]).rglob("summary.md"))
    assert served, "the server's artifact store holds no summary.md"
    home = team["home"]
    assert not (home / "mlflow.db").exists() and not (home / "mlartifacts").exists()
    wsum = next(c for c in children if c.info.run_name == "classifier-wsum")
    names = {a.path for a in client.list_artifacts(wsum.info.run_id)}
    assert "metrics.json" in names


def test_registry_alias_and_model_through_the_server(team):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    champion = MlflowClient(team["mlflow"]).get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == "1"
    mlflow.set_tracking_uri(team["mlflow"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")  # downloaded via the server
    out = model.predict(pd.DataFrame({"text": ["Stocks fell on Wall Street.", "The team won."]}))
    assert len(out) == 2


def test_concurrent_registrations_make_one_version(team):
    """Two runs registering the same classifier at once against the servers: the registry
    slot on the Prefect server serialises them, so one version is made, both get it."""
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.registry import register_best

    uri = team["mlflow"]
    parent = find_runs(uri, f"tags.prefect_flow_run_id = '{team['run_id']}'")[0]
    children = find_runs(uri, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    summary = json.loads((team["home"] / "runs" / f"{parent.info.run_id}.json").read_text())
    registered = summary["registry"]["strategy"]
    other = next(s for s in ("sum", "wsum", "function") if s != registered)  # not registered yet
    clf_dir = summary["models"][f"classifier-{other}"]["dir"]
    args = (uri, parent.info.run_id, by_name[f"classifier-{other}"].info.run_id, clf_dir,
            summary["bilm"], summary["dataset"])  # fmt: skip
    results, errors = [], []

    def register() -> None:
        try:
            with temporary_settings({PREFECT_API_URL: team["prefect_api"]}):
                results.append(register_best.fn(*args))
        except Exception as e:  # noqa: BLE001  # reported below
            errors.append(e)

    threads = [threading.Thread(target=register) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    versions = MlflowClient(uri).search_model_versions(
        f"name='{MODEL_NAME}' and tags.classifier_key='{Path(clf_dir).name}'"
    )
    assert len(versions) == 1, [v.version for v in versions]
    assert {r["version"] for r in results} == {int(versions[0].version)}
