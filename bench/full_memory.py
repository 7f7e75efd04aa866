"""The ``full`` profile on 120k AG News documents in bounded memory: ``ag_news_large``'s 49,163
real train rows cycled to 120,000 (AG News' full train size; a temporary copy under the home,
never committed) + its real test split, through ``elmo-news run`` in this process.

Peak RSS is the larger of ``ru_maxrss`` of this process and of its children (tokenizer
workers), and a 1 s sampler of this process + its live children (psutil) records when the peak
happened, so a report says which stage holds it. The target: ≤ 8 GB.

    .venv/bin/python bench/full_memory.py --home /tmp/full-home [--rows 120000] \
        [--strategy wsum] [--set classifier.epochs=1] [--bilm models:/elmo-news-bilm/1]

Last line: ``full_peak_rss_gb=<GiB>``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

from flows.params import RunParams

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402
import psutil  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LARGE = DATA / "ag_news_large"
REUTERS = DATA / "reuters21578" / "reuters21578.csv"
RESULTS = Path(__file__).parent / "results" / "full_memory.json"


def replicate(src: Path, out: Path, rows: int) -> dict[str, int]:
    """``out``/train.parquet: ``src``'s train rows cycled to ``rows`` rows; test copied."""
    train = pl.read_parquet(src / "train.parquet")
    reps = -(-rows // train.height)
    big = pl.concat([train] * reps).head(rows)
    out.mkdir(parents=True, exist_ok=True)
    big.write_parquet(out / "train.parquet")
    test = pl.read_parquet(src / "test.parquet")
    test.write_parquet(out / "test.parquet")
    return {"train_rows": big.height, "distinct_train_rows": train.height, "test_rows": test.height}


class RssSampler(threading.Thread):
    """RSS of this process + its live children, every ``every`` s: the peak and when."""

    def __init__(self, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.t0 = time.perf_counter()
        self.peak = (0, 0.0)  # (bytes, seconds since start)
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()  # not _stop: Thread has its own

    def run(self) -> None:
        me = psutil.Process()
        while not self._done.wait(self.every):
            rss = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                except psutil.Error:
                    pass
            t = time.perf_counter() - self.t0
            self.samples.append((round(t, 1), rss))
            if rss > self.peak[0]:
                self.peak = (rss, t)

    def stop(self) -> None:
        self._done.set()
        self.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", required=True, help="the run's home (stages, MLflow, the copy)")
    ap.add_argument("--rows", type=int, default=120_000, help="train rows after cycling")
    ap.add_argument("--profile", default="full")
    ap.add_argument("--strategy", dest="strategies", action="append", default=[])
    ap.add_argument("--bilm", default="", help="reuse a biLM instead of pretraining one")
    ap.add_argument("--corpus", action="append", default=[], help="pretraining corpora")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.field=value")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.rows < 1:
        raise ValueError(f"--rows must be >= 1, got {args.rows}")

    from bench.machine import machine, write_report
    from flows.cli_args import parse_overrides
    from flows.server import prefect_defaults

    prefect_defaults()  # as the CLI: no telemetry calls from the embedded server (offline)
    from flows.pipeline import elmo_news

    home = Path(args.home)
    data = home / f"ag_news_x{args.rows}"
    counts = replicate(LARGE, data, args.rows)
    print(json.dumps(counts), flush=True)
    corpora = [] if args.bilm else (args.corpus or [str(REUTERS)])
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    summary = elmo_news(
        params=RunParams(
            profile=args.profile,
            data=str(data),
            pretrain_corpus=corpora,
            home=str(home),
            strategies=args.strategies or None,
            overrides=parse_overrides(args.sets),
            register_model=False,
            bilm=args.bilm,
        )
    )
    wall = time.perf_counter() - t0
    sampler.stop()
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    peak_bytes = max(peak * 1024, sampler.peak[0])
    features = Path(summary["features"])
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "profile": args.profile,
        "overrides": args.sets,
        "bilm": args.bilm,
        "counts": counts,
        "test_accuracy": {k: v["test_accuracy"] for k, v in summary["models"].items()},
        "elmo_gains": summary["elmo_gains"],
        "layers_disk_bytes": sum(p.stat().st_size for p in features.rglob("*") if p.is_file()),
        "timings_s": summary["timings"],
        "wall_s": wall,
        "peak_rss_bytes": peak_bytes,
        "sampled_peak_rss_bytes": sampler.peak[0],
        "sampled_peak_at_s": round(sampler.peak[1], 1),
        # one sample per 10 s: the memory profile over the run
        "rss_timeline": sampler.samples[::10],
    }
    write_report(
        args.out, report, f"full_peak_rss_gb={peak_bytes / 2**30:.2f}", hide="rss_timeline"
    )


if __name__ == "__main__":
    main()
