"""Prediction throughput (docs/s) of a registered elmo-news model, through the same pyfunc that
`elmo-news predict` uses, on the AG News test split; also checks it against the labels.

    .venv/bin/python bench/predict_throughput.py --home .elmo-news \\
        [--model models:/elmo-news-classifier@champion] [--input ../shared/data/ag_news_sample/test.csv]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import machine, write_report  # noqa: E402
from serving.predict import predict_file  # noqa: E402
from storage.paths import Home  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=None)
    ap.add_argument("--model", default="models:/elmo-news-classifier@champion")
    ap.add_argument(
        "--input",
        default=str(Path(__file__).resolve().parents[2] / "shared/data/ag_news_sample/test.csv"),
    )
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "predict_throughput.json")
    )
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", Home(args.home).mlflow_uri())
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        stats = predict_file.fn(args.model, args.input, str(Path(tmp) / "pred.parquet"))
        stats["wall_s_with_model_load"] = time.perf_counter() - t0
    report = {
        "machine": machine(),
        "model": args.model,
        "input": args.input,
        **stats,
    }
    write_report(args.out, report, f"predict_docs_per_s={stats['docs_per_s']:.1f}")


if __name__ == "__main__":
    main()
