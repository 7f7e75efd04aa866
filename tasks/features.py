"""Stage: run the frozen biLM once over every split and store its layers."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from elmo_core.bilm_checkpoint import load_bilm
from elmo_core.device import pick_device
from elmo_core.extraction import (
    doc_lengths,
    encode_for,
    extract_layers,
    open_ids,
    static_layer,
    vocab_ids,
)
from elmo_core.layers_config import LayersConfig
from storage.datasets import read_dataset
from storage.layers import LayerStore, RowFile
from storage.paths import SPLITS, read_json, write_json
from tasks.common import set_threads
from tasks.progress import stage_progress
from tasks.stage import StageContext, stage

FEATURES = stage("features", __name__, inputs=["bilm_dir", "dataset"], config=["config"])


@FEATURES.task(name="extract-layers")
def features(bilm_dir: str, dataset: str, config: LayersConfig, ctx: StageContext) -> str:
    """Run the frozen biLM once over every split, whole documents up to ``config.max_len``
    tokens, long ones in overlapping pieces (``config.window``, ``config.context``); the
    contextual layers stored flat
    as float16 .npy files, layer 0 (context-free) once per distinct token, and how many
    documents the cap cut, by how much, in metrics.json; the config in config.json (what
    the classifier checkpoint carries, so serving reads documents the same way). The stage
    has no MLflow run of its own: ``ctx.tracking`` goes unused."""
    return FEATURES.build(locals(), lambda d: _build(bilm_dir, dataset, d, config, ctx.device))


def _build(bilm_dir: str, dataset: str, out: Path, config: LayersConfig, device: str) -> None:
    max_len, window, context = config.max_len, config.window, config.context
    set_threads()
    dev = pick_device(device)
    model, vocab = load_bilm(Path(bilm_dir) / "bilm.pt")
    t0 = time.perf_counter()
    n_tokens = 0
    metrics: dict[str, float] = {}
    for split in SPLITS:
        df = read_dataset(Path(dataset) / f"{split}.parquet")
        # a char biLM reads unseen words by their spelling (ids >= V, ``extra``); a word
        # biLM reads them as <unk>
        docs, extra = encode_for(model, vocab, df["tokens"].to_list())
        full = np.array([len(d) for d in docs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(doc_lengths(docs, max_len))]).astype(np.int64)
        cut = np.maximum(full - max_len, 0)
        metrics.update(
            {
                f"docs_cut_{split}": int((cut > 0).sum()),
                f"tokens_cut_{split}": int(cut.sum()),
                f"tokens_cut_fraction_{split}": float(cut.sum() / max(int(full.sum()), 1)),
                f"doc_tokens_max_{split}": int(full.max(initial=0)),
                f"doc_tokens_mean_{split}": float(full.mean()) if len(full) else 0.0,
            }
        )
        tmp = out / f".layers_{split}.npy.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        # written with pwrite, not a memory map: resident memory stays one batch of layers.
        # Layers 1..L only: layer 0 is a function of the token, kept once per distinct token
        arr = RowFile(tmp, (int(offsets[-1]), model.config.num_layers, model.output_dim))
        with stage_progress(f"layers {split}", unit="documents") as progress:
            extract_layers(
                model,
                docs,
                arr,
                offsets,
                device=dev,
                progress=progress,
                window=window,
                context=context,
                extra_words=extra,
                contextual_only=True,
            )
        arr.close()
        tmp.replace(out / f"layers_{split}.npy")
        static, rows = static_layer(model, open_ids(docs, offsets), extra, dev)
        np.save(out / f"static_{split}.npy", static)
        np.save(out / f"static_rows_{split}.npy", rows)
        tokens = vocab_ids(docs, offsets, len(vocab))  # (N_tok,) ids of the stored rows
        np.save(out / f"tokens_{split}.npy", tokens)
        np.save(out / f"offsets_{split}.npy", offsets)
        np.save(out / f"labels_{split}.npy", df["label"].to_numpy().astype(np.int64))
        n_tokens += int(offsets[-1])
    metrics.update({"feature_tokens": n_tokens, "wall_s": time.perf_counter() - t0})
    write_json(out / "metrics.json", metrics)
    write_json(out / "config.json", asdict(config))


def layers_config(features_dir: str) -> LayersConfig:
    """How the features stage read the documents (its config)."""
    return LayersConfig(**read_json(Path(features_dir) / "config.json"))


def layer_store(features_dir: str, split: str) -> LayerStore:
    d = Path(features_dir)
    return LayerStore(
        features=RowFile(d / f"layers_{split}.npy"),  # read by row ranges: bounded memory
        offsets=np.load(d / f"offsets_{split}.npy"),
        labels=np.load(d / f"labels_{split}.npy"),
        tokens=np.load(d / f"tokens_{split}.npy"),
        static=np.load(d / f"static_{split}.npy"),
        static_rows=np.load(d / f"static_rows_{split}.npy"),
    )
