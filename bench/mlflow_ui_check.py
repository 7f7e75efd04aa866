"""A real browser over the MLflow UI of a finished run: does a user see what the pipeline logged?

Starts ``mlflow ui`` on a free 127.0.0.1 port over a home's store, drives headless Chromium
(Debian's ``chromium`` package through Playwright's ``executable_path``: no browser download)
and checks, for the newest parent run of the home:

1. where the bare experiment URL lands, and that the runs page the pipeline links to
   (``?workflowType=machine_learning``) lists the parent run; expanding it shows every child
   run (classifier-*, baseline-tfidf, ...);
2. the parent run's comparison chart artifact renders as an image (natural size > 0).

Screenshots go to ``bench/results/mlflow_ui/``; the report (JSON) to
``bench/results/mlflow_ui_check.json``. Needs ``pip install playwright`` and
``apt-get install chromium``; run after a pipeline run::

    .venv/bin/python bench/mlflow_ui_check.py --home .elmo-news
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage.paths import Home, write_json  # noqa: E402
from storage.tracking import EXPERIMENT, find_runs, runs_path  # noqa: E402

OUT = ROOT / "bench" / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("mlflow ui exited early")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=".elmo-news")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    home = Home(args.home)
    uri = home.mlflow_uri()
    summary = home.latest_run()
    parent_id = summary["parent_run_id"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    parent = client.get_run(parent_id)
    children = sorted(
        c.info.run_name for c in find_runs(uri, f"tags.mlflow.parentRunId = '{parent_id}'")
    )
    chart = f"{parent_id}-comparison.png"
    shots = OUT / "mlflow_ui"
    shots.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    ui = subprocess.Popen(
        [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    checks: dict[str, object] = {}
    t0 = time.perf_counter()
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(f"{base}/health", ui)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            # 1a. where a fresh browser lands on the bare experiment URL
            page.goto(f"{base}/#/experiments/{exp.experiment_id}")
            page.wait_for_timeout(8_000)
            checks["bare_url_lands_on"] = page.url.split("#", 1)[1]
            # 1b. the runs page (the link the run prints): parent listed, children expanded
            page.goto(f"{base}/#{runs_path(exp.experiment_id)}")
            page.get_by_text(parent.info.run_name, exact=True).first.wait_for(timeout=60_000)
            checks["runs_url"] = page.url.split("#", 1)[1]
            checks["parent_listed"] = True
            # the parent row's expander (the icon button in its run-name cell)
            expander = "button[data-component-id*='runnamecellrenderer']"
            row = page.locator("[role='row']", has=page.get_by_text(parent.info.run_name))
            target = row.locator(expander) if row.count() else page.locator(expander)
            target.first.click()
            for _ in range(40):
                shown = [n for n in children if page.get_by_text(n, exact=True).count() > 0]
                if len(shown) == len(children):
                    break
                page.wait_for_timeout(500)
            checks["children_expected"] = children
            checks["children_shown"] = shown
            page.screenshot(path=str(shots / "experiment_runs.png"), full_page=True)
            # 2. the parent run's comparison chart in the artifact viewer
            route = runs_path(exp.experiment_id, parent_id).replace("?", f"/artifacts/{chart}?")
            page.goto(f"{base}/#{route}")
            page.get_by_text(chart).first.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => [...document.images].some(i => i.complete && i.naturalWidth >= 400)",
                timeout=60_000,
            )
            checks["chart_natural_size"] = page.evaluate(
                "() => [...document.images].filter(i => i.naturalWidth >= 400)"
                ".map(i => [i.naturalWidth, i.naturalHeight])[0]"
            )
            page.screenshot(path=str(shots / "parent_comparison_chart.png"), full_page=True)
            browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)
    ok = bool(
        checks.get("parent_listed")
        and set(checks.get("children_shown", [])) == set(children)
        and checks.get("chart_natural_size", [0])[0] > 0
    )
    report = {
        "command": "python bench/mlflow_ui_check.py --home " + args.home,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "chromium": subprocess.run(
            [args.chromium, "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "experiment_kind": exp.tags.get("mlflow.experimentKind"),
        "parent_run": parent.info.run_name,
        **checks,
        "screenshots": sorted(str(p.relative_to(ROOT)) for p in shots.glob("*.png")),
        "wall_s": round(time.perf_counter() - t0, 1),
        "ok": ok,
    }
    write_json(OUT / "mlflow_ui_check.json", report)
    print(json.dumps(report, indent=2))
    print(f"ui_check_ok={ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
