"""Layer extraction at ELMo's published shapes, as the pipeline runs it, beside this machine's
matmul roofline measured in the same run.

Shapes (random weights of those shapes; speed does not depend on the values): ``small``
(2x1024_128, 2048 CNN filters, 1 highway), ``medium`` (2x2048_256, 2048 filters, 1 highway),
``original`` (2x4096_512, 2048 filters, 2 highways); ELMo's character ids, cell and projection
clipping at 3, skip connections, sentence marks. The documents are real: the first ``--docs``
documents of the AG News sample's test split, tokenised by the pipeline; extraction is
``elmo_core.extraction.extract_layers`` (documents batched by length, the char CNN run once per
distinct word of a batch) in float32 and in bf16 autocast, at the pipeline's batch of 64
documents (``--batch-sizes`` measures others). Reports tokens/s, achieved GFLOP/s
(from the forward pass's matmul FLOPs per token) against the matmul roofline, and the projected
time to embed all of AG News (127,600 documents at the sample's mean length). Last line:
``elmo_original_tokens_per_s=<best of fp32 / bf16>``.

    .venv/bin/python bench/elmo_speed.py [--docs 300] [--shapes small medium original] [--out bench/results/elmo_speed.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import machine, write_report  # noqa: E402
from elmo_core.bilm import BiLM  # noqa: E402
from elmo_core.bilm_config import BiLMConfig  # noqa: E402
from elmo_core.device import bf16_native, pick_device  # noqa: E402
from elmo_core.extraction import doc_lengths, extract_layers  # noqa: E402
from elmo_core.vocab import SPECIALS, Vocab  # noqa: E402
from storage.readers import read_ag_csv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AG_TEST = ROOT.parent / "shared" / "data" / "ag_news_sample" / "test.csv"
AG_DOCS = 127_600  # AG News: 120,000 train + 7,600 test documents
FILTERS = (32, 32, 64, 128, 256, 512, 1024)  # ELMo's widths 1..7
SHAPES = {  # name: (LSTM cells H, projection P, highway layers)
    "small": (1024, 128, 1),
    "medium": (2048, 256, 1),
    "original": (4096, 512, 2),
}


def config(name: str) -> BiLMConfig:
    h, p, highway = SHAPES[name]
    return BiLMConfig(
        vocab_size=len(SPECIALS), embedding_dim=p, hidden_dim=h, projection_dim=p,
        num_layers=2, dropout=0.0, num_samples=0, cell_clip=3.0, proj_clip=3.0,
        token_encoder="char", char_dim=16, char_filters=FILTERS, char_highway=highway,
        max_chars=50, char_ids="elmo", residual=True, sentence_marks=True, lm_head=False,
    )  # fmt: skip


def flops_per_token(c: BiLMConfig, distinct_share: float, chars: float) -> float:
    """Matmul FLOPs of the forward pass per token: both 2-layer directions (gates over
    [input; previous output], projection), and the char encoder once per distinct word of a
    batch (``distinct_share`` of the tokens; ``chars`` positions read per word)."""
    h, p, f = c.hidden_dim, c.projection_dim, sum(c.char_filters)
    lstm = 2 * c.num_layers * (2 * (p + p) * 4 * h + 2 * h * p)
    cnn = 2 * chars * f * c.char_dim * len(c.char_filters)  # the masked width-K convolution
    word = cnn + c.char_highway * 2 * f * 2 * f + 2 * f * p
    return lstm + distinct_share * word


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - t0) / 1e9


def measure(
    model: BiLM, docs: list[list[int]], extra: list[str], precision: str, batch_size: int
) -> float:
    offsets = np.concatenate([[0], np.cumsum(doc_lengths(docs, 10_000))])
    out = np.zeros((int(offsets[-1]), model.num_output_layers, model.output_dim), np.float16)
    warm = max(1, len(docs) // 10)
    extract_layers(
        model, docs[:warm], out, offsets[: warm + 1], extra_words=extra, precision=precision
    )
    t0 = time.perf_counter()
    extract_layers(model, docs, out, offsets, extra_words=extra, precision=precision)
    return float(offsets[-1]) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "elmo_speed.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = pick_device("cpu")
    rows = read_ag_csv(AG_TEST, "test").rows[: args.docs]
    vocab = Vocab(SPECIALS, (1,) * len(SPECIALS))
    docs, extra = vocab.encode_open([r["tokens"] for r in rows])
    n_tokens = sum(len(d) for d in docs)
    mean_len = n_tokens / len(docs)
    # distinct words per token as extraction batches them (64 documents of similar length)
    order = np.argsort([len(d) for d in docs], kind="stable")
    distinct = sum(
        len({t for i in order[j : j + 64] for t in docs[i]}) for j in range(0, len(docs), 64)
    )
    word_chars = float(np.mean([min(len(w.encode()), 48) + 2 for w in extra]))
    precisions = ["fp32", "bf16"] if bf16_native(device) else ["fp32"]
    roof = {p: matmul_gflops(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    results: list[dict[str, Any]] = []
    for name in args.shapes:
        c = config(name)
        model = BiLM(c)
        model.set_words(SPECIALS)
        model.eval()
        fpt = flops_per_token(c, distinct / n_tokens, min(word_chars + 7, 50))
        for p, bs in [(p, bs) for p in precisions for bs in args.batch_sizes]:
            tps = measure(model, docs, extra, p, bs)
            results.append(
                {
                    "shape": name,
                    "precision": p,
                    "batch_size": bs,
                    "tokens_per_s": round(tps, 1),
                    "mflop_per_token": round(fpt / 1e6, 1),
                    "gflop_per_s": round(tps * fpt / 1e9, 1),
                    "share_of_roofline": round(tps * fpt / 1e9 / roof[p], 3),
                    "ag_news_hours": round(AG_DOCS * mean_len / tps / 3600, 2),
                }
            )
            print(results[-1], flush=True)
        del model
    best = (
        max(r["tokens_per_s"] for r in results if r["shape"] == "original")
        if "original" in args.shapes
        else 0.0
    )
    report = {
        "command": " ".join(["bench/elmo_speed.py", *sys.argv[1:]]),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "documents": len(docs),
        "tokens": n_tokens,
        "mean_doc_tokens": round(mean_len, 1),
        "distinct_words_per_token": round(distinct / n_tokens, 3),
        "matmul_2048_gflop_per_s": {p: round(v, 1) for p, v in roof.items()},
        "goal_original_tokens_per_s": 3000,
        "results": results,
    }
    write_report(args.out, report, f"elmo_original_tokens_per_s={best:.0f}", hide="machine")


if __name__ == "__main__":
    main()
