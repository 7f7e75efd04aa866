"""The embedded (ephemeral) Prefect server of a command: offline defaults, a start that
overlaps the pipeline's imports, a watchdog that stops it with its process, and an exit that
does not wait for a boot a refused run will never use."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


def prefect_defaults() -> None:
    """Offline-friendly defaults for the embedded (ephemeral) Prefect server; env wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # "Creating initial MLflow database tables..." on a new store says nothing a user can act on
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def prestart_ephemeral_server() -> Future[None] | None:
    """Start Prefect's ephemeral API server in a background thread when no API URL is set.

    The server boots in its own process; the flow would otherwise start it only after the
    pipeline's imports (torch, MLflow, scikit-learn: seconds), so the two ran one after the
    other. Started here they overlap. Wait on the returned future before the flow
    starts (a failed start raises there); the flow then reuses this server (Prefect keeps one
    instance per process). None when a server is configured (``PREFECT_API_URL``) or ephemeral
    servers are turned off (``PREFECT_SERVER_EPHEMERAL_ENABLED``): Prefect would not use one.
    """
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    # the same test as Prefect's client before it starts one itself
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    ensure_logging_setup()
    # its "Starting temporary server" line waits until the parameters are known good: a run
    # refused for a bad value prints that one error line and nothing about a server
    logging.getLogger("prefect").disabled = True
    server = SubprocessASGIServer()

    def start() -> None:
        server.start()
        if server.server_process is not None:
            guard_server(server.server_process.pid)

    pool = ThreadPoolExecutor(1, thread_name_prefix="prefect-server-start")
    started = pool.submit(start)
    pool.shutdown(wait=False)  # the submitted start still runs to its end
    started.server = server  # type: ignore[attr-defined]  # for abandon_server
    return started


def abandon_server(started: Future[None] | None, status: int) -> None:
    """Exit now with ``status``, killing a prestarted server that is still booting: a run
    refused for a bad parameter must not wait for a boot it will never use (the start
    thread would hold the interpreter's exit until the server answered)."""
    if started is None:
        return
    import time

    server = started.server  # type: ignore[attr-defined]  # set by prestart_ephemeral_server
    deadline = time.monotonic() + 10
    while server.server_process is None and not started.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.server_process is not None:
        server.server_process.kill()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(status)


def guard_server(server_pid: int) -> subprocess.Popen[bytes]:
    """A watchdog process that stops the server once this process is gone, SIGKILL included
    (``flows/server_guard.py``); it ends by itself when the server does."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", str(Path(__file__).with_name("server_guard.py")),
         str(os.getpid()), str(server_pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def await_server(started: Future[None] | None, home_dir: str) -> None:
    """Before the flow starts: while the prestarted server still boots, create / migrate the
    MLflow store (seconds on a new home) instead of at the flow's start; then wait until the
    server is up (the flow must find it up, not half-started)."""
    if started is None:
        return
    from storage.paths import Home
    from storage.tracking import Tracker

    if not started.done():
        Tracker(Home(home_dir).mlflow_uri())
    started.result()
    logging.getLogger("prefect").disabled = False
    logging.getLogger("prefect").info("Prefect server (ephemeral): %s", _server_url())


def _server_url() -> str:
    from prefect.server.api.server import SubprocessASGIServer

    return SubprocessASGIServer().address
