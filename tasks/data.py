"""Data stages: fetch a source, ingest it into validated Parquet, read pretraining corpora, build
the vocabulary. Each returns the path of its stage folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from prefect import task
from sklearn.model_selection import train_test_split

from elmo_core.config import VocabConfig
from elmo_core.vocab import Vocab
from storage.datasets import (
    DataError,
    corpus_table,
    fetch_source,
    quarantine_table,
    read_corpus,
    read_dataset,
    read_source,
    rows_table,
    write_parquet,
)
from storage.hashing import sha256_dir, sha256_file
from storage.paths import (
    Home,
    clear_incomplete,
    is_complete,
    mark_complete,
    read_json,
    stage_lock,
    write_json,
)
from tasks.common import STAGE_OPTS, Stage, cache_key, logger

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class IngestConfig:
    val_fraction: float = 0.1  # share of train carved out (stratified) for validation
    seed: int = 42  # the validation split and the row limits
    limit_train: int = 0  # keep a stratified sample of this many train rows (0 = all)
    limit_test: int = 0  # same for test (smoke runs only; real runs evaluate on all of it)
    text_columns: tuple[str, ...] = ()  # user data: text columns (empty = AG News / 'text')
    label_column: str = ""  # user data: label column (empty = AG News / 'label')

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass(frozen=True)
class CorpusConfig:
    max_docs: int = 0  # keep the first N documents (0 = all)
    text_columns: tuple[str, ...] = ()  # CSV/Parquet text columns (empty = auto-detect)


INGEST = Stage("ingest", ["elmo_core.text", "storage.datasets", "tasks.data"])
CORPUS = Stage("corpus", ["elmo_core.text", "storage.datasets", "tasks.data"])
VOCAB = Stage("vocab", ["elmo_core.vocab", "elmo_core.config", "tasks.data"])


@task(name="fetch-data", retries=3, retry_delay_seconds=[2, 10, 30])
def fetch_data(data: str, home: str) -> str:
    """A local folder for ``data``: URLs are downloaded once (checksum-checked) into the home."""
    return str(fetch_source(data, Home(home).downloads))


def source_hash(source: str) -> str:
    p = Path(source)
    if not p.exists():
        raise DataError(f"{p}: data folder or file does not exist")
    return sha256_dir(p) if p.is_dir() else sha256_file(p)


def _ingest_key(source: str, home: str, config: IngestConfig) -> str:
    return INGEST.key({"source": source_hash(source)}, asdict(config))


def _stratified_limit(rows: list[dict], limit: int, seed: int) -> list[dict]:
    if not limit or limit >= len(rows):
        return rows
    labels = [r["label"] for r in rows]
    keep, _ = train_test_split(rows, train_size=limit, stratify=labels, random_state=seed)
    return sorted(keep, key=lambda r: r["id"])


@task(name="ingest", cache_key_fn=cache_key(_ingest_key), **STAGE_OPTS)
def ingest(source: str, home: str, config: IngestConfig) -> str:
    """Validate rows, quarantine bad ones, carve a stratified validation split, write Parquet."""
    out = Home(home).stage_dir("ingest", _ingest_key(source, home, config))
    with stage_lock(out):
        if is_complete(out):
            return str(out)
        clear_incomplete(out)
        splits, classes = read_source(
            Path(source), list(config.text_columns) or None, config.label_column or None
        )
        stats: dict[str, float] = {}
        quarantine: list[dict] = []
        for name, rows in splits.items():
            stats[f"rows_in_{name}"] = rows.rows_in
            stats[f"rows_accepted_{name}"] = len(rows.rows)
            stats[f"rows_quarantined_{name}"] = len(rows.quarantine)
            stats[f"rows_duplicate_{name}"] = rows.duplicates
            quarantine += rows.quarantine
            if not rows.rows:
                raise DataError(
                    f"{source}: no usable {name} rows ({len(rows.quarantine)} quarantined)"
                )
        train = _stratified_limit(splits["train"].rows, config.limit_train, config.seed)
        test = _stratified_limit(splits["test"].rows, config.limit_test, config.seed)
        labels = [r["label"] for r in train]
        tr, va = train_test_split(
            train, test_size=config.val_fraction, stratify=labels, random_state=config.seed
        )
        parts = {"train": tr, "val": va, "test": test}
        for name, rows in parts.items():
            write_parquet(
                rows_table(sorted(rows, key=lambda r: r["id"]), name), out / f"{name}.parquet"
            )
            stats[f"rows_{name}"] = len(rows)
        write_parquet(quarantine_table(quarantine), out / "quarantine.parquet")
        write_json(out / "labels.json", classes)
        write_json(out / "metrics.json", stats)
        write_json(out / "config.json", asdict(config))
        logger().info("ingest %s: %s", source, stats)
        mark_complete(out)
        return str(out)


def _corpus_key(path: str, home: str, config: CorpusConfig) -> str:
    return CORPUS.key({"file": source_hash(path)}, asdict(config))


@task(name="read-corpus", cache_key_fn=cache_key(_corpus_key), **STAGE_OPTS)
def read_pretrain_corpus(path: str, home: str, config: CorpusConfig) -> str:
    """Unlabeled pretraining text -> corpus.parquet (normalised text + tokens)."""
    out = Home(home).stage_dir("corpus", _corpus_key(path, home, config))
    with stage_lock(out):
        if is_complete(out):
            return str(out)
        clear_incomplete(out)
        texts = read_corpus(Path(path), list(config.text_columns) or None)
        if config.max_docs:
            texts = texts[: config.max_docs]
        table = corpus_table(texts)
        write_parquet(table, out / "corpus.parquet")
        n_tok = int(pa.compute.sum(pa.compute.list_value_length(table["tokens"])).as_py() or 0)
        write_json(out / "metrics.json", {"corpus_docs": len(texts), "corpus_tokens": n_tok})
        mark_complete(out)
        return str(out)


def split_files(dataset: str) -> dict[str, Path]:
    """An ingested dataset's split files by split name (the MLflow dataset inputs of a run)."""
    return {s: Path(dataset) / f"{s}.parquet" for s in SPLITS}


def stage_id(stage_dir: str) -> str:
    """The content address of a stage folder (its cache key = its folder name)."""
    return Path(stage_dir).name


def _vocab_key(dataset: str, corpora: list[str], home: str, config: VocabConfig) -> str:
    return VOCAB.key(
        {"dataset": stage_id(dataset), "corpora": ",".join(map(stage_id, corpora))}, asdict(config)
    )


def pretraining_documents(dataset: str, corpora: list[str]) -> list[list[str]]:
    """Token lists of the pretraining text: the train split plus extra corpora (never test)."""
    docs = read_dataset(Path(dataset) / "train.parquet")["tokens"].to_list()
    for c in corpora:
        docs += pl.read_parquet(Path(c) / "corpus.parquet")["tokens"].to_list()
    return docs


@task(name="build-vocab", cache_key_fn=cache_key(_vocab_key), **STAGE_OPTS)
def build_vocab(dataset: str, corpora: list[str], home: str, config: VocabConfig) -> str:
    """Vocabulary of the pretraining text -> vocab.parquet (id, token, count)."""
    out = Home(home).stage_dir("vocab", _vocab_key(dataset, corpora, home, config))
    with stage_lock(out):
        if is_complete(out):
            return str(out)
        clear_incomplete(out)
        vocab = Vocab.build(pretraining_documents(dataset, corpora), config)
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
        total = sum(vocab.counts[4:]) + vocab.counts[1]
        write_json(
            out / "metrics.json",
            {"vocab_size": len(vocab), "oov_rate": vocab.counts[1] / max(total, 1)},
        )
        write_json(out / "config.json", asdict(config))
        mark_complete(out)
        return str(out)


def load_vocab(vocab_dir: str) -> Vocab:
    df = pl.read_parquet(Path(vocab_dir) / "vocab.parquet").sort("id")
    return Vocab(tuple(df["token"].to_list()), tuple(df["count"].to_list()))


def dataset_stats(dataset: str) -> dict[str, float]:
    return read_json(Path(dataset) / "metrics.json")
