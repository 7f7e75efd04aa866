"""Memory of pretraining at corpus scale: does peak RSS grow with the corpus?

For each scale (1x = ``news_corpus`` as it is, 40.7M words; 4x = its rows written four times
into a temporary sharded copy, generated here and deleted afterwards, never committed) a fresh
process runs the pipeline's own stage bodies on a fresh home: corpus ingestion (streamed
batches through the tokenizer workers), the vocabulary (merged counts), the memory-mapped id
shards and 200 biLM pretraining steps (the ``news`` profile's biLM, E = H = 192). It reports each
stage's wall time and the process's peak RSS after it (``ru_maxrss``) and the tokenizer workers'
peak (``RUSAGE_CHILDREN``); ``peak_rss_mib`` = main process peak + workers' peak, an upper bound
of the run's peak (they overlap in time), and what ``rss_ratio_4x`` compares.

Run (from the repo root; ~7 min on 2 AMD EPYC cores)::

    .venv/bin/python bench/corpus_memory.py [--scales 1 4] [--steps 200] \
        [--out bench/results/corpus_memory.json]

Last line: ``rss_ratio_4x=<peak RSS of 4x / peak RSS of 1x>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine as bench_machine  # noqa: E402
from tasks.stage import StageContext  # noqa: E402

NEWS = ROOT.parent / "shared" / "data" / "news_corpus" / "news_corpus.parquet"


def _mib(kb: int) -> float:
    return kb / 1024.0


def child(corpus: str, home: str, steps: int) -> None:
    """One scale, in its own process: the stages, timed, with peak RSS after each."""
    from dataclasses import asdict

    from elmo_core.pretrain_config import PretrainConfig
    from elmo_core.vocab_config import VocabConfig
    from flows.params import PROFILES, BiLMParams
    from tasks.corpus import CorpusConfig, read_pretrain_corpus
    from tasks.ids import encode_ids
    from tasks.pretrain import pretrain
    from tasks.vocab import build_vocab

    prof = PROFILES["news"]
    out: dict[str, dict[str, float]] = {}

    def mark(stage: str, t0: float) -> None:
        out[stage] = {
            "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1),
            "workers_peak_rss_mib": round(
                _mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), 1
            ),
        }

    t = time.perf_counter()
    c = read_pretrain_corpus.fn(corpus, CorpusConfig(**prof.get("corpus", {})), StageContext(home))
    mark("corpus", t)
    stats = json.loads((Path(c) / "metrics.json").read_text())
    t = time.perf_counter()
    v = build_vocab.fn(None, [c], VocabConfig(**prof["vocab"]), StageContext(home))
    mark("vocab", t)
    t = time.perf_counter()
    ids = encode_ids.fn(None, [c], v, 13, StageContext(home))
    mark("ids", t)
    t = time.perf_counter()
    train = PretrainConfig(
        **{**prof["pretrain"], "max_steps": steps, "checkpoint_every": 0, "precision": "fp32"}
    )
    pretrain.fn(ids, v, asdict(BiLMParams(**prof["bilm"])), train, StageContext(home, "cpu"))
    mark(f"pretrain_{steps}_steps", t)
    print(
        json.dumps(
            {
                "stages": out,
                "corpus_words": stats["corpus_words"],
                "corpus_tokens": stats["corpus_tokens"],
                "words_per_s": round(stats["words_per_s"]),
            }
        )
    )


def make_scaled(tmp: Path, scale: int) -> str:
    """``scale`` copies of the corpus' rows as shards (the 1x corpus is used as it is)."""
    if scale == 1:
        return str(NEWS)
    d = tmp / f"news_x{scale}"
    d.mkdir()
    for i in range(scale):
        shutil.copyfile(NEWS, d / f"train-{i:05d}-of-{scale:05d}.parquet")
    return str(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "corpus_memory.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.steps)
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="corpus_memory_") as tmp:
        for scale in args.scales:
            corpus = make_scaled(Path(tmp), scale)
            home = Path(tmp) / f"home_x{scale}"
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--steps",
                    str(args.steps),
                    "--child",
                    corpus,
                    str(home),
                ],
                stdout=subprocess.PIPE,
                cwd=ROOT,
                env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"},
            )
            stdout = proc.stdout.read() if proc.stdout else b""
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise SystemExit(f"scale {scale}: child failed with {proc.returncode}")
            res = json.loads(stdout.decode().strip().splitlines()[-1])
            # wait4: the largest single process of the child's tree (its main process here);
            # the workers run beside it, so main + workers bounds the tree's peak from above
            res["largest_process_peak_rss_mib"] = round(_mib(usage.ru_maxrss), 1)
            main_peak = max(s["peak_rss_mib"] for s in res["stages"].values())
            workers_peak = max(s["workers_peak_rss_mib"] for s in res["stages"].values())
            res["peak_rss_mib"] = round(main_peak + workers_peak, 1)
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            results[f"{scale}x"] = res
            print(f"{scale}x: {json.dumps(res)}", flush=True)
            shutil.rmtree(home, ignore_errors=True)
            if scale != 1:
                shutil.rmtree(corpus, ignore_errors=True)
    report = {
        "command": "python bench/corpus_memory.py " + " ".join(sys.argv[1:]),
        "machine": bench_machine(),
        "results": results,
    }
    if "1x" in results and "4x" in results:
        report["rss_ratio_4x"] = round(
            results["4x"]["peak_rss_mib"] / results["1x"]["peak_rss_mib"], 3
        )
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if "rss_ratio_4x" in report:
        print(f"rss_ratio_4x={report['rss_ratio_4x']}")


if __name__ == "__main__":
    main()
