"""Data-parallel biLM pretraining on this machine, and a projection for ELMo's own scale.

Measures tokens/s of the pipeline's biLM training at the ``news`` profile's shapes (E = H = 192,
512 negatives, global batch 128 x 20) on real Reuters windows, in two layouts of the same cores:
one process with all threads, and torchrun with one rank per core (gloo, 1 thread each). Then
projects one epoch over the One Billion Word Benchmark (800M tokens) for the ``elmo-original``
profile on 8 GPUs from FLOPs (no GPU is measured here; the arithmetic is in the report).

Run (from the repo root; ~4 min on 2 AMD EPYC cores)::

    .venv/bin/python bench/ddp_throughput.py [--steps 80] [--out bench/results/ddp_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.stage import StageContext  # noqa: E402

REUTERS = ROOT.parent / "shared" / "data" / "reuters21578" / "reuters21578.csv"


def lstm_flops_per_token(d_in: int, cells: int, proj: int) -> float:
    """Forward FLOPs of one LSTM layer for one token: 4 gates over [input; recurrent state]
    plus the projection (2 FLOPs per multiply-add)."""
    rec = proj or cells
    return 2 * (4 * cells * (d_in + rec) + (cells * proj if proj else 0))


def elmo_original_projection(gpus: int = 8, tokens: float = 800e6) -> dict[str, object]:
    from flows.params import PROFILES

    b = PROFILES["elmo-original"]["bilm"]
    e, h, p, s = b["embedding_dim"], b["hidden_dim"], b["projection_dim"], b["num_samples"]
    d = p or h
    layer = lstm_flops_per_token(d, h, p)
    forward = 2 * 2 * layer  # 2 layers x 2 directions
    softmax = 2 * 2 * (s + 1) * d  # both directions' predictions against S + 1 rows
    embed = 0 if e == d else 2 * e * d
    per_token = 3 * (forward + softmax + embed)  # forward + backward (~2x forward)
    total = per_token * tokens
    peak = 989e12  # H100/H200 SXM dense bf16 tensor-core peak, FLOP/s
    rows = {}
    for mfu in (0.1, 0.3):
        sec = total / (gpus * peak * mfu)
        rows[f"mfu_{mfu}"] = {"seconds": round(sec), "minutes": round(sec / 60, 1)}
    return {
        "profile": "elmo-original",
        "shapes": {"E": e, "cells": h, "projection": p, "negatives": s, "layers": 2},
        "flops_per_token_forward": {
            "lstm_layer_direction": layer,
            "4_lstms": forward,
            "sampled_softmax_2_directions": softmax,
        },
        "flops_per_token_train": per_token,
        "tokens": tokens,
        "total_flops": total,
        "gpus": gpus,
        "assumed_peak_flops_per_gpu": peak,
        "epoch_time": rows,
        "arithmetic": (
            f"LSTM layer = 2*(4*{h}*({d}+{p or h}) + {h}*{p}) = {layer:.3g} FLOP/token; x4 = "
            f"{forward:.3g}; sampled softmax 2*2*({s}+1)*{d} = {softmax:.3g}; train = 3x forward "
            f"= {per_token:.3g} FLOP/token; x {tokens:.3g} tokens = {total:.3g} FLOP; / ({gpus} x "
            f"{peak:.3g} FLOP/s x MFU)"
        ),
        "calibration": (
            "ELMo's authors trained 10 epochs of this model in ~2 weeks on 3 GTX 1080 GPUs "
            "(~8.9 TFLOP/s fp32 each): 10 x total / (3 x 8.9e12 x 14 days) ~ 12 % of peak"
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ddp_throughput.json"))
    args = ap.parse_args()

    import torch

    from bench.machine import machine
    from elmo_core.callbacks import no_log
    from elmo_core.pretrain_config import PretrainConfig
    from elmo_core.vocab_config import VocabConfig
    from flows.params import PROFILES, BiLMParams
    from storage.paths import read_json, write_json
    from tasks.bilm_training import train_bilm
    from tasks.corpus import CorpusConfig, read_pretrain_corpus
    from tasks.ids import encode_ids
    from tasks.pretrain import torchrun_command
    from tasks.vocab import build_vocab

    cores = os.cpu_count() or 1
    prof = PROFILES["news"]
    bilm = asdict(BiLMParams(**prof["bilm"]))
    train = PretrainConfig(
        **{
            **prof["pretrain"],
            "max_steps": args.steps,
            "checkpoint_every": 0,
            "precision": "fp32",
            "val_tokens": 2000,
        }
    )
    report: dict[str, object] = {
        "command": "python bench/ddp_throughput.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "shapes": {**bilm, "batch": train.batch_size, "window": train.window},
        "steps": args.steps,
    }
    with tempfile.TemporaryDirectory(prefix="ddp_bench_") as tmp:
        home = str(Path(tmp) / "home")
        c = read_pretrain_corpus.fn(str(REUTERS), CorpusConfig(), StageContext(home))
        v = build_vocab.fn(None, [c], VocabConfig(**prof["vocab"]), StageContext(home))
        ids = encode_ids.fn(None, [c], v, 13, StageContext(home))

        torch.set_num_threads(cores)
        _, _, res = train_bilm(ids, v, Path(tmp) / "one", bilm, train, torch.device("cpu"), no_log)
        one = res.tokens / res.seconds
        report[f"1_process_x_{cores}_threads_tokens_per_s"] = round(one)
        print(f"1 process x {cores} threads: {one:,.0f} tokens/s", flush=True)

        out = Path(tmp) / "ranks"
        out.mkdir()
        spec = out / "spec.json"
        world = {**asdict(replace(train, world_size=cores))}
        write_json(spec, {"ids": ids, "vocab": v, "out": str(out), "bilm": bilm, "train": world,
                          "device": "cpu", "tracking": None})  # fmt: skip
        env = {**os.environ, "ELMO_NEWS_THREADS": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        subprocess.run(torchrun_command(spec, cores, None), env=env, cwd=ROOT, check=True)
        r = read_json(out / "result.json")
        ranks = r["tokens"] / r["seconds"]
        report[f"{cores}_ranks_x_1_thread_tokens_per_s"] = round(ranks)
        report["ranks_vs_threads"] = round(ranks / one, 3)
        print(f"{cores} ranks x 1 thread: {ranks:,.0f} tokens/s ({ranks / one:.2f}x)", flush=True)
    report["projection_1b_word_epoch_8_gpus"] = elmo_original_projection()
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    p = report["projection_1b_word_epoch_8_gpus"]["epoch_time"]
    print(
        f"projected 1B Word epoch, elmo-original, 8 GPUs: {p['mfu_0.3']['minutes']} min at 30 % "
        f"MFU, {p['mfu_0.1']['minutes']} min at 10 %"
    )


if __name__ == "__main__":
    main()
