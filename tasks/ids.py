"""Stage ``encode-ids``: every token shard as a memory-mapped int32 id stream
``<s> doc </s> <s> doc </s> ...`` (``ids-00000.npy``, ...) plus the validation ids (``val.npy``):
what the biLM's training windows are read from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from elmo_core.checkpoint import atomic_file
from storage.datasets import read_dataset
from storage.errors import DataError
from storage.paths import write_json
from tasks.corpus import heldout_shards, token_shards
from tasks.stage import StageContext, stage
from tasks.vocab import load_vocab

IDS = stage("ids", __name__, inputs=["dataset", "corpora", "vocab"], config=["seed"])


MAX_VAL_TOKENS = 2_000_000  # held-out ids kept for validation (a window's worth of them is used)


def shuffled(tokens: pl.Series, seed: int) -> pl.Series:
    """The documents of one shard in a seeded order (windows are shuffled again every epoch;
    this decides which documents share a window)."""
    return tokens.gather(np.random.default_rng(seed).permutation(len(tokens)))


def encode_docs(tokens: pl.Series, index: pl.DataFrame) -> np.ndarray:
    """A Series of token lists → the id stream ``<s> doc </s> ...`` (int32), by a join against
    the vocabulary (``index``: token, id) instead of a Python loop over tokens."""
    lens = tokens.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = (
        pl.DataFrame({"token": tokens.explode()})
        .drop_nulls()
        .join(index, on="token", how="left", maintain_order="left")["id"]
        .fill_null(1)  # <unk>
        .to_numpy()
        .astype(np.int32)
    )
    starts = np.concatenate([[0], np.cumsum(lens + 2)[:-1]]).astype(np.int64)  # each doc's <s>
    out = np.empty(int(lens.sum() + 2 * len(lens)), dtype=np.int32)
    words = np.ones(len(out), dtype=bool)
    words[starts] = False
    words[starts + lens + 1] = False
    out[words] = flat
    out[starts] = 2  # <s>
    out[starts + lens + 1] = 3  # </s>
    return out


@IDS.task(name="encode-ids")
def encode_ids(
    dataset: str | None, corpora: list[str], vocab: str, seed: int, ctx: StageContext
) -> str:
    """Token shards → memory-mapped int32 id shards for pretraining (each shard's documents
    in a ``seed``-ed order); ``val.npy`` from the dataset's val split (in-run biLM) or the
    corpora's held-out documents (standalone)."""
    return IDS.build(locals(), lambda d: _build_ids(dataset, corpora, vocab, d, seed))


def _build_ids(
    dataset: str | None, corpora: list[str], vocab_dir: str, out: Path, seed: int
) -> None:
    v = load_vocab(vocab_dir)
    index = pl.DataFrame({"token": list(v.tokens), "id": np.arange(len(v), dtype=np.int32)})
    sources: list[tuple[Path, str]] = []
    if dataset:
        sources.append((Path(dataset) / "train.parquet", "tokens"))
    for c in corpora:
        sources += [(p, "tokens") for p in token_shards(c)]
    n_tok = 0
    for i, (path, col) in enumerate(sources):
        ids = encode_docs(shuffled(pl.read_parquet(path, columns=[col])[col], seed), index)
        _save_npy(out / f"ids-{i:05d}.npy", ids)
        n_tok += len(ids)
    if dataset:
        val = read_dataset(Path(dataset) / "val.parquet")["tokens"]
    else:  # held-out shards until MAX_VAL_TOKENS: bounded however large the corpora
        parts, n_val = [], 0
        for p in [p for c in corpora for p in heldout_shards(c)]:
            if n_val >= MAX_VAL_TOKENS:
                break
            parts.append(pl.read_parquet(p)["tokens"])
            n_val += int(parts[-1].list.len().sum())
        val = pl.concat(parts) if parts else pl.Series("tokens", [], pl.List(pl.String))
    if not len(val) or n_tok == 0:
        raise DataError(
            f"no {'validation' if n_tok else 'training'} text for the biLM: "
            "set corpus.holdout_fraction > 0 for a standalone corpus"
        )
    val_ids = encode_docs(shuffled(val, seed), index)
    _save_npy(out / "val.npy", val_ids)
    write_json(
        out / "metrics.json",
        {"train_tokens": n_tok, "val_tokens": len(val_ids), "shards": len(sources)},
    )


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.save(f, arr)


def id_shards(ids_dir: str) -> list[Path]:
    return sorted(Path(ids_dir).glob("ids-*.npy"))
