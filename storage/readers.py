"""Reading labelled news into validated rows. Sources: AG News' original CSV folder
(train.csv/test.csv, no header: class 1-4, title, description), its public Parquet form (text,
label 0-3), or any labelled CSV/Parquet with named text/label columns. Bad rows go to the
quarantine with a reason; a file unusable as a whole raises DataError."""

from __future__ import annotations

import csv
import io
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from elmo_core.text import join_text, normalize, tokenize
from storage.errors import DataError

AG_LABELS = ("World", "Sports", "Business", "Sci/Tech")


MAX_FIELD_CHARS = 1_000_000  # a field longer than this is quarantined, not tokenised


@dataclass
class SplitRows:
    # keep the accepted rows (ingestion) or only count them (the preflight: no tokenising)
    keep: bool = True
    rows: list[dict] = field(default_factory=list)  # accepted rows (DATASET_SCHEMA minus split)
    quarantine: list[dict] = field(default_factory=list)
    rows_in: int = 0
    duplicates: int = 0
    labels: list[int] = field(default_factory=list)  # the accepted rows' labels, in order

    @property
    def accepted(self) -> int:
        return len(self.labels)

    def top_reasons(self, n: int = 2) -> str:
        """The most frequent quarantine reasons, for a message."""
        common = Counter(q["reason"] for q in self.quarantine).most_common(n)
        return "; ".join(f"{r} ({c})" for r, c in common)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    # undecodable bytes survive as lone surrogates so the row holding them can be quarantined.
    return raw.decode("utf-8", errors="surrogateescape")


def _has_bad_utf8(fields: list[str]) -> bool:
    return any("\udc80" <= ch <= "\udcff" for f in fields for ch in f)


def _accept(
    out: SplitRows,
    split: str,
    row_no: int,
    raw: str,
    label_value: str,
    label_index: dict[str, int],
    label_names: list[str],
    title: str,
    body: str,
    seen: set,
) -> None:
    def reject(reason: str) -> None:
        out.quarantine.append({"split": split, "row": row_no, "reason": reason, "raw": raw[:2000]})

    if len(title) + len(body) > MAX_FIELD_CHARS:
        reject(f"field longer than {MAX_FIELD_CHARS} characters")
        return
    if not label_value.strip():
        reject("missing label")
        return
    label = label_index.get(label_value.strip())
    if label is None:
        reject(f"label {label_value[:50]!r} outside the class set {sorted(label_index)}")
        return
    title_n, body_n = normalize(title), normalize(body)
    text = join_text([title_n, body_n])
    if not text.strip():
        reject("empty text")
        return
    key = (label, title_n, body_n)
    if key in seen:
        out.duplicates += 1
    seen.add(key)
    out.labels.append(label)
    if not out.keep:
        return
    out.rows.append(
        {
            "id": row_no,
            "label": label,
            "label_name": label_names[label],
            "title": title_n,
            "text": text,
            "tokens": tokenize(text),
        }
    )


def read_ag_csv(path: Path, split: str, keep: bool = True) -> SplitRows:
    """AG News' original CSV: no header, class (1-4), title, description."""
    text = _read_text(path)
    label_index = {str(i + 1): i for i in range(len(AG_LABELS))}
    return _parse_csv(path, text, split, label_index, list(AG_LABELS), None, None, keep)


def _parse_csv(
    path: Path,
    text: str,
    split: str,
    label_index: dict[str, int],
    label_names: list[str],
    header: list[str] | None,
    columns: tuple[str, list[str]] | None,
    keep: bool = True,
) -> SplitRows:
    out = SplitRows(keep)
    seen: set = set()
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(io.StringIO(text, newline=""), strict=False)
    if columns is None:
        label_col, text_cols, n_cols = 0, [1, 2], 3
    else:
        assert header is not None
        label_col = header.index(columns[0])
        text_cols = [header.index(c) for c in columns[1]]
        n_cols = len(header)
    try:
        if header is not None:
            next(reader)  # the header itself
        for row_no, fields in enumerate(reader, start=1):
            out.rows_in += 1
            raw = ",".join(fields)
            if len(fields) != n_cols:
                out.quarantine.append(
                    {
                        "split": split,
                        "row": row_no,
                        "reason": f"expected {n_cols} columns, got {len(fields)}",
                        "raw": raw[:2000],
                    }
                )
                continue
            if _has_bad_utf8(fields):
                out.quarantine.append(
                    {
                        "split": split,
                        "row": row_no,
                        "reason": "invalid UTF-8 bytes",
                        "raw": raw[:2000].encode("utf-8", "replace").decode(),
                    }
                )
                continue
            parts = [fields[i] for i in text_cols]
            title, body = (parts[0], " ".join(parts[1:])) if len(parts) > 1 else ("", parts[0])
            _accept(
                out,
                split,
                row_no,
                raw,
                fields[label_col],
                label_index,
                label_names,
                title,
                body,
                seen,
            )
    except csv.Error as e:
        raise DataError(f"{path}: unreadable CSV ({e})") from e
    if out.rows_in == 0:
        raise DataError(f"{path}: no data rows (header only?)")
    return out


TEXT_DTYPES = (pl.String, pl.Categorical, pl.Enum, pl.Null)  # what a text column may hold


def _label_value(v: object) -> str:
    """A label cell as the class value it names ("" = missing: null or NaN)."""
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return str(v).strip()


def _parquet_columns(p: Path, text_columns: list[str], label_column: str) -> pl.DataFrame:
    """The label and text columns of one Parquet file, after checking they exist and that
    the text columns hold text."""
    try:
        schema = pl.read_parquet_schema(p)
    except Exception as e:
        raise DataError(f"{p}: unreadable Parquet ({e})") from e
    missing = [c for c in [label_column, *text_columns] if c not in schema]
    if missing:
        raise DataError(f"{p}: wrong schema, missing columns {missing} (has {list(schema)})")
    for c in text_columns:
        if not isinstance(schema[c], TEXT_DTYPES):
            raise DataError(f"{p}: text column {c!r} holds {schema[c]} values, not text")
    try:
        return pl.read_parquet(p, columns=list(dict.fromkeys([label_column, *text_columns])))
    except Exception as e:
        raise DataError(f"{p}: unreadable Parquet ({e})") from e


def read_labelled(
    path: Path | list[Path],
    split: str,
    text_columns: list[str],
    label_column: str,
    classes: list[str] | None,
    keep: bool = True,
) -> tuple[SplitRows, list[str]]:
    """A user CSV (with header) or Parquet with named text and label columns; a list of Parquet
    paths is one split published as shards (``train-00000-of-00002.parquet``, ...): every shard
    is read, rows numbered across them in order. Classes come from the train split (sorted
    label values; a missing label is no class) unless given."""
    shards = path if isinstance(path, list) else [path]
    path = shards[0] if len(shards) == 1 else Path(f"{shards[0].parent}/{split}*.parquet")
    for p in shards:
        if not p.exists():
            raise DataError(f"{p}: file does not exist")
    if shards[0].suffix == ".parquet":
        tables = [_parquet_columns(p, text_columns, label_column) for p in shards]
        try:
            table = pl.concat(tables, how="vertical_relaxed")
        except Exception as e:
            raise DataError(f"{path}: shards with different column types ({e})") from e
        if table.height == 0:
            raise DataError(f"{path}: no data rows")
        labels = [_label_value(v) for v in table[label_column].to_list()]
        if classes is None:
            classes = sorted(set(labels) - {""}, key=_label_sort)
        names = _label_names(classes, label_column, labels)
        index = {c: i for i, c in enumerate(classes)}
        out, seen = SplitRows(keep), set[tuple[int, str, str]]()
        texts = [table[c].cast(pl.String).fill_null("").to_list() for c in text_columns]
        for row_no in range(table.height):
            out.rows_in += 1
            parts = [t[row_no] for t in texts]
            title, body = (parts[0], " ".join(parts[1:])) if len(parts) > 1 else ("", parts[0])
            raw = " | ".join(parts)
            _accept(out, split, row_no + 1, raw, labels[row_no], index, names, title, body, seen)
        return out, classes
    text = _read_text(path)
    try:
        header = next(csv.reader(io.StringIO(text, newline="")), [])
        missing = [c for c in [label_column, *text_columns] if c not in header]
        if missing:
            raise DataError(f"{path}: wrong schema, missing columns {missing} (header {header})")
        if classes is None:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
            classes = sorted(
                {(r.get(label_column) or "").strip() for r in rows} - {""}, key=_label_sort
            )
    except csv.Error as e:
        raise DataError(f"{path}: unreadable CSV ({e})") from e
    index = {c: i for i, c in enumerate(classes)}
    return _parse_csv(
        path, text, split, index, list(classes), header, (label_column, text_columns), keep
    ), classes


def _label_sort(v: str) -> tuple[int, float | str]:
    try:
        return (0, float(v))
    except ValueError:
        return (1, v)


def _label_names(classes: list[str], label_column: str, labels: list[str]) -> list[str]:
    # AG News' public Parquet form stores 0-3; name them as the original does.
    if classes == ["0", "1", "2", "3"]:
        return list(AG_LABELS)
    return list(classes)


def read_source(
    source: Path, text_columns: list[str] | None, label_column: str | None, keep: bool = True
) -> tuple[dict[str, SplitRows], list[str]]:
    """Both splits of a labelled source folder -> (split -> rows, class names); ``keep=False``
    applies every rule but keeps only the counts and labels (the preflight)."""
    if not source.exists():
        raise DataError(f"{source}: data folder or file does not exist")
    if not source.is_dir():
        raise DataError(f"{source}: expected a folder holding a train and a test file")
    csvs = {s: source / f"{s}.csv" for s in ("train", "test")}
    parquets = {s: sorted(source.glob(f"{s}*.parquet")) for s in ("train", "test")}
    if label_column is None and all(p.exists() for p in csvs.values()):
        return {s: read_ag_csv(p, s, keep) for s, p in csvs.items()}, list(AG_LABELS)
    if all(parquets.values()):
        tc, lc = text_columns or ["text"], label_column or "label"
        # AG News' public Parquet form: labels 0-3, whatever subset a file happens to hold
        fixed = ["0", "1", "2", "3"] if label_column is None else None
        # every shard of a split (train-00000-of-00002.parquet, train-00001-of-00002.parquet)
        train, classes = read_labelled(parquets["train"], "train", tc, lc, fixed, keep)
        test, _ = read_labelled(parquets["test"], "test", tc, lc, classes, keep)
        return {"train": train, "test": test}, _label_names(classes, lc, [])
    if label_column and all(p.exists() for p in csvs.values()):
        tc = text_columns or ["text"]
        train, classes = read_labelled(csvs["train"], "train", tc, label_column, None, keep)
        test, _ = read_labelled(csvs["test"], "test", tc, label_column, classes, keep)
        return {"train": train, "test": test}, classes
    raise DataError(
        f"{source}: no train/test pair found (expected train.csv + test.csv or train*.parquet + "
        "test*.parquet)"
    )
