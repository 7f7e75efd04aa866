"""What the layer store costs on disk and in time, per layout: every biLM layer of every token
(the store's first layout) against the contextual layers per token + layer 0 once per distinct
token (``static_layer``; the features stage's layout now). Layer 0 is ``[x; x]``, a function of
the token alone, so storing it per occurrence repeats the same row for every "the".

For one split of an ingested dataset and a trained biLM, each layout is written as the features
stage writes it (pwrite through ``RowFile``), then read back as a classifier epoch reads it
(``LayerStore.batch`` over length-bucketed batches of 64 documents; the page cache is warm, as
right after extraction). The report has the largest difference between the two layouts' batches
(0 where the biLM has no E -> D projection: layer 0 is then a table row in both).

    .venv/bin/python bench/layer_store.py --bilm HOME/bilm/<key> --dataset HOME/ingest/<key> \\
        [--split train] [--max-docs 20000] [--scratch /tmp/layer-store]

Last line: ``disk_ratio_static_vs_full=<bytes of the new layout / bytes of the old>``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.machine import machine, write_report  # noqa: E402
from elmo_core import extraction  # noqa: E402
from elmo_core.bilm_checkpoint import load_bilm  # noqa: E402
from storage.datasets import read_dataset  # noqa: E402
from storage.layers import LayerStore, RowFile
from tasks.common import set_threads  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "layer_store.json"


def _write(model, docs, extra, offsets, folder: Path, static: bool) -> tuple[LayerStore, float]:
    """One layout written to ``folder``; returns the store reading it and the seconds taken."""
    folder.mkdir(parents=True, exist_ok=True)
    n_layers = model.config.num_layers if static else model.num_output_layers
    t0 = time.perf_counter()
    arr = RowFile(folder / "layers.npy", (int(offsets[-1]), n_layers, model.output_dim))
    extraction.extract_layers(model, docs, arr, offsets, extra_words=extra, contextual_only=static)
    arr.close()
    table = rows = None
    if static:
        table, rows = extraction.static_layer(model, extraction.open_ids(docs, offsets), extra)
        np.save(folder / "static.npy", table)
        np.save(folder / "static_rows.npy", rows)
    seconds = time.perf_counter() - t0
    tokens = extraction.vocab_ids(docs, offsets, model.config.vocab_size)
    labels = np.zeros(len(docs), dtype=np.int64)
    store = LayerStore(RowFile(folder / "layers.npy"), offsets, labels, tokens, table, rows)
    return store, seconds


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bilm", required=True, help="a biLM stage folder (holds bilm.pt)")
    ap.add_argument("--dataset", required=True, help="an ingest stage folder (<split>.parquet)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--max-docs", type=int, default=20_000)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--scratch", default="/tmp/layer-store-bench")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.max_docs < 1:
        raise ValueError(f"--max-docs must be >= 1, got {args.max_docs}")
    set_threads()
    model, vocab = load_bilm(Path(args.bilm) / "bilm.pt")
    model.eval()
    df = read_dataset(Path(args.dataset) / f"{args.split}.parquet").head(args.max_docs)
    docs, extra = extraction.encode_for(model, vocab, df["tokens"].to_list())
    offsets = np.concatenate([[0], np.cumsum(extraction.doc_lengths(docs, args.max_len))]).astype(
        np.int64
    )
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "documents": len(docs),
        "tokens": int(offsets[-1]),
        "distinct_tokens": int(len(np.unique(extraction.open_ids(docs, offsets)))),
        "layers": model.num_output_layers,
        "layer_dim": model.output_dim,
        "layouts": {},
    }
    stores = {}
    for name, static in (("full", False), ("static", True)):
        store, seconds = _write(model, docs, extra, offsets, scratch / name, static)
        stores[name] = store
        report["layouts"][name] = {"disk_bytes": _bytes(scratch / name), "write_s": seconds}
    batches = list(stores["full"].batches(64))
    for name, store in stores.items():
        t0 = time.perf_counter()
        for idx in batches:
            store.batch(idx)
        report["layouts"][name]["epoch_read_s"] = time.perf_counter() - t0
    diff = 0.0  # the two layouts hold the same layers (bit for bit where E = D: no projection)
    for idx in batches:
        a, b = stores["full"].batch(idx)[0], stores["static"].batch(idx)[0]
        diff = max(diff, float((a - b).abs().max()))
    report["max_abs_difference"] = diff
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ratio = report["layouts"]["static"]["disk_bytes"] / report["layouts"]["full"]["disk_bytes"]
    report["disk_ratio_static_vs_full"] = ratio
    shutil.rmtree(scratch, ignore_errors=True)
    write_report(args.out, report, f"disk_ratio_static_vs_full={ratio:.3f}")


if __name__ == "__main__":
    main()
