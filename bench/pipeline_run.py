"""One end-to-end run of the pipeline, timed, as a report: the command (any ``elmo-news run``),
the machine, wall time, peak memory, every model's test accuracy and macro F1, the gain over
the static ablation and the biLM's validation perplexities, from the run's own summary.

    .venv/bin/python bench/pipeline_run.py --name sample_run -- \\
        elmo-news run --profile sample --data ../shared/data/ag_news_sample \\
        --pretrain-corpus ../shared/data/reuters21578/reuters21578.csv
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import machine  # noqa: E402
from storage.paths import Home, read_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="report name: bench/results/NAME.json")
    ap.add_argument("--home", default=None, help="the run's home (default: its own default)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- elmo-news run ...")
    args = ap.parse_args()
    cmd = [c for c in args.command if c != "--"]
    if not cmd:
        ap.error("give the command after --")
    exe = shutil.which(cmd[0], path=str(Path(sys.executable).parent)) or cmd[0]
    home = Home(args.home)
    if args.home:
        cmd += ["--home", args.home]
    t0 = time.perf_counter()
    subprocess.run([exe, *cmd[1:]], check=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    summary = home.latest_run()
    models = summary["models"]
    bilm = read_json(Path(summary["bilm"]) / "metrics.json")
    report = {
        "command": " ".join(cmd),
        "machine": machine(),
        "wall_s": wall,
        "peak_rss_gib": peak / 2**30,
        "test_accuracy": {k: v["test_accuracy"] for k, v in models.items()},
        "test_macro_f1": {k: v["test_macro_f1"] for k, v in models.items()},
        "elmo_gain_points": {k: 100 * v for k, v in summary["elmo_gains"].items()},
        "bilm_val_perplexity_forward": bilm.get("val_perplexity_forward"),
        "bilm_val_perplexity_backward": bilm.get("val_perplexity_backward"),
        "stage_wall_s": summary["timings"],
    }
    out = RESULTS / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
