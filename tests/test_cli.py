"""The console entry point's start-up and exit helpers (the real CLI runs end to end in
test_reliability.py and test_registry.py)."""

from __future__ import annotations

import gc

import pytest
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_ENABLED,
    temporary_settings,
)

import flows.cli as cli_mod


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
