"""Real servers on 127.0.0.1 for the tests, as a team runs them (README "Team set-up"):
PostgreSQL (Debian's package: initdb + pg_ctl in a temporary folder), an MLflow tracking
server on it that serves artifacts, a Prefect server on it."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import free_port, stop_group, wait_http

BIN = Path(sys.executable).parent


def pg_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    assert found, f"{name} not found: apt-get install postgresql (.ci/run does)"
    return found


def _as_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster on a free 127.0.0.1 port (trust auth, superuser ``elmo``);
    yields ``HOST:PORT``."""
    root = Path(tempfile.mkdtemp(prefix="elmo-pg-"))  # under /tmp: the postgres user can reach it
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    subprocess.run(
        _as_owner([pg_bin("initdb"), "-D", str(data), "-U", "elmo", "--auth=trust", "-E", "UTF8",
                   "--no-sync"]),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    subprocess.run(
        _as_owner([pg_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w",
                   "start"]),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(
            _as_owner([pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True, timeout=60,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def create_database(hostport: str, name: str) -> None:
    import psycopg

    host, port = hostport.split(":")
    with psycopg.connect(host=host, port=int(port), user="elmo", dbname="postgres",
                         autocommit=True) as conn:  # fmt: skip
        conn.execute(f'CREATE DATABASE "{name}"')


def start_mlflow(backend_uri: str, artifacts: Path, log: Path) -> tuple[str, subprocess.Popen]:
    """``mlflow server`` on the given store, serving artifacts from ``artifacts``."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=log.parent, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    return f"http://127.0.0.1:{port}", proc


def start_prefect(db_url: str, prefect_home: Path, log: Path) -> tuple[str, subprocess.Popen]:
    """``prefect server start`` with its database on PostgreSQL."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_DATABASE_CONNECTION_URL": db_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=log.parent, start_new_session=True, stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    return f"http://127.0.0.1:{port}/api", proc


@contextmanager
def team_servers(root: Path) -> Iterator[dict[str, str]]:
    """PostgreSQL + MLflow server + Prefect server, started together; yields their URLs."""
    root.mkdir(parents=True, exist_ok=True)
    with postgres() as pg:
        create_database(pg, "mlflow")
        create_database(pg, "prefect")
        procs = []
        try:
            mlflow_url, mlflow_proc = start_mlflow(
                f"postgresql://elmo@{pg}/mlflow", root / "artifacts", root / "mlflow.log"
            )
            procs.append(mlflow_proc)
            api, prefect_proc = start_prefect(
                f"postgresql+asyncpg://elmo@{pg}/prefect", root / "prefect", root / "prefect.log"
            )
            procs.append(prefect_proc)
            wait_http(f"{mlflow_url}/health", mlflow_proc, "MLflow server")
            wait_http(f"{api}/health", prefect_proc, "Prefect server")
            yield {
                "postgres": pg,
                "mlflow": mlflow_url,
                "prefect_api": api,
                "artifacts": str(root / "artifacts"),
            }
        finally:
            for p in reversed(procs):
                stop_group(p)
