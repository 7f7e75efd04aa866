"""Stage: run the frozen biLM once over every split and store its layers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from prefect import task

from elmo_core.checkpoint import load_bilm
from elmo_core.training import LayerStore, doc_lengths, extract_layers, pick_device
from storage.datasets import read_dataset
from storage.paths import Home, build_stage, write_json
from tasks.common import STAGE_OPTS, Stage, cache_key, set_threads
from tasks.data import SPLITS, stage_id
from tasks.pretrain import BILM_CODE
from tasks.progress import stage_progress

FEATURES = Stage("features", [*BILM_CODE, "tasks.features"])


def _features_key(
    bilm_dir: str,
    dataset: str,
    home: str,
    max_len: int,
    device: str = "auto",
    tracking: dict[str, str] | None = None,
) -> str:
    return FEATURES.key(
        {"bilm": stage_id(bilm_dir), "dataset": stage_id(dataset)}, {"max_len": max_len}
    )


@task(name="extract-layers", cache_key_fn=cache_key(_features_key), **STAGE_OPTS)
def features(
    bilm_dir: str,
    dataset: str,
    home: str,
    max_len: int,
    device: str = "auto",
    tracking: dict[str, str] | None = None,
) -> str:
    """Run the frozen biLM once over every split; layers stored flat as float16 .npy files.
    (``tracking`` is accepted like every stage's; this stage has no MLflow run of its own.)"""
    out = Home(home).stage_dir("features", _features_key(bilm_dir, dataset, home, max_len))
    return build_stage(out, lambda d: _build(bilm_dir, dataset, d, max_len, device))


def _build(bilm_dir: str, dataset: str, out: Path, max_len: int, device: str) -> None:
    set_threads()
    model, vocab = load_bilm(Path(bilm_dir) / "bilm.pt")
    t0 = time.perf_counter()
    n_tokens = 0
    for split in SPLITS:
        df = read_dataset(Path(dataset) / f"{split}.parquet")
        docs = [vocab.encode(t) for t in df["tokens"].to_list()]
        offsets = np.concatenate([[0], np.cumsum(doc_lengths(docs, max_len))]).astype(np.int64)
        tmp = out / f".layers_{split}.npy.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(
            tmp,
            mode="w+",
            dtype=np.float16,
            shape=(int(offsets[-1]), model.num_output_layers, model.output_dim),
        )
        with stage_progress(f"layers {split}", unit="documents") as progress:
            extract_layers(model, docs, arr, offsets, device=pick_device(device), progress=progress)
        arr.flush()
        del arr
        tmp.replace(out / f"layers_{split}.npy")
        tokens = np.zeros(int(offsets[-1]), dtype=np.int32)  # (N_tok,) ids of the stored rows
        for i, d in enumerate(docs):
            ids = d[: offsets[i + 1] - offsets[i]] or [vocab.unk_id]
            tokens[offsets[i] : offsets[i] + len(ids)] = ids
        np.save(out / f"tokens_{split}.npy", tokens)
        np.save(out / f"offsets_{split}.npy", offsets)
        np.save(out / f"labels_{split}.npy", df["label"].to_numpy().astype(np.int64))
        n_tokens += int(offsets[-1])
    write_json(
        out / "metrics.json", {"feature_tokens": n_tokens, "wall_s": time.perf_counter() - t0}
    )


def layer_store(features_dir: str, split: str) -> LayerStore:
    d = Path(features_dir)
    return LayerStore(
        features=np.load(d / f"layers_{split}.npy", mmap_mode="r"),
        offsets=np.load(d / f"offsets_{split}.npy"),
        labels=np.load(d / f"labels_{split}.npy"),
        tokens=np.load(d / f"tokens_{split}.npy"),
    )
