"""biLM training throughput on this machine, and the projected wall time of the `full` profile.

The batches are the pipeline's own pretraining windows: ``--data`` (default the AG News sample
beside the checkout) and ``--pretrain-corpus`` (default Reuters) go through the pipeline's ingest,
corpus and vocabulary stages (in a temporary home, with the `sample` profile's vocabulary
settings: V = 44,182) and the stream is cut into windows as pretraining does; the softmax's
proposal is that vocabulary's unigram. Real text repeats words, so a 128 x 20 batch holds ~1,100
distinct tokens; uniformly random ids (the old bench's batches) hold ~2,500, which overstates the
row-sparse work, so that case is measured too and reported beside, not as the ratio.

Measures tokens/s (a token = one position of a training window, seen by both directions) of:
  1. the full biLM training step, the pretraining loop's own ``bilm_step`` (embedding, both
     2-layer LSTM stacks, residual, dropout, sampled softmax, backward, gradient clip, row-sparse
     Adam + fused Adam),
  2. the plain LSTM stacks alone at the same shapes (forward + backward, no output layer),
  3. the same full step with a full softmax output layer instead of the sampled one,
plus the forward-only layer extraction and one classifier training step, and projects the `full`
profile on 120k AG News from these figures. Steps 1-3 run at the precision the pipeline picks on
this machine (``auto``: bf16 autocast where it beats float32, ``elmo_core.device.bf16_native``,
else fp32; the LSTM-only reference runs at the same precision); where that is bf16 the fp32 pair
is measured too. The ratio is measured in blocks and interleaved; the last line,
full_step_vs_lstm_only=<ratio>, is the lower of the two at the pipeline's precision. Like the
pipeline's flow, the script first tunes glibc's allocator (``flows.runtime.tune_allocator``);
``ELMO_NEWS_MALLOC_TUNING=0`` measures without.

    .venv/bin/python bench/bilm_throughput.py [--steps 20] [--precision auto] [--data ../shared/data/ag_news_sample] [--pretrain-corpus ../shared/data/reuters21578/reuters21578.csv] [--out bench/results/bilm_throughput.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import machine  # noqa: E402
from elmo_core.bilm import BiLM  # noqa: E402
from elmo_core.bilm_config import BiLMConfig  # noqa: E402
from elmo_core.classifier import ELMoClassifier  # noqa: E402
from elmo_core.classifier_config import MixConfig  # noqa: E402
from elmo_core.classifier_optim import (  # noqa: E402
    Optimizers,
    classifier_param_groups,
    mark_sparse_parameters,
)
from elmo_core.classifier_training import ema_decay, train_step  # noqa: E402
from elmo_core.device import (
    PRECISIONS,  # noqa: E402
    autocast,
    resolve_precision,
)
from elmo_core.ema import WeightAverage  # noqa: E402
from elmo_core.mix import build_mix  # noqa: E402
from elmo_core.pretraining import bilm_optimizers, bilm_step, dense_parameters
from elmo_core.windows import epoch_batches
from flows.params import PROFILES, RunParams  # noqa: E402
from flows.runtime import tune_allocator  # noqa: E402
from tasks.bilm_training import load_windows  # noqa: E402
from tasks.corpus import CorpusConfig, read_pretrain_corpus
from tasks.ids import encode_ids
from tasks.ingest import IngestConfig, fetch_data, ingest  # noqa: E402
from tasks.stage import StageContext  # noqa: E402
from tasks.vocab import build_vocab, load_vocab

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def pretraining_batches(
    data: str, corpus: str, batch: int, window: int, count: int, seed: int = 13
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``count`` batches (B, T) of the pipeline's pretraining windows of ``data`` + ``corpus``,
    in a seeded random order as an epoch visits them, and the vocabulary's unigram counts (V,)."""
    vocab_config = RunParams(profile="sample").resolve().vocab
    with tempfile.TemporaryDirectory() as home:
        dataset = ingest.fn(fetch_data.fn(data, home), IngestConfig(), StageContext(home))
        corpora = (
            [read_pretrain_corpus.fn(corpus, CorpusConfig(), StageContext(home))] if corpus else []
        )
        v_dir = build_vocab.fn(dataset, corpora, vocab_config, StageContext(home))
        vocab = load_vocab(v_dir)
        ids = encode_ids.fn(dataset, corpora, v_dir, seed, StageContext(home))
        windows, _ = load_windows(ids, window, window)  # the pipeline's memory-mapped windows
        order = epoch_batches(len(windows), batch, seed, 0)
        batches = [windows.get(next(order)) for _ in range(count)]  # (B, T) each
    return batches, torch.from_numpy(vocab.unigram())


def timed(fn, steps: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_pair(a, b, steps: int, warmup: int = 3) -> tuple[float, float]:
    """Median seconds per call of ``a`` and of ``b``, called alternately."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(steps):
        t = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data", default=str(SHARED / "ag_news_sample"))
    ap.add_argument("--pretrain-corpus", default=str(SHARED / "reuters21578" / "reuters21578.csv"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "bilm_throughput.json")
    )
    args = ap.parse_args()
    # as the pipeline's flow does (with ELMO_NEWS_MALLOC_TUNING=0 it does not)
    allocator_tuned = tune_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    precision = resolve_precision(args.precision, cpu)
    full = RunParams(profile="full").resolve()
    bp, tp, cp = full.bilm, full.pretrain, full.classifier
    b, t, h = tp.batch_size, tp.window, bp.hidden_dim
    batches, unigram = pretraining_batches(args.data, args.pretrain_corpus, b, t, count=64)
    vocab_size = len(unigram)
    real = itertools.cycle(batches)
    uniform = itertools.cycle([torch.randint(4, vocab_size, (b, t)) for _ in range(64)])

    bp_model = {k: v for k, v in vars(bp).items() if k != "num_samples"}

    def make(num_samples: int) -> tuple[BiLM, list[torch.optim.Optimizer]]:
        m = BiLM(BiLMConfig(vocab_size=vocab_size, num_samples=num_samples, **bp_model))
        m.softmax.set_proposal(unigram)
        return m.train(), bilm_optimizers(m, tp.lr)

    model, opts = make(bp.num_samples)
    dense = dense_parameters(model)
    gen = torch.Generator().manual_seed(0)

    def step(prec: str = precision, source: itertools.cycle = real) -> None:
        bilm_step(model, opts, next(source), gen, prec, dense, tp.clip_norm)  # the pipeline's step

    def step_uniform() -> None:
        step(precision, uniform)

    stacks = nn.ModuleList(nn.LSTM(h, h, batch_first=True) for _ in range(2 * bp.num_layers))
    x = torch.randn(b, t, h, requires_grad=True)

    def lstm_only(prec: str = precision) -> None:
        stacks.zero_grad(set_to_none=True)
        total = 0
        with autocast(cpu, prec):
            for d in range(2):  # forward stack, backward stack: independent, same shapes
                y = x
                for layer in stacks[d * bp.num_layers : (d + 1) * bp.num_layers]:
                    y, _ = layer(y)
                total = total + y.float().sum()
        total.backward()

    full_model, full_opts = make(0)
    full_dense = dense_parameters(full_model)

    def full_softmax_step() -> None:
        bilm_step(full_model, full_opts, next(real), gen, precision, full_dense, tp.clip_norm)

    doc = torch.randint(4, vocab_size, (64, 44))
    mask = torch.ones_like(doc, dtype=torch.bool)

    def extract() -> None:
        with torch.no_grad():
            model.eval()(doc, mask)
        model.train()

    n_layers, dim = bp.num_layers + 1, 2 * h
    clf = ELMoClassifier(
        cp, build_mix(MixConfig("wsum", n_layers, dim)), dim, 4, vocab_size=vocab_size
    ).train()
    mark_sparse_parameters(clf)
    cgroups = classifier_param_groups(clf, cp.lr, cp.embedding_lr_scale)
    cparams = [p for g in cgroups for p in g["params"]]
    copt = Optimizers(cgroups, cp.lr, cp.weight_decay)
    cema = WeightAverage(clf, ema_decay)
    layers = torch.randn(n_layers, cp.batch_size, 44, dim)
    cmask = torch.ones(cp.batch_size, 44, dtype=torch.bool)
    y = torch.randint(0, 4, (cp.batch_size,))
    ctok = torch.randint(4, vocab_size, (cp.batch_size, 44))
    clf_precision = resolve_precision(cp.precision, cpu)

    def clf_step() -> None:  # the classifier loop's own step, at the precision it picks
        train_step(clf, copt, cema, cparams, (layers, cmask, ctok, y), cpu, clf_precision)

    # the ratio two ways: in blocks (all full steps, then all LSTM-only steps: the LSTM-only loop
    # runs with warm caches, its best case) and interleaved (one call of each in turn: a slow spell
    # of a shared machine lands on both, and both see the caches a real step leaves). The
    # reported ratio is the lower of the two.
    s_full_blocks = timed(step, args.steps)
    s_lstm_blocks = timed(lstm_only, args.steps)
    s_full, s_lstm = timed_pair(step, lstm_only, args.steps)
    s_uniform, s_lstm_u = timed_pair(step_uniform, lstm_only, args.steps)
    fp32_pair = None
    if precision != "fp32":  # the same pair in float32, for comparison with fp32-only CPUs

        def step32() -> None:
            step("fp32")

        def lstm32() -> None:
            lstm_only("fp32")

        b32 = (timed(step32, args.steps), timed(lstm32, args.steps))
        i32 = timed_pair(step32, lstm32, args.steps)
        fp32_pair = {
            "tokens_per_s_interleaved": {
                "full_step": round(b * t / i32[0]),
                "lstm_only": round(b * t / i32[1]),
            },
            "tokens_per_s_blocks": {
                "full_step": round(b * t / b32[0]),
                "lstm_only": round(b * t / b32[1]),
            },
            "ratio_interleaved": i32[1] / i32[0],
            "ratio_blocks": b32[1] / b32[0],
        }
    s_fullsm = timed(full_softmax_step, max(3, args.steps // 4), warmup=1)
    s_extract = timed(extract, max(3, args.steps // 2))
    s_clf = timed(clf_step, max(3, args.steps // 2))
    tps = {
        "full_step": b * t / s_full,
        "lstm_only": b * t / s_lstm,
        "full_softmax_step": b * t / s_fullsm,
        "extract_forward_only": doc.numel() / s_extract,
        "classifier_step": cp.batch_size * 44 / s_clf,
    }
    # projection: 120k AG News rows, ~44 tokens + 2 boundary tokens each, 90 % train after the val split
    ag_tokens = 120_000 * 0.9 * 46
    pretrain_s = tp.epochs * ag_tokens / tps["full_step"]
    extract_s = (120_000 + 7_600) * 44 / tps["extract_forward_only"]
    clf_s = 3 * cp.max_steps * cp.batch_size * 44 / tps["classifier_step"]
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            **machine(),
            "threads": torch.get_num_threads(),
            "allocator_tuned": allocator_tuned,
        },
        "precision": precision,
        "classifier_precision": clf_precision,
        "shapes": {
            "B": b,
            "T": t,
            "E": bp.embedding_dim,
            "H": h,
            "V": vocab_size,
            "negatives": bp.num_samples,
        },
        "batches": {
            "data": args.data,
            "pretrain_corpus": args.pretrain_corpus,
            "distinct_tokens_per_batch": statistics.mean(len(torch.unique(x)) for x in batches),
        },
        "uniform_random_ids": {
            "full_step": round(b * t / s_uniform),
            "lstm_only": round(b * t / s_lstm_u),
            "ratio_interleaved": s_lstm_u / s_uniform,
        },
        "tokens_per_s": {k: round(v) for k, v in tps.items()},
        "full_step_vs_lstm_only": min(s_lstm / s_full, s_lstm_blocks / s_full_blocks),
        "ratio_interleaved": s_lstm / s_full,
        "ratio_blocks": s_lstm_blocks / s_full_blocks,
        "tokens_per_s_blocks": {
            "full_step": round(b * t / s_full_blocks),
            "lstm_only": round(b * t / s_lstm_blocks),
        },
        "full_step_vs_full_softmax": tps["full_step"] / tps["full_softmax_step"],
        "fp32": fp32_pair,
        "projection_full_profile_s": {
            "pretrain": round(pretrain_s),
            "extract_layers": round(extract_s),
            "classifiers_upper_bound": round(clf_s),
            "total": round(pretrain_s + extract_s + clf_s),
            "assumes": f"120k AG rows x 46 tokens, {tp.epochs} biLM epochs, 3 strategies x {cp.max_steps} classifier steps (the cap), no extra corpus",
        },
        "profile_full": PROFILES["full"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for k, v in report["tokens_per_s"].items():
        print(f"{k:>22}: {v:>8} tokens/s")
    print(f"full step vs full softmax: {report['full_step_vs_full_softmax']:.2f}x faster")
    p = report["projection_full_profile_s"]
    print(
        f"projected full profile: pretrain {p['pretrain'] / 60:.0f} min, layers {p['extract_layers'] / 60:.0f} min, "
        f"classifiers <= {p['classifiers_upper_bound'] / 60:.0f} min, total {p['total'] / 60:.0f} min"
    )
    if fp32_pair is not None:
        print(
            f"fp32: full step {fp32_pair['tokens_per_s_interleaved']['full_step']} tokens/s, "
            f"ratio interleaved {fp32_pair['ratio_interleaved']:.3f}, "
            f"in blocks {fp32_pair['ratio_blocks']:.3f}"
        )
    print(
        f"uniformly random ids instead of text: full step {round(b * t / s_uniform)} tokens/s, "
        f"ratio {s_lstm_u / s_uniform:.3f}"
    )
    print(
        f"{precision}: ratio interleaved {report['ratio_interleaved']:.3f}, "
        f"in blocks {report['ratio_blocks']:.3f}"
    )
    print(f"full_step_vs_lstm_only={report['full_step_vs_lstm_only']:.3f}")


if __name__ == "__main__":
    main()
