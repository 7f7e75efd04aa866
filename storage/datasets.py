"""An ingested dataset's Parquet form: its schema, atomic writes, reads that check the schema."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from elmo_core.checkpoint import atomic_file
from storage.errors import DataError

DATASET_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("split", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.string())),
    ]
)


def write_parquet(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Atomic Parquet write (``atomic_file``)."""
    with atomic_file(path) as f:
        pq.write_table(table, f, compression="zstd")


def rows_table(rows: list[dict], split: str) -> pa.Table:
    cols = {name: [r[name] for r in rows] for name in DATASET_SCHEMA.names if name != "split"}
    cols["split"] = [split] * len(rows)
    return pa.table({n: cols[n] for n in DATASET_SCHEMA.names}, schema=DATASET_SCHEMA)


def read_dataset(path: str | os.PathLike[str]) -> pl.DataFrame:
    """A split written by ingest; a file with another schema raises DataError."""
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise DataError(f"{path}: unreadable Parquet ({e})") from e
    if not schema.equals(DATASET_SCHEMA, check_metadata=False):
        raise DataError(f"{path}: wrong schema {schema.names}, expected {DATASET_SCHEMA.names}")
    return pl.read_parquet(Path(path))
