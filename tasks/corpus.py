"""Pretraining-text stages: corpus → vocabulary → token-id shards, in memory bounded by a batch.

- ``read-corpus`` streams a corpus spec (files, folders, globs; text, CSV, Parquet, compressed)
  in batches through tokenizer worker processes into Parquet shards of tokens, the token counts
  of its training documents and a seeded held-out slice (``CorpusConfig.holdout_fraction``).
- ``build-vocab`` merges counts (the train split's and every corpus's): never a token list.
- ``encode-ids`` turns every token shard into a memory-mapped int32 id stream
  ``<s> doc </s> <s> doc </s> ...`` (``ids-00000.npy``, ...) plus the validation ids
  (``val.npy``): what the biLM's training windows are read from."""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.corpus import iter_corpus, resolve_corpus, tokenize_shard
from storage.datasets import write_parquet
from storage.errors import DataError
from storage.hashing import sha256_file
from storage.paths import write_json
from tasks.common import logger
from tasks.stage import StageContext, stage

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


def workers() -> int:
    """Tokenizer processes: ``ELMO_NEWS_WORKERS`` or one per core."""
    return max(1, int(os.environ.get("ELMO_NEWS_WORKERS", os.cpu_count() or 1)))


def corpus_files(spec: str) -> list[Path]:
    return resolve_corpus(spec)


def corpus_hash(spec: str) -> str:
    """The content of a corpus spec's files (the same shards under another folder name are
    the same corpus)."""
    return ",".join(sha256_file(f) for f in resolve_corpus(spec))


CORPUS = stage("corpus", __name__, inputs={"spec": corpus_hash}, config=["config"])


@CORPUS.task(name="read-corpus")
def read_pretrain_corpus(spec: str, config: CorpusConfig, ctx: StageContext) -> str:
    """Unlabeled pretraining text → ``tokens-*.parquet`` shards + ``counts.parquet`` +
    ``heldout-*.parquet`` shards; streamed batch by batch through ``workers()`` tokenizer processes."""
    return CORPUS.build(locals(), lambda d: _build_corpus(spec, d, config))


def _build_corpus(spec: str, out: Path, config: CorpusConfig) -> None:
    files = resolve_corpus(spec)
    big = sum(f.stat().st_size for f in files) >= POOL_MIN_BYTES
    capped = 0 < config.max_docs < POOL_MIN_DOCS
    # spawning workers costs seconds: worth it only for real work
    n_workers = workers() if big and not capped else 1
    t0 = time.perf_counter()
    counts: Counter[str] = Counter()
    stats: dict[str, float] = {
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
