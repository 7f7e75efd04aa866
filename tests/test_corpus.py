"""Pretraining corpora: specs (files, folders, globs), formats (text, gz/zst, CSV, Parquet
shards), streamed tokenisation into shards with a seeded held-out slice, counts merged into the
vocabulary, memory-mapped id shards and the bounded-memory window order."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from elmo_core.text import tokenize
from elmo_core.vocab import Vocab
from elmo_core.vocab_config import VocabConfig
from elmo_core.windows import TokenWindows, epoch_batches
from storage.corpus import held_out, iter_corpus, resolve_corpus
from storage.errors import DataError
from tasks import corpus as corpus_tasks
from tasks.corpus import CorpusConfig, heldout_shards, read_pretrain_corpus, token_shards
from tasks.ids import encode_docs, encode_ids, id_shards
from tasks.stage import StageContext
from tasks.vocab import build_vocab, load_vocab
from tests.conftest import REUTERS

NEWS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "news_corpus" / "news_corpus.parquet"
)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """600 real news documents (the first rows of the shared news corpus)."""
    f = pq.ParquetFile(NEWS)
    return next(f.iter_batches(batch_size=600, columns=["text"])).column(0).to_pylist()


def _shards(root: Path, docs: list[str]) -> Path:
    """The same documents as two Parquet shards, a gzip text shard and a zstd text shard."""
    root.mkdir(parents=True, exist_ok=True)
    a, b, c, d = docs[:150], docs[150:300], docs[300:450], docs[450:]
    pq.write_table(pa.table({"text": a}), root / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": b}), root / "train-00001-of-00002.parquet")
    with gzip.open(root / "news.en-00002-of-00004.gz", "wt") as f:
        f.write("\n".join(x.replace("\n", " ") for x in c) + "\n")
    with pa.output_stream(str(root / "news.en-00003-of-00004.zst"), compression="zstd") as f:
        f.write(("\n".join(x.replace("\n", " ") for x in d) + "\n").encode())
    return root


def test_specs_name_files_folders_and_globs(tmp_path, docs):
    root = _shards(tmp_path / "c", docs)
    (root / "SOURCE.md").write_text("not a corpus file")
    assert len(resolve_corpus(str(root))) == 4  # the folder: every corpus file, no README
    assert [p.name for p in resolve_corpus(str(root / "train-*.parquet"))] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    with pytest.raises(DataError, match="matches no files"):
        resolve_corpus(str(root / "nope-*.txt"))
    with pytest.raises(DataError, match="does not exist"):
        resolve_corpus(str(tmp_path / "missing.txt"))


def test_every_format_and_shard_is_read_in_bounded_batches(tmp_path, docs):
    root = _shards(tmp_path / "c", docs)
    batches = list(iter_corpus(resolve_corpus(str(root)), batch_chars=100_000))
    texts = [t for b in batches for t in b]
    assert len(texts) == len(docs)  # every shard, every format
    in_file_order = docs[300:] + docs[:300]  # sorted names: news.en-* before train-*
    assert [tokenize(t) for t in texts] == [tokenize(t) for t in in_file_order]
    assert len(batches) > 5 and max(sum(map(len, b)) for b in batches) < 100_000 + max(
        map(len, docs)
    )


def test_held_out_slice_is_a_seeded_stateless_hash():
    picks = [i for i in range(20_000) if held_out(i, 13, 0.01)]
    assert 150 < len(picks) < 250
    assert picks == [i for i in range(20_000) if held_out(i, 13, 0.01)]
    assert picks != [i for i in range(20_000) if held_out(i, 14, 0.01)]
    assert not any(held_out(i, 13, 0.0) for i in range(1000))


def test_corpus_stage_counts_tokens_and_holds_out_documents(tmp_path, docs, monkeypatch):
    root = _shards(tmp_path / "c", docs)
    cfg = CorpusConfig(holdout_fraction=0.05, seed=3)
    monkeypatch.setattr("storage.corpus.BATCH_CHARS", 200_000)  # several shards
    one = Path(read_pretrain_corpus.fn(str(root), cfg, StageContext(str(tmp_path / "h1"))))
    kept = [toks for p in token_shards(str(one)) for toks in pq.read_table(p)["tokens"].to_pylist()]
    held = [t for p in heldout_shards(str(one)) for t in pq.read_table(p)["tokens"].to_pylist()]
    all_docs = [tokenize(t) for t in docs[300:] + docs[:300]]  # file order
    want_held = [d for i, d in enumerate(all_docs) if held_out(i, 3, 0.05)]
    assert held == want_held and 10 < len(held) < 60
    assert len(kept) + len(held) == len(docs) and len(token_shards(str(one))) > 2
    counts = pl.read_parquet(one / "counts.parquet")
    want = Counter(t for d in kept for t in d)
    assert dict(zip(counts["token"], counts["count"], strict=True)) == want
    # the pool path (2 spawned workers) writes exactly what the in-process path wrote
    monkeypatch.setattr(corpus_tasks, "POOL_MIN_BYTES", 0)
    monkeypatch.setenv("ELMO_NEWS_WORKERS", "2")
    two = Path(read_pretrain_corpus.fn(str(root), cfg, StageContext(str(tmp_path / "h2"))))
    assert two.name == one.name
    shards = [p.name for p in [*token_shards(str(one)), *heldout_shards(str(one))]]
    assert sorted(p.name for p in two.glob("*.parquet")) == sorted(["counts.parquet", *shards])
    for name in ["counts.parquet", *shards]:
        assert pq.read_table(two / name).equals(pq.read_table(one / name)), name


def test_corpus_key_follows_content_and_shards(tmp_path, docs):
    root = _shards(tmp_path / "c", docs)
    home = str(tmp_path / "h")
    first = read_pretrain_corpus.fn(str(root), CorpusConfig(), StageContext(home))
    assert read_pretrain_corpus.fn(str(root), CorpusConfig(), StageContext(home)) == first  # cached
    pq.write_table(pa.table({"text": ["one more document"]}), root / "train-00002.parquet")
    assert (
        read_pretrain_corpus.fn(str(root), CorpusConfig(), StageContext(home)) != first
    )  # a new shard


def test_vocab_from_counts_equals_vocab_from_documents(docs):
    toks = [tokenize(t) for t in docs]
    cfg = VocabConfig(min_count=2, max_size=500)
    counts = Counter(t for d in toks for t in d)
    assert Vocab.from_counts(counts, len(toks), cfg) == Vocab.build(toks, cfg)


def test_id_shards_are_the_documents_between_boundaries(tmp_path, docs):
    home = str(tmp_path / "h")
    c = read_pretrain_corpus.fn(
        str(REUTERS), CorpusConfig(max_docs=400, holdout_fraction=0.1), StageContext(home)
    )
    v_dir = build_vocab.fn(None, [c], VocabConfig(min_count=2), StageContext(home))
    vocab = load_vocab(v_dir)
    ids_dir = encode_ids.fn(None, [c], v_dir, 5, StageContext(home))
    stream = np.concatenate([np.load(p, mmap_mode="r") for p in id_shards(ids_dir)])
    kept = []
    for p in token_shards(c):  # each shard's documents in the seeded order
        shard = pq.read_table(p)["tokens"].to_pylist()
        kept += [shard[i] for i in np.random.default_rng(5).permutation(len(shard))]
    want = [i for d in kept for i in (vocab.bos_id, *vocab.encode(d), vocab.eos_id)]
    assert stream.dtype == np.int32 and stream.tolist() == want
    held = [t for p in heldout_shards(c) for t in pq.read_table(p)["tokens"].to_pylist()]
    held = [held[i] for i in np.random.default_rng(5).permutation(len(held))]
    val = np.load(Path(ids_dir) / "val.npy")
    assert val.tolist() == [i for d in held for i in (2, *vocab.encode(d), 3)]
    # a token of held-out text only is unknown to the vocabulary (never counted)
    only_held = {t for d in held for t in d} - {t for d in kept for t in d}
    assert only_held and not only_held & set(vocab.tokens)


def test_encode_docs_keeps_empty_documents_as_boundaries():
    index = pl.DataFrame({"token": ["<pad>", "<unk>", "<s>", "</s>", "a", "b"], "id": range(6)})
    index = index.with_columns(pl.col("id").cast(pl.Int32))
    got = encode_docs(pl.Series([["a", "b"], [], ["zz", "a"]]), index)
    assert got.tolist() == [2, 4, 5, 3, 2, 3, 2, 1, 4, 3]


def test_windows_never_cross_a_shard_and_gather_the_right_ids():
    shards = [np.arange(0, 25, dtype=np.int32), np.arange(100, 140, dtype=np.int32)]
    w = TokenWindows(shards, 10)
    assert len(w) == 2 + 4  # 25 → 2 windows (tail dropped), 40 → 4
    got = w.get(torch.tensor([1, 2, 5]))
    assert got.tolist() == [list(range(10, 20)), list(range(100, 110)), list(range(130, 140))]
    with pytest.raises(ValueError, match="shorter than one window"):
        TokenWindows([np.arange(5)], 10)


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_epoch_order_visits_every_window_once_in_bounded_blocks(block):
    n, b = 103, 8
    batches = list(epoch_batches(n, b, seed=1, epoch=0, block=block))
    flat = torch.cat(batches)
    assert len(batches) == -(-n // b) and sorted(flat.tolist()) == list(range(n))
    assert flat.tolist() != list(range(n))  # shuffled
    # resuming at batch 5 gives the batches an uninterrupted epoch gives from there
    resumed = list(epoch_batches(n, b, seed=1, epoch=0, start=5, block=block))
    assert [x.tolist() for x in resumed] == [x.tolist() for x in batches[5:]]
    other = torch.cat(list(epoch_batches(n, b, seed=1, epoch=1, block=block)))
    assert other.tolist() != flat.tolist()


def test_epoch_order_up_to_a_block_is_torch_randperm():
    g = torch.Generator().manual_seed(5 * 1009 + 2)
    want = torch.randperm(50, generator=g).split(16)
    got = list(epoch_batches(50, 16, seed=5, epoch=2))
    assert [x.tolist() for x in got] == [x.tolist() for x in want]
