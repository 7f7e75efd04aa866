"""The classifier's training step on a run's stored layers, beside its own LSTM and the
machine's matmul roofline, measured in one process.

Reads a finished run's stages (``--home``, default ``.elmo-news``: the home ``make run`` fills;
its newest run summary names the layers and the biLM) and times, on the run's own training
batches (length-bucketed, the profile's batch size), the loop's own ``train_step``:
  1. at the precision the pipeline picks here (``auto``: bf16 autocast where it is the faster),
  2. in float32, and at the pipeline's precision with the other ``classifier.sparse_embedding``,
  3. as the stage ran it before: a dense task-embedding gradient, dense Adam, clipping and
     weight average over the whole V x E table (not only the rows the train split uses),
     float32, batches read in the loop's thread,
then the classifier's BiLSTM alone at the same shapes (forward + backward of both directions),
the machine's 2048^2 matmul in float32 and bf16, both rates as a share of that roofline (counting
the BiLSTM's forward + backward FLOPs per token, the bulk of a step's arithmetic), a
``torch.profiler`` table of the step's most expensive operators (``--ops``), and (``--stage``)
one whole classifier fit as the stage runs it, with its wall time.

    .venv/bin/python bench/classifier_step.py [--home .elmo-news] [--steps 30] [--ops 12] [--stage] [--out bench/results/classifier_step.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.elmo_speed import matmul_gflops  # noqa: E402
from bench.machine import machine, write_report  # noqa: E402
from elmo_core.classifier_optim import (  # noqa: E402
    Optimizers,
    classifier_param_groups,
    mark_sparse_parameters,
)
from elmo_core.classifier_training import (  # noqa: E402
    ema_decay,
    prefetched,
    reader_has_core,
    train_classifier,
    train_step,
)
from elmo_core.device import autocast, cpu_has_bf16, resolve_precision  # noqa: E402
from elmo_core.ema import WeightAverage  # noqa: E402
from elmo_core.task_embedding import restrict_to_rows  # noqa: E402
from flows.params import RunParams  # noqa: E402
from flows.runtime import tune_allocator  # noqa: E402
from storage.paths import read_json  # noqa: E402
from tasks.classify import new_classifier  # noqa: E402
from tasks.features import layer_store  # noqa: E402


def latest_run(home: Path) -> dict:
    runs = sorted((home / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no run summary under {home}/runs: run `make run` first")
    return json.loads(runs[-1].read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=".elmo-news")
    ap.add_argument("--profile", default="sample")
    ap.add_argument("--strategy", default="wsum")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stage", action="store_true", help="also time one whole classifier fit")
    ap.add_argument("--ops", type=int, default=12, help="operators in the profile table (0: none)")
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "classifier_step.json")
    )
    args = ap.parse_args()
    allocator_tuned = tune_allocator()
    torch.set_num_threads(torch.get_num_threads())
    cpu = torch.device("cpu")
    run = latest_run(Path(args.home))
    features, bilm = run["features"], run["bilm"]
    config = RunParams(profile=args.profile).resolve().classifier
    precision = resolve_precision(config.precision, cpu)
    train = layer_store(features, "train")
    n_layers, dim = train.layer_shape
    classes = len(read_json(Path(run["dataset"]) / "labels.json"))
    order = list(train.batches(config.batch_size, torch.Generator().manual_seed(0)))
    warmup, steps = 3, args.steps
    batches = order[: warmup + steps]
    tokens = sum(int(train.batch(b)[1].sum()) for b in batches[warmup:])

    def time_step(
        prec: str, sparse: bool, legacy: bool = False, profiler: profile | None = None
    ) -> float:
        """tokens/s of the loop's step over the same batches, read as the loop reads them
        (``legacy``: in the loop's thread); ``profiler`` starts with the timed steps."""
        cfg = replace(config, sparse_embedding=sparse)
        torch.manual_seed(0)
        model, _ = new_classifier(bilm, args.strategy, cfg, n_layers, dim, classes)
        model.train()
        if not legacy:  # as the loop does: the task table trains as the rows train uses
            restrict_to_rows(model, train.tokens)
        mark_sparse_parameters(model)
        groups = classifier_param_groups(model, cfg.lr, cfg.embedding_lr_scale)
        params = [p for g in groups for p in g["params"]]
        opt = Optimizers(groups, cfg.lr, 0.0)
        ema = WeightAverage(model, ema_decay)
        source = prefetched(train, batches, 0, background=not legacy and reader_has_core(cpu))
        for i, batch in enumerate(source):
            if i == warmup:
                if profiler is not None:
                    profiler.start()
                t0 = time.perf_counter()
            train_step(model, opt, ema, params, batch, cpu, prec)
        seconds = time.perf_counter() - t0
        if profiler is not None:
            profiler.stop()
        return tokens / seconds

    # the BiLSTM alone at the same shapes: input D + E, H, both directions, forward + backward
    e = config.token_embedding_dim
    lstms = nn.ModuleList(nn.LSTM(dim + e, config.hidden_dim, batch_first=True) for _ in "fb")
    shapes = [tuple(train.batch(b)[1].shape) for b in batches]

    def time_lstm(prec: str) -> float:
        times = []
        for i, (b, t) in enumerate(shapes):
            x = torch.randn(b, t, dim + e, requires_grad=True)
            t0 = time.perf_counter()
            with autocast(cpu, prec):
                total = sum(lstm(x)[0].float().sum() for lstm in lstms)
            total.backward()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return tokens / sum(times)

    # bf16 is timed too wherever the CPU has it, picked or not: the report shows why ``auto``
    # chose as it did
    precisions = sorted(
        {precision, "fp32", *(["bf16"] if cpu_has_bf16() else [])}, key=lambda p: p != precision
    )
    step = {p: time_step(p, config.sparse_embedding) for p in precisions}
    other = time_step(precision, not config.sparse_embedding)
    lstm = {p: time_lstm(p) for p in precisions}
    legacy = time_step("fp32", sparse=False, legacy=True)
    roof = {p: matmul_gflops(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    # the BiLSTM's arithmetic per token: per layer and direction a forward of 2 * 4H * (D_in + H)
    # FLOPs (input and recurrent matmuls) and a backward of twice that (input and weight grads)
    h = config.hidden_dim
    sizes_in = [dim + e] + [2 * h] * (config.num_layers - 1)
    flop_per_token = sum(2 * 3 * 2 * 4 * h * (d + h) for d in sizes_in)
    ops: list[dict] = []
    if args.ops:
        prof = profile(activities=[ProfilerActivity.CPU])
        time_step(precision, config.sparse_embedding, profiler=prof)
        events = sorted(prof.key_averages(), key=lambda ev: -ev.self_cpu_time_total)
        total = sum(ev.self_cpu_time_total for ev in events)
        ops = [
            {
                "operator": ev.key,
                "calls_per_step": round(ev.count / steps, 1),
                "self_ms_per_step": round(ev.self_cpu_time_total / 1e3 / steps, 2),
                "share": round(ev.self_cpu_time_total / total, 4),
            }
            for ev in events[: args.ops]
        ]
    table = new_classifier(bilm, args.strategy, config, n_layers, dim, classes)[0].embedding
    vocab_size = table.num_embeddings if table is not None else 0
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {**machine(), "threads": torch.get_num_threads()},
        "allocator_tuned": allocator_tuned,
        "background_reader": reader_has_core(cpu),
        "precision": precision,
        "sparse_embedding": config.sparse_embedding,
        "shapes": {
            "B": config.batch_size,
            "T_mean": statistics.mean(t for _, t in shapes[warmup:]),
            "L": n_layers,
            "D": dim,
            "E": e,
            "H": config.hidden_dim,
            "V": vocab_size,
            "steps": steps,
        },
        "tokens_per_s": {
            **{f"step_{p}": round(v) for p, v in step.items()},
            **{f"lstm_only_{p}": round(v) for p, v in lstm.items()},
            f"step_{precision}_sparse_embedding_{not config.sparse_embedding}": round(other),
            "step_before_fp32_dense": round(legacy),
        },
        "step_vs_lstm_only": {p: step[p] / lstm[p] for p in precisions},
        "speedup_vs_before": step[precision] / legacy,
        "matmul_2048_gflop_per_s": {p: round(v, 1) for p, v in roof.items()},
        "bilstm_flop_per_token": flop_per_token,
        "share_of_matmul_roofline": {
            **{f"step_{p}": round(v * flop_per_token / 1e9 / roof[p], 3) for p, v in step.items()},
            **{
                f"lstm_only_{p}": round(v * flop_per_token / 1e9 / roof[p], 3)
                for p, v in lstm.items()
            },
        },
    }
    if ops:
        report[f"profile_{precision}_top_operators"] = ops
    if args.stage:
        val = layer_store(features, "val")
        torch.manual_seed(0)
        model, _ = new_classifier(bilm, args.strategy, config, n_layers, dim, classes)
        t0 = time.perf_counter()
        res = train_classifier(model, train, val, config, device=cpu)
        report["stage"] = {
            "strategy": args.strategy,
            "wall_s": round(time.perf_counter() - t0, 1),
            "epochs_run": res.epochs_run,
            "steps": res.steps,
            "stop_reason": res.stop_reason,
            "best_val_accuracy": res.best_val_accuracy,
            "docs": len(train),
        }
    write_report(
        args.out,
        report,
        f"classifier_step_speedup={report['speedup_vs_before']:.2f}",
        hide="machine",
    )


if __name__ == "__main__":
    main()
