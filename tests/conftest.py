"""Shared fixtures: the real data beside the checkout, slices of it, temporary homes."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ELMO_NEWS_SHARED", ROOT.parent / "shared")) / "data"
AG = SHARED / "ag_news_sample"
REUTERS = SHARED / "reuters21578" / "reuters21578.csv"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest -n N: N test processes share the cores, so each (and every process it starts)
        # takes one torch / BLAS thread; two 2-thread processes on 2 cores spin on each
        # other's barriers (tasks/common.py: task_threads measured a 35x slower biLM step)
        os.environ.setdefault("ELMO_NEWS_THREADS", "1")
        os.environ.setdefault("OMP_NUM_THREADS", "1")


# the files with the longest module fixtures (servers, CLI runs, whole flows), longest first:
# `make test` runs a file per test process, so these start at once instead of one of them
# running alone at the end while the other process idles
HEAVY_FIRST = (
    "test_deployment",
    "test_reliability",
    "test_dask",
    "test_pretrain_flow",
    "test_ddp",
    "test_cli",
    "test_published_cli",
    "test_preflight",
    "test_flow_e2e",
    "test_registry",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order kept


def write_slice(src: Path, dst: Path, n: int, step: int = 1) -> Path:
    """Every ``step``-th of the first n*step lines of an AG CSV (one record per line there)."""
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(lines[: n * step : step]), encoding="utf-8")
    return dst


@pytest.fixture(scope="session")
def ag_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real slice of ag_news_sample: 480 train rows, 160 test rows (all four classes)."""
    assert AG.exists(), f"shared data missing at {AG}"
    d = tmp_path_factory.mktemp("ag_slice")
    write_slice(AG / "train.csv", d / "train.csv", 480, step=30)
    write_slice(AG / "test.csv", d / "test.csv", 160, step=40)
    return d


@pytest.fixture(scope="session")
def harness():
    """One Prefect test server for every flow test of the session (each boot costs ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(
        int(os.environ.get("ELMO_NEWS_THREADS", max(1, min(2, os.cpu_count() or 1))))
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    """Poll ``url`` until it answers; fail at once if ``proc`` (the server) has exited."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, f"{what} exited with {proc.returncode}"
            assert time.time() < deadline, f"{what} did not come up at {url}"
            time.sleep(0.5)


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a server started with ``start_new_session=True`` (its whole process group),
    SIGKILL if it does not end in ``timeout`` seconds."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real ``distributed`` scheduler and two single-threaded worker processes on
    127.0.0.1, started once per session; yields (scheduler address, worker addresses)."""
    import sys

    bin_dir = Path(sys.executable).parent
    logs = tmp_path_factory.mktemp("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    env.pop("ELMO_NEWS_THREADS", None)  # the workers' torch threads come from their share
    procs = [
        subprocess.Popen(
            [
                str(bin_dir / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdout=open(logs / "scheduler.log", "w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    ]
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [
                    str(bin_dir / "dask"),
                    "worker",
                    address,
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    "--memory-limit",
                    "0",
                    "--name",
                    f"w{i}",
                ],
                cwd=ROOT,
                env=env,
                start_new_session=True,
                stdout=open(logs / f"worker{i}.log", "w"),
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        )
    try:
        from distributed import Client

        deadline = time.time() + 120
        with Client(address, timeout=120) as client:
            while len(client.scheduler_info()["workers"]) < 2:
                for p in procs:
                    assert p.poll() is None, (logs / "worker0.log").read_text()[-2000:]
                assert time.time() < deadline, "the Dask workers did not register"
                time.sleep(0.5)
            workers = sorted(client.scheduler_info()["workers"])
        yield address, workers
    finally:
        for p in reversed(procs):
            stop_group(p)


def smoke_params(data: Path, home: Path, **fields: Any) -> Any:
    """The run parameters of a smoke run on ``data`` in ``home`` (``fields`` on top)."""
    from flows.params import RunParams

    return RunParams(profile="smoke", data=str(data), home=str(home), **fields)
