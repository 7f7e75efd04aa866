"""Rows refused at ingestion, each kept with its split, row number, reason and raw text."""

from __future__ import annotations

import pyarrow as pa

QUARANTINE_SCHEMA = pa.schema(
    [("split", pa.string()), ("row", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]
)


def quarantine_table(rows: list[dict]) -> pa.Table:
    return pa.table(
        {n: [r[n] for r in rows] for n in QUARANTINE_SCHEMA.names}, schema=QUARANTINE_SCHEMA
    )
