"""Stage ``build-vocab``: the vocabulary of the pretraining text (train split + corpora, never
test or held-out text), merged from counts, never token lists."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from elmo_core.vocab import SPECIALS, Vocab
from elmo_core.vocab_config import VocabConfig
from storage.datasets import read_dataset, write_parquet
from storage.paths import write_json
from tasks.stage import StageContext, stage

VOCAB = stage("vocab", __name__, inputs=["dataset", "corpora"], config=["config"])


def _split_counts(dataset: str) -> tuple[Counter[str], int]:
    df = read_dataset(Path(dataset) / "train.parquet")
    tok = df.select(pl.col("tokens").explode()).drop_nulls()["tokens"].value_counts()
    return Counter(dict(zip(tok["tokens"].to_list(), tok["count"].to_list(), strict=True))), len(df)


@VOCAB.task(name="build-vocab")
def build_vocab(
    dataset: str | None, corpora: list[str], config: VocabConfig, ctx: StageContext
) -> str:
    """Vocabulary of the pretraining text (train split, if any, + corpora; never test or
    held-out text) → vocab.parquet (id, token, count); merged from counts, never token lists."""
    return VOCAB.build(locals(), lambda d: _build_vocab(dataset, corpora, d, config))


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
