"""Pretraining-text stages: corpus → vocabulary → token-id shards, in memory bounded by a batch.

- ``read-corpus`` streams a corpus spec (files, folders, globs; text, CSV, Parquet, compressed)
  in batches through tokenizer worker processes into Parquet shards of tokens, the token counts
  of its training documents and a seeded held-out slice (``CorpusConfig.holdout_fraction``).
- ``build-vocab`` merges counts (the train split's and every corpus's): never a token list.
- ``encode-ids`` turns every token shard into a memory-mapped int32 id stream
  ``<s> doc </s> <s> doc </s> ...`` (``ids-00000.npy``, ...) plus the validation ids
  (``val.npy``): what the biLM's training windows are read from.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from prefect import task

from elmo_core.config import VocabConfig
from elmo_core.vocab import SPECIALS, Vocab
from storage.corpus import iter_corpus, resolve_corpus, tokenize_shard
from storage.datasets import DataError, read_dataset, write_parquet
from storage.hashing import sha256_file
from storage.paths import Home, build_stage, write_json
from tasks.common import STAGE_OPTS, Stage, cache_key, logger
from tasks.data import stage_id

POOL_MIN_BYTES = 16 << 20  # corpora smaller than this are tokenised in the task's own process
POOL_MIN_DOCS = 20_000  # so is a corpus capped below this many documents (corpus.max_docs)


@dataclass(frozen=True)
class CorpusConfig:
    max_docs: int = 0  # keep the first N documents (0 = all)
    text_columns: tuple[str, ...] = ()  # CSV/Parquet text columns (empty = auto-detect)
    # share of documents held out (a seeded hash of the document index) for the standalone
    # biLM's validation perplexity: never counted into the vocabulary, never trained on
    holdout_fraction: float = 0.002
    seed: int = 13  # which documents the held-out hash picks

    def __post_init__(self) -> None:
        if self.max_docs < 0:
            raise ValueError(f"max_docs must be >= 0, got {self.max_docs}")
        if not 0.0 <= self.holdout_fraction < 0.5:
            raise ValueError(f"holdout_fraction must be in [0, 0.5), got {self.holdout_fraction}")


CORPUS = Stage("corpus", ["elmo_core.text", "storage.corpus", "tasks.corpus"])
VOCAB = Stage("vocab", ["elmo_core.vocab", "elmo_core.config", "tasks.corpus"])
IDS = Stage("ids", ["elmo_core.vocab", "tasks.corpus"])


def workers() -> int:
    """Tokenizer processes: ``ELMO_NEWS_WORKERS`` or one per core."""
    return max(1, int(os.environ.get("ELMO_NEWS_WORKERS", os.cpu_count() or 1)))


def corpus_files(spec: str) -> list[Path]:
    return resolve_corpus(spec)


def _corpus_key(spec: str, home: str, config: CorpusConfig) -> str:
    files = resolve_corpus(spec)
    # content only: the same shards under another folder name are the same corpus
    digest = ",".join(sha256_file(f) for f in files)
    return CORPUS.key({"files": digest}, asdict(config))


@task(name="read-corpus", cache_key_fn=cache_key(_corpus_key), **STAGE_OPTS)
def read_pretrain_corpus(spec: str, home: str, config: CorpusConfig) -> str:
    """Unlabeled pretraining text → ``tokens-*.parquet`` shards + ``counts.parquet`` +
    ``heldout-*.parquet`` shards; streamed batch by batch through ``workers()`` tokenizer processes."""
    out = Home(home).stage_dir("corpus", _corpus_key(spec, home, config))
    return build_stage(out, lambda d: _build_corpus(spec, d, config))


def _build_corpus(spec: str, out: Path, config: CorpusConfig) -> None:
    files = resolve_corpus(spec)
    big = sum(f.stat().st_size for f in files) >= POOL_MIN_BYTES
    capped = 0 < config.max_docs < POOL_MIN_DOCS
    # spawning workers costs seconds: worth it only for real work
    n_workers = workers() if big and not capped else 1
    t0 = time.perf_counter()
    counts: Counter[str] = Counter()
    stats = {
        "corpus_files": len(files),
        "corpus_words": 0,
        "corpus_docs": 0,
        "corpus_tokens": 0,
        "heldout_docs": 0,
        "heldout_tokens": 0,
    }
    n_read = 0

    def collect(res: tuple[dict[str, int], int, int, int, int, int]) -> None:
        c, *figures = res
        counts.update(c)
        for k, v in zip(list(stats)[1:], figures, strict=True):
            stats[k] += v

    def batches():
        nonlocal n_read
        for texts in iter_corpus(files, list(config.text_columns) or None):
            if config.max_docs:
                texts = texts[: config.max_docs - n_read]
            if texts:
                yield n_read, texts
                n_read += len(texts)
            if config.max_docs and n_read >= config.max_docs:
                return

    def args(i: int) -> tuple[str, str, float, int]:
        return (
            str(out / f"tokens-{i:05d}.parquet"),
            str(out / f"heldout-{i:05d}.parquet"),
            config.holdout_fraction,
            config.seed,
        )

    n_shards = 0
    if n_workers == 1:
        for start, texts in batches():
            collect(tokenize_shard(texts, start, *args(n_shards)))
            n_shards += 1
    else:
        # bounded: at most two batches per worker in flight, results taken in order
        with ProcessPoolExecutor(n_workers, mp_context=get_context("spawn")) as pool:
            pending: list[Future] = []
            for start, texts in batches():
                pending.append(pool.submit(tokenize_shard, texts, start, *args(n_shards)))
                n_shards += 1
                while len(pending) >= 2 * n_workers:
                    collect(pending.pop(0).result())
            for f in pending:
                collect(f.result())
    if not stats["corpus_docs"]:
        raise DataError(f"{spec}: the corpus holds no documents with text")
    tokens, freq = zip(*sorted(counts.items(), key=lambda tc: (-tc[1], tc[0])), strict=True)
    write_parquet(
        pa.table({"token": list(tokens), "count": np.asarray(freq, dtype=np.int64)}),
        out / "counts.parquet",
    )
    wall = time.perf_counter() - t0
    stats.update(
        {
            "corpus_shards": n_shards,
            "workers": n_workers,
            "wall_s": wall,
            "words_per_s": stats["corpus_words"] / max(wall, 1e-9),
        }
    )
    write_json(out / "metrics.json", stats)
    write_json(
        out / "config.json", {**asdict(config), "spec": spec, "files": list(map(str, files))}
    )
    logger().info("corpus %s: %s", spec, stats)


def token_shards(corpus_dir: str) -> list[Path]:
    return sorted(Path(corpus_dir).glob("tokens-*.parquet"))


def heldout_shards(corpus_dir: str) -> list[Path]:
    return sorted(Path(corpus_dir).glob("heldout-*.parquet"))


MAX_VAL_TOKENS = 2_000_000  # held-out ids kept for validation (a window's worth of them is used)


# ------------------------------------------------------------------------------ vocabulary


def _vocab_key(dataset: str | None, corpora: list[str], home: str, config: VocabConfig) -> str:
    return VOCAB.key(
        {
            "dataset": stage_id(dataset) if dataset else "",
            "corpora": ",".join(map(stage_id, corpora)),
        },
        asdict(config),
    )


def _split_counts(dataset: str) -> tuple[Counter[str], int]:
    df = read_dataset(Path(dataset) / "train.parquet")
    tok = df.select(pl.col("tokens").explode()).drop_nulls()["tokens"].value_counts()
    return Counter(dict(zip(tok["tokens"].to_list(), tok["count"].to_list(), strict=True))), len(df)


@task(name="build-vocab", cache_key_fn=cache_key(_vocab_key), **STAGE_OPTS)
def build_vocab(dataset: str | None, corpora: list[str], home: str, config: VocabConfig) -> str:
    """Vocabulary of the pretraining text (train split, if any, + corpora; never test or
    held-out text) → vocab.parquet (id, token, count); merged from counts, never token lists."""
    out = Home(home).stage_dir("vocab", _vocab_key(dataset, corpora, home, config))
    return build_stage(out, lambda d: _build_vocab(dataset, corpora, d, config))


def _build_vocab(dataset: str | None, corpora: list[str], out: Path, config: VocabConfig) -> None:
    counts, n_docs = _split_counts(dataset) if dataset else (Counter(), 0)
    for c in corpora:
        df = pl.read_parquet(Path(c) / "counts.parquet")
        counts.update(dict(zip(df["token"].to_list(), df["count"].to_list(), strict=True)))
        n_docs += int(read_json_metric(c, "corpus_docs"))
    vocab = Vocab.from_counts(counts, n_docs, config)
    write_parquet(
        pa.table(
            {
                "id": np.arange(len(vocab), dtype=np.int32),
                "token": list(vocab.tokens),
                "count": np.asarray(vocab.counts, dtype=np.int64),
            }
        ),
        out / "vocab.parquet",
    )
    total = sum(vocab.counts[len(SPECIALS) :]) + vocab.counts[1]
    write_json(
        out / "metrics.json",
        {"vocab_size": len(vocab), "oov_rate": vocab.counts[1] / max(total, 1)},
    )
    write_json(out / "config.json", asdict(config))


def read_json_metric(stage_dir: str, name: str) -> float:
    from storage.paths import read_json

    return float(read_json(Path(stage_dir) / "metrics.json")[name])


def load_vocab(vocab_dir: str) -> Vocab:
    df = pl.read_parquet(Path(vocab_dir) / "vocab.parquet").sort("id")
    return Vocab(tuple(df["token"].to_list()), tuple(df["count"].to_list()))


# ------------------------------------------------------------------------------ id shards


def _ids_key(dataset: str | None, corpora: list[str], vocab: str, home: str, seed: int) -> str:
    inputs = {
        "dataset": stage_id(dataset) if dataset else "",
        "corpora": ",".join(map(stage_id, corpora)),
        "vocab": stage_id(vocab),
    }
    return IDS.key(inputs, {"seed": seed})


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


@task(name="encode-ids", cache_key_fn=cache_key(_ids_key), **STAGE_OPTS)
def encode_ids(dataset: str | None, corpora: list[str], vocab: str, home: str, seed: int) -> str:
    """Token shards → memory-mapped int32 id shards for pretraining (each shard's documents
    in a ``seed``-ed order); ``val.npy`` from the dataset's val split (in-run biLM) or the
    corpora's held-out documents (standalone)."""
    out = Home(home).stage_dir("ids", _ids_key(dataset, corpora, vocab, home, seed))
    return build_stage(out, lambda d: _build_ids(dataset, corpora, vocab, d, seed))


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
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def id_shards(ids_dir: str) -> list[Path]:
    return sorted(Path(ids_dir).glob("ids-*.npy"))
