"""Unlabeled pretraining corpora of any size, read in bounded batches.

A corpus spec is a file, a folder (every corpus file in it, recursively) or a glob
(``news.en-000*-of-00100``, ``train-*.parquet``). Formats: plain text (a document per non-empty
line; no suffix, ``.txt``, optionally ``.gz`` / ``.zst`` / ``.bz2`` compressed), CSV (``.csv``,
optionally compressed; title/body/text/description columns or named ones) and Parquet. Nothing
here holds more than one batch of a file in memory: Parquet is read by record batches, CSV by
pyarrow's streaming reader, text line by line through a (de)compressing stream.
"""

from __future__ import annotations

import csv
import glob
import io
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from elmo_core.text import join_text
from storage.errors import DataError

TEXT_COLUMNS = ("title", "body", "text", "description")  # auto-detected, joined in this order
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
BATCH_CHARS = 4_000_000  # characters per batch handed to a tokenizer worker (~700k words)
_READ_ROWS = 2_000  # rows per read from a Parquet / CSV file


def _kind(path: Path) -> tuple[str, str | None]:
    """(format, compression) of a corpus file from its name."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[:-1] if comp else suffixes
    last = inner[-1] if inner else ""
    if last == ".parquet" and not comp:
        return "parquet", None
    if last == ".csv":
        return "csv", comp
    return "text", comp


def _is_corpus_file(path: Path) -> bool:
    return (
        path.is_file()
        and not path.name.startswith((".", "_"))
        and path.suffix.lower()
        not in (
            ".md",
            ".json",
            ".crc",
        )
    )


def resolve_corpus(spec: str) -> list[Path]:
    """The files a corpus spec names, sorted; DataError when it names none."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if _is_corpus_file(f))
        if not files:
            raise DataError(f"{spec}: corpus folder holds no corpus files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if _is_corpus_file(Path(f)))
        if not files:
            raise DataError(f"{spec}: corpus glob matches no files")
        return files
    raise DataError(f"{spec}: pretraining corpus does not exist")


def _pick_columns(path: Path, names: list[str], wanted: list[str] | None) -> list[str]:
    cols = wanted or [c for c in TEXT_COLUMNS if c in names]
    if not cols or any(c not in names for c in cols):
        raise DataError(f"{path}: no text columns {wanted or '/'.join(TEXT_COLUMNS)} in {names}")
    return cols


def _join(columns: list[list], binary: bool) -> list[str]:
    """Row-wise ``a . b`` of the text columns; empty documents dropped."""
    out = []
    for row in zip(*columns, strict=True):
        parts = [(v.decode("utf-8", "replace") if binary else v) for v in row if v is not None]
        text = join_text(parts)
        if text.strip(" ."):
            out.append(text)
    return out


def _parquet_batches(path: Path, wanted: list[str] | None) -> Iterator[list[str]]:
    try:
        f = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: unreadable parquet ({e})") from e
    cols = _pick_columns(path, f.schema_arrow.names, wanted)
    for b in f.iter_batches(batch_size=_READ_ROWS, columns=cols):
        texts = _join([b.column(c).cast(pa.string()).to_pylist() for c in cols], False)
        if texts:
            yield texts


def _csv_batches(path: Path, comp: str | None, wanted: list[str] | None) -> Iterator[list[str]]:
    with pa.input_stream(str(path), compression=comp) as raw:
        head = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        try:
            names = next(csv.reader(head))
        except StopIteration:
            return
    cols = _pick_columns(path, names, wanted)
    stream = pa.input_stream(str(path), compression=comp)
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            # bytes, decoded leniently below: one bad byte must not fail a 10 GB corpus
            convert_options=pacsv.ConvertOptions(
                include_columns=cols, column_types={c: pa.binary() for c in cols}
            ),
        )
        for b in reader:
            texts = _join([b.column(c).to_pylist() for c in cols], True)
            if texts:
                yield texts
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: unreadable csv ({e})") from e
    finally:
        stream.close()


def _text_batches(path: Path, comp: str | None) -> Iterator[list[str]]:
    try:
        with pa.input_stream(str(path), compression=comp) as raw:
            lines = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
            pending: list[str] = []
            for line in lines:
                if line.strip():
                    pending.append(line.rstrip("\n"))
                    if len(pending) >= _READ_ROWS:
                        yield pending
                        pending = []
            if pending:
                yield pending
    except OSError as e:
        raise DataError(f"{path}: unreadable text ({e})") from e


def _file_batches(path: Path, text_columns: list[str] | None) -> Iterator[list[str]]:
    kind, comp = _kind(path)
    if kind == "parquet":
        return _parquet_batches(path, text_columns)
    if kind == "csv":
        return _csv_batches(path, comp, text_columns)
    return _text_batches(path, comp)


def iter_corpus(
    files: list[Path], text_columns: list[str] | None = None, batch_chars: int | None = None
) -> Iterator[list[str]]:
    """Batches of raw documents from every file in order, each about ``batch_chars`` characters
    (a sentence-per-line corpus and an article-per-row one give batches of similar work)."""
    batch_chars = batch_chars or BATCH_CHARS
    pending: list[str] = []
    size = 0
    for path in files:
        for texts in _file_batches(path, text_columns):
            for t in texts:
                pending.append(t)
                size += len(t)
                if size >= batch_chars:
                    yield pending
                    pending, size = [], 0
    if pending:
        yield pending


# ------------------------------------------------------------------ tokenised shards (workers)

TOKENS_SCHEMA = pa.schema([("tokens", pa.list_(pa.string()))])
_MASK64 = (1 << 64) - 1


def held_out(index: int, seed: int, fraction: float) -> bool:
    """Is document ``index`` in the seeded held-out slice? A stateless hash (splitmix64) of
    (seed, index): the same documents for every batch size, worker count and re-run."""
    if fraction <= 0.0:
        return False
    z = (index + (seed + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z / 2.0**64 < fraction


def tokenize_shard(
    texts: list[str], start: int, shard: str, heldout_shard: str, holdout: float, seed: int
) -> tuple[dict[str, int], int, int, int, int, int]:
    """Tokenise one batch (documents ``start``, ``start + 1``, ...), write its training
    documents to the Parquet ``shard`` and its held-out ones to ``heldout_shard`` (atomically,
    the latter only when there are any). Runs in a worker process; returns only figures, so
    the process that collects them holds no text.

    Returns (token counts of the training documents, words in, training documents, training
    tokens, held-out documents, held-out tokens)."""
    from collections import Counter

    from elmo_core.text import tokenize
    from storage.datasets import write_parquet

    counts: Counter[str] = Counter()
    kept: list[list[str]] = []
    heldout: list[list[str]] = []
    words = n_tok = 0
    for i, text in enumerate(texts):
        words += text.count(" ") + 1
        toks = tokenize(text)
        if not toks:
            continue
        if held_out(start + i, seed, holdout):
            heldout.append(toks)
            continue
        counts.update(toks)
        kept.append(toks)
        n_tok += len(toks)
    write_parquet(pa.table({"tokens": kept}, schema=TOKENS_SCHEMA), shard)
    if heldout:
        write_parquet(pa.table({"tokens": heldout}, schema=TOKENS_SCHEMA), heldout_shard)
    return dict(counts), words, len(kept), n_tok, len(heldout), sum(map(len, heldout))
