"""Published ELMo models through the real command line: ``import-bilm`` from URLs (a local
HTTP server), ``run --bilm`` on the imported model with no vocabulary or pretraining stage,
``export-bilm`` back to the published layout, and files that disagree as one error line."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from storage.published_models import load_published
from tests.conftest import AG, ROOT, SHARED

REF = SHARED / "elmo_reference" / "bilm-tf"


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # the home's own store
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), ELMO_NEWS_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def served(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(REF))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_import_run_and_export_a_published_model(served, tmp_path):
    home = tmp_path / "home"
    urls = ["--options", f"{served}/options.json", "--weights", f"{served}/lm_weights.hdf5"]
    res = _cli(tmp_path, "import-bilm", *urls, "--home", str(home))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout[res.stdout.index("{") :])
    assert info["registry"] == "models:/elmo-news-bilm/1"
    assert info["weights_sha256"].startswith("dd04f92cd41c89f8")  # SOURCE.md's sha256
    again = _cli(tmp_path, "import-bilm", *urls, "--home", str(home))  # downloaded once
    assert json.loads(again.stdout[again.stdout.index("{") :])["registry"] == info["registry"]
    assert len(list((home / "downloads").rglob("*.hdf5"))) == 1

    res = _cli(
        tmp_path, "run", "--profile", "smoke", "--data", str(AG), "--home", str(home),
        "--bilm", info["registry"],
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    acc = json.loads(res.stdout[res.stdout.index("{") :])
    assert set(acc) == {f"classifier-{s}" for s in ("sum", "wsum", "function", "static")} | {
        "baseline-tfidf"
    }
    assert all(0.25 < a <= 1.0 for a in acc.values())
    assert not (home / "vocab").exists() and not (home / "ids").exists()  # no pretraining
    summary = json.loads(max((home / "runs").glob("*.json"), key=os.path.getmtime).read_text())
    adapted = json.loads((Path(summary["bilm"]) / "metrics.json").read_text())
    assert adapted["lm_passes_skipped"] == 1 and adapted["new_words"] > 1000

    out = tmp_path / "exported"
    res = _cli(tmp_path, "export-bilm", info["registry"], "--out", str(out), "--home", str(home))
    assert res.returncode == 0, res.stderr
    original, _ = load_published(REF / "options.json", REF / "lm_weights.hdf5")
    back, _ = load_published(out / "options.json", out / "weights.hdf5")
    assert back.config == original.config
    theirs = back.state_dict()
    for name, a in original.state_dict().items():
        if not name.startswith("softmax."):  # no softmax in published files: a fresh one
            torch.testing.assert_close(a, theirs[name], atol=1e-6, rtol=0, msg=name)


def test_a_truncated_weights_file_is_one_error_line(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(REF, bad)
    raw = (bad / "lm_weights.hdf5").read_bytes()
    (bad / "lm_weights.hdf5").write_bytes(raw[:1000])
    res = _cli(
        tmp_path, "import-bilm", "--options", str(bad / "options.json"),
        "--weights", str(bad / "lm_weights.hdf5"), "--home", str(tmp_path / "home"),
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {bad / 'lm_weights.hdf5'}: unreadable HDF5 weights"
    )
