"""The classifier fan-out on this machine: the three classifiers + the TF-IDF baseline of a run,
once on the thread runner (1 worker: one task at a time with every core, today's default) and
once on a local Dask cluster (2 single-threaded worker processes, ``--task-runner dask``), on
the same cached biLM and layers; then the projected wall time of a 24-point sweep on N workers.

It needs a home with a finished run (``elmo-news run --profile sample --data
../shared/data/ag_news_sample ... --home H``): its dataset, biLM and layers are reused, the fits
go to fresh scratch homes (nothing is served from cache). Run (from the repo root)::

    .venv/bin/python bench/fanout.py --home H [--out bench/results/fanout.json]

Last output line: ``dask_speedup=<thread wall / dask wall>``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _flow(kind: str, run: dict, profile: str, scratch: str) -> dict:
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.fanout import fanout
    from flows.params import RunParams
    from storage.paths import read_json
    from tasks.baseline import baseline
    from tasks.classify import classify

    cfg = RunParams(profile=profile, data=run["dataset"]).resolve()

    def fresh(t):  # never served from Prefect's cache: the point is to time the fits
        return t.with_options(refresh_cache=True)

    @flow(name=f"bench-fanout-{kind}", task_runner=ThreadPoolTaskRunner(max_workers=1))
    def bench() -> dict:
        t0 = time.perf_counter()
        with fanout(kind, "", Path(scratch), 4) as fan:
            t_up = time.perf_counter() - t0
            futures = {
                f"classifier-{s}": fan.submit(
                    fresh(classify),
                    run["features"],
                    run["bilm"],
                    run["dataset"],
                    s,
                    scratch,
                    cfg.classifier,
                    "auto",
                    None,
                )  # fmt: skip
                for s in ("sum", "wsum", "function")
            }
            futures["baseline-tfidf"] = fan.submit(
                fresh(baseline), run["dataset"], scratch, cfg.baseline, None
            )
            dirs = {k: f.result() for k, f in futures.items()}
            workers = dict(fan.workers)
        wall = time.perf_counter() - t0
        models = {k: read_json(Path(d) / "metrics.json") for k, d in dirs.items()}
        return {
            "wall_s": round(wall, 1),
            "cluster_start_s": round(t_up, 1),
            "workers": workers,
            "models": {
                k: {
                    "test_accuracy": m["test_accuracy"],
                    "fit_wall_s": round(m.get("wall_s", float("nan")), 1),
                }
                for k, m in models.items()
            },
        }

    return bench()


def _cpu() -> str:
    """The CPU's model name and the vector extensions that decide torch's speed here."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags = set(next((ln for ln in info.splitlines() if ln.startswith("flags")), "").split())
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(ext)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", required=True, help="a home with a finished sample run")
    ap.add_argument("--profile", default="sample")
    ap.add_argument("--sweep-points", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fanout.json"))
    args = ap.parse_args()

    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from storage.paths import Home
    from tasks.common import visible_cores

    run = Home(args.home).latest_run()
    results = {}
    for kind in ("thread", "dask"):
        with tempfile.TemporaryDirectory(prefix=f"fanout-{kind}-") as scratch:
            results[kind] = _flow(kind, run, args.profile, scratch)
        print(kind, json.dumps(results[kind]), flush=True)
    thread, dask = results["thread"], results["dask"]
    fits_1 = [m["fit_wall_s"] for k, m in dask["models"].items() if k.startswith("classifier")]
    fits_all = [m["fit_wall_s"] for k, m in thread["models"].items() if k.startswith("classifier")]
    t1 = sum(fits_1) / len(fits_1)  # one classifier fit on a single-threaded worker
    tall = sum(fits_all) / len(fits_all)  # one fit with every core (thread runner)
    n = args.sweep_points
    projection = {
        "fit_s_1_thread": round(t1, 1),
        f"fit_s_{visible_cores()}_threads": round(tall, 1),
        "thread_runner_this_machine_s": round(n * tall),
        # N single-core workers, each fit as fast as on this machine's single-threaded worker
        "dask_workers": {
            str(w): round(math.ceil(n / w) * t1 + dask["cluster_start_s"])
            for w in (1, 2, 4, 8, 12, 24)
        },
    }
    report = {
        "command": "bench/fanout.py --home " + args.home,
        "machine": {
            "cpu": _cpu(),
            "cores": visible_cores(),
            "python": platform.python_version(),
        },
        "home_run": run["parent_run_id"],
        "thread_runner_1_worker": thread,
        "dask_2_workers_x_1_thread": dask,
        "dask_speedup": round(thread["wall_s"] / dask["wall_s"], 3),
        f"sweep_{n}_points_projection_s": projection,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"dask_speedup={report['dask_speedup']}")


if __name__ == "__main__":
    main()
