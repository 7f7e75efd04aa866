"""The console entry point: start-up and exit helpers, user errors as one line (real CLI
processes), and the ephemeral server that must not outlive a killed CLI. (The CLI also runs end
to end in test_reliability.py and test_registry.py.)"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_ENABLED,
    temporary_settings,
)

import flows.cli as cli_mod
from tests.conftest import AG, ROOT


def test_no_server_is_prestarted_when_an_api_url_is_configured(monkeypatch):
    def must_not_start(self, timeout=None):
        raise AssertionError("started a server although PREFECT_API_URL is set")

    monkeypatch.setattr(SubprocessASGIServer, "start", must_not_start)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert cli_mod.prestart_ephemeral_server() is None
    # no URL, but ephemeral servers turned off: Prefect would refuse to run, not use one
    with temporary_settings(
        updates={PREFECT_API_URL: None, PREFECT_SERVER_EPHEMERAL_ENABLED: False}
    ):
        assert cli_mod.prestart_ephemeral_server() is None


def test_prestart_runs_in_the_background_and_its_failure_surfaces(monkeypatch):
    calls = []

    def failing_start(self, timeout=None):
        calls.append(self)
        raise RuntimeError("port 8123 refused")

    monkeypatch.setattr(SubprocessASGIServer, "start", failing_start)
    with temporary_settings(
        updates={PREFECT_API_URL: None, PREFECT_SERVER_EPHEMERAL_ENABLED: True}
    ):
        started = cli_mod.prestart_ephemeral_server()
    assert started is not None
    with pytest.raises(RuntimeError, match="port 8123 refused"):
        started.result(timeout=30)
    assert len(calls) == 1


def test_cli_freezes_the_heap_before_the_interpreter_exits(monkeypatch):
    def fake_app():
        raise SystemExit(0)  # what typer's standalone mode does after a command

    monkeypatch.setattr(cli_mod, "app", fake_app)
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli_mod.cli()
        assert exit_info.value.code == 0  # the command's exit status passes through
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # give this test process its normal collector back


# --------------------------------------------------------------------------- real processes


def _cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        ELMO_NEWS_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--data", "/no/such/news"], "error: /no/such/news: data folder or file does not exist"),
        (["run", "--data", str(AG), "--pretrain-corpus", "/no/corpus.txt"], "error: /no/corpus.txt: pretrain corpus folder or file does not exist"),
        (["run", "--data", str(AG), "--set", "classifier.lr=-1"], "error: classifier lr must be > 0"),
        (["run", "--data", str(AG), "--set", "classifierlr=1"], "error: --set expects section.field=value"),
        (["run", "--data", str(AG), "--set", "classifier.select_on=f1"], "error: classifier select_on must be accuracy or loss, got 'f1'"),
        (["predict", "--model", "models:/no-such-model@champion", "--input", str(AG / "test.csv"), "--output", "p.parquet"], "error: models:/no-such-model@champion: no such model version"),
        (["predict", "--input", "/no/input.csv", "--output", "p.parquet"], "error: /no/input.csv: input folder or file does not exist"),
        (["run", "--data", str(AG), "--bilm", "models:/elmo-news-bilm/7"], "error: models:/elmo-news-bilm/7: no such model version"),
        (["run", "--data", str(AG), "--bilm", "/no/bilm"], "error: /no/bilm: biLM folder or file does not exist"),
        (["pretrain", "--corpus", "/no/news.en-*-of-00100"], "error: /no/news.en-*-of-00100: pretrain corpus glob matches no files"),
    ],
)  # fmt: skip
def test_a_user_error_is_one_line_on_stderr_and_a_nonzero_exit(args, needle, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=_cli_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), res.stderr
    assert "Traceback" not in res.stdout + res.stderr


def test_debug_keeps_the_traceback(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--debug", "run", "--data", "/no/such/news"],
        env=_cli_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "UserError" in res.stderr and "/no/such/news" in res.stderr


def _children(pid: int) -> dict[int, str]:
    """Live child processes of pid -> command line (from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"  # a zombie is dead, only unreaped


def test_the_ephemeral_server_dies_with_a_killed_cli(ag_slice, tmp_path):
    """SIGKILL runs no exit handler: the CLI's watchdog stops the server it started."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--profile", "smoke", "--data", str(ag_slice),
         "--home", str(tmp_path / "home"), "--set", "pretrain.epochs=40"],
        env=_cli_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")))
    reader.start()
    try:
        deadline = time.time() + 240
        server = guard = None
        while time.time() < deadline and proc.poll() is None:
            kids = _children(proc.pid)
            server = next((p for p, cmd in kids.items() if "uvicorn" in cmd), None)
            guard = next((p for p, cmd in kids.items() if "server_guard.py" in cmd), None)
            if server and guard and any(b"Beginning flow run" in ln for ln in lines):
                break
            time.sleep(0.5)
        assert server and guard, b"".join(lines).decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 15
        while time.time() < deadline and (_alive(server) or _alive(guard)):
            time.sleep(0.2)
        assert not _alive(server), "the Prefect server outlived its CLI"
        assert not _alive(guard)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(30)
