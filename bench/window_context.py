"""How much context a windowed biLM read needs: layers of long documents read whole vs in
pieces of ``window`` tokens with ``context`` tokens of overlap on each side, for a trained biLM.

Whole-document reading is the reference (it is what the LSTMs compute over the full text); a
piece read starts its LSTM states from zero at the piece's start, so tokens near a cut see
less history. Reported per (window, context): the mean relative L2 deviation of the contextual
layers from the whole-document read, its 99th percentile, the share of tokens whose deviation
exceeds 5 %, and the extraction speed of each setting against whole reads.

    .venv/bin/python bench/window_context.py --bilm HOME/stages/bilm/<key> \\
        --docs /tmp/r8-home/r8/test.csv [--min-tokens 200] [--max-docs 300]

Last line: ``deviation_at_default=<mean relative deviation at window 256, context 32>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from bench.machine import machine  # noqa: E402
from elmo_core.bilm_checkpoint import load_bilm  # noqa: E402
from elmo_core.extraction import doc_lengths, extract_layers  # noqa: E402
from elmo_core.text import tokenize  # noqa: E402
from tasks.common import set_threads  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "window_context.json"


def _layers(model, docs, offsets, window: int, context: int) -> tuple[np.ndarray, float]:
    out = np.zeros((int(offsets[-1]), model.num_output_layers, model.output_dim), np.float16)
    t0 = time.perf_counter()
    extract_layers(
        model, docs, out, offsets, device=torch.device("cpu"), window=window, context=context
    )
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bilm", required=True, help="a biLM stage folder (holds bilm.pt)")
    ap.add_argument("--docs", required=True, help="CSV with title and body columns")
    ap.add_argument("--min-tokens", type=int, default=200)
    ap.add_argument("--max-docs", type=int, default=300)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[0, 8, 16, 32])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    set_threads()
    model, vocab = load_bilm(Path(args.bilm) / "bilm.pt")
    model.eval()
    df = pl.read_csv(args.docs, infer_schema=False)
    texts = (df["title"].fill_null("") + "\n" + df["body"].fill_null("")).to_list()
    docs = [vocab.encode(tokenize(t)) for t in texts]
    docs = [d for d in docs if len(d) >= args.min_tokens][: args.max_docs]
    offsets = np.concatenate([[0], np.cumsum(doc_lengths(docs, args.max_len))]).astype(np.int64)
    n_tok = int(offsets[-1])
    whole, whole_s = _layers(model, docs, offsets, 0, 0)
    ref = whole[:, 1:].astype(np.float32)  # (N_tok, L, 2H): the contextual layers
    ref_norm = np.linalg.norm(ref, axis=-1) + 1e-6  # (N_tok, L)
    rows = []
    for window in args.windows:
        for context in args.contexts:
            if window <= 2 * context:
                continue
            got, s = _layers(model, docs, offsets, window, context)
            dev = np.linalg.norm(got[:, 1:].astype(np.float32) - ref, axis=-1) / ref_norm
            row = {
                "window": window,
                "context": context,
                "mean_rel_deviation": float(dev.mean()),
                "p99_rel_deviation": float(np.quantile(dev, 0.99)),
                "share_over_5pct": float((dev > 0.05).mean()),
                "tokens_per_s": n_tok / s,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "docs": len(docs),
        "tokens": n_tok,
        "doc_tokens_mean": n_tok / max(len(docs), 1),
        "whole_documents_tokens_per_s": n_tok / whole_s,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    default = next((r for r in rows if (r["window"], r["context"]) == (256, 32)), None)
    print(f"deviation_at_default={default['mean_rel_deviation'] if default else float('nan'):.4f}")


if __name__ == "__main__":
    main()
