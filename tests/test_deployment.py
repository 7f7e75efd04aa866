"""prefect.yaml for real: a Prefect server on a free 127.0.0.1 port, the process pool, `prefect
deploy --all`, a worker, `prefect deployment run` of the smoke profile, then MLflow and the
registry are checked, and the scheduled deployment's cron schedule."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.registry import MODEL_NAME
from storage.tracking import find_runs
from tests.conftest import ROOT, free_port, wait_http

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


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_deploy_run_and_schedule(ag_slice, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "MLFLOW_TRACKING_URI": uri,
        "ELMO_NEWS_THREADS": "1",
    }
    procs = []
    try:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, cwd=tmp_path, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        procs.append(server)
        wait_http(f"{api}/health", server, "Prefect server")
        _prefect(["work-pool", "create", "elmo-news-pool", "--type", "process"], env)
        _prefect(["--no-prompt", "deploy", "--all"], env)
        worker_log = open(tmp_path / "worker.log", "w")
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "elmo-news-pool"],
                                  env=env, cwd=ROOT, start_new_session=True, stdout=worker_log, stderr=subprocess.STDOUT)  # fmt: skip
        procs.append(worker)
        params = {
            "profile": "smoke",
            "data": str(ag_slice),
            "pretrain_corpus": [],
            "home": str(tmp_path / "home"),
        }
        out = _prefect(
            ["deployment", "run", "elmo-news/elmo-news", "--params", json.dumps(params)], env
        )
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deadline = time.time() + 420
            while True:
                state = client.read_flow_run(run_id).state
                if state.is_final():
                    break
                assert time.time() < deadline, f"flow run still {state.name}"
                time.sleep(2)
            assert state.name == "Completed", (tmp_path / "worker.log").read_text()[-4000:]
            pre = client.read_deployment_by_name("elmo-news-pretrain/pretrain-bilm")
            assert pre.parameters["profile"] == "news" and len(pre.parameters["corpus"]) == 2
            scheduled = client.read_deployment_by_name("elmo-news/scheduled-retrain")
            limit = scheduled.global_concurrency_limit
            assert (limit.limit if limit is not None else scheduled.concurrency_limit) == 1
            schedules = [s.schedule for s in scheduled.schedules]
            assert [(s.cron, s.timezone) for s in schedules] == [("0 3 * * 1", "UTC")]
            on_demand = client.read_deployment_by_name("elmo-news/elmo-news")
            assert on_demand.parameters["profile"] == "sample" and not on_demand.schedules

        parents = find_runs(uri, f"tags.prefect_flow_run_id = '{run_id}'")
        assert len(parents) == 1
        children = find_runs(uri, f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
        assert {c.info.run_name for c in children} >= {
            "bilm-pretrain",
            "classifier-sum",
            "classifier-wsum",
            "classifier-function",
            "baseline-tfidf",
        }
        from mlflow.tracking import MlflowClient

        champion = MlflowClient(uri).get_model_version_by_alias(MODEL_NAME, "champion")
        assert str(champion.version) == "1"
    finally:
        for p in reversed(procs):
            _stop(p)
