"""Fuzzed ingestion: generated CSV and Parquet sources (column counts and names, quoting,
encodings, line endings, nulls, empty and over-long fields, label values and types,
duplicates, shards). Every input ends either accepted, with each split's rows in = accepted +
quarantined, or in one project error (DataError); never another exception. The preflight and
ingestion agree on every input: same error, or same split sizes.

``HYPOTHESIS_PROFILE=deep`` runs many more examples (see docs/reliability.md)."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import storage.readers as readers
from storage.errors import DataError
from storage.readers import read_source
from tasks.ingest import IngestConfig, _read, preflight

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LONG = 120  # the over-long field limit during these tests (the real one is far larger)

# text: quotes, separators, line breaks, a NUL, non-ASCII, surrogate-free unicode
cell_text = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20),
    st.text(alphabet='ab ,"\n\r\t\x00é', max_size=12),
    st.text(alphabet="xy ", min_size=LONG - 5, max_size=LONG + 20),  # around the limit
    st.just(""),
)
# mostly two or three classes (so many inputs are accepted), sometimes anything
label_value = st.one_of(
    st.sampled_from(["1", "2", "1", "2", "3"]),
    st.sampled_from(["1", "2", "3", "4", "0", "9", "", " 2 ", "x", "World"]),
    st.integers(-2, 5).map(str),
)
good_text = st.text(alphabet="abc xyz", min_size=1, max_size=15)
col_name = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)


@pytest.fixture(autouse=True)
def _short_fields(monkeypatch):
    monkeypatch.setattr(readers, "MAX_FIELD_CHARS", LONG)


def _outcome(folder: Path, tc: list[str] | None, lc: str | None, val: float = 0.3) -> tuple:
    """Read the source; check the accounting; run preflight and ingestion's split plan on it
    and check they agree. Returns what happened, for the caller's own assertions."""
    try:
        splits, classes = read_source(folder, tc, lc)
    except DataError as e:
        return ("error", str(e))
    for name, rows in splits.items():
        assert rows.rows_in == len(rows.rows) + len(rows.quarantine), name
        assert rows.accepted == len(rows.rows)
        assert all(0 <= r["label"] < len(classes) for r in rows.rows)
        assert all(q["split"] == name and q["reason"] for q in rows.quarantine)
    config = IngestConfig(val_fraction=val, text_columns=tuple(tc or ()), label_column=lc or "")
    try:
        report = preflight(str(folder), config)
    except DataError as e:
        with pytest.raises(DataError) as same:
            _read(str(folder), config, keep=True)
        assert str(same.value) == str(e)
        return ("refused", str(e))
    _, _, plan = _read(str(folder), config, keep=True)
    assert report["rows"] == {k: len(v) for k, v in plan.items()}
    assert sorted(plan["train"] + plan["val"]) == list(range(splits["train"].accepted))
    assert plan["test"] == list(range(splits["test"].accepted))
    return ("accepted", report)


def _write_csv(path: Path, rows: list[list[str]], quoting: int, encoding: str, eol: str) -> None:
    buf = io.StringIO()
    csv.writer(buf, quoting=quoting, lineterminator=eol).writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding, errors="replace"))


csv_format = st.tuples(
    st.sampled_from([csv.QUOTE_ALL, csv.QUOTE_MINIMAL, csv.QUOTE_NONNUMERIC]),
    st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]),
    st.sampled_from(["\n", "\r\n"]),
)


def _mixed(draw: st.DrawFn, core: list, wild: st.SearchStrategy) -> list:
    """A usable core (or none) with wild rows mixed in, in random order."""
    keep_core = draw(st.sampled_from([True, True, True, False]))
    rows = (core if keep_core else []) + draw(st.lists(wild, max_size=12))
    if rows and draw(st.booleans()):
        rows += draw(st.lists(st.sampled_from(rows), max_size=5))  # duplicates
    return draw(st.permutations(rows))


@st.composite
def ag_rows(draw: st.DrawFn, per_class: int) -> list[list[str]]:
    """AG News' header-less form: two classes of good rows, wild ones mixed in (any label,
    any text, wrong column counts)."""
    good = st.tuples(good_text, good_text)
    core = [[c, *t] for c in ("1", "2") for t in draw(st.lists(good, min_size=per_class))]
    wild = st.one_of(
        st.tuples(label_value, cell_text, cell_text).map(list),
        st.lists(cell_text, min_size=0, max_size=5),  # a ragged row
    )
    return _mixed(draw, core, wild)


@given(train=ag_rows(4), test=ag_rows(1), fmt=csv_format, raw_tail=st.binary(max_size=8))
def test_fuzzed_ag_csv_is_accounted_for_or_refused(train, test, fmt, raw_tail):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        _write_csv(folder / "train.csv", train, *fmt)
        _write_csv(folder / "test.csv", test, *fmt)
        with (folder / "train.csv").open("ab") as f:
            f.write(raw_tail)  # stray bytes: invalid UTF-8, a broken quote, a NUL
        kind, _ = _outcome(folder, None, None)
        event(kind)  # the outcome mix, in --hypothesis-show-statistics


@st.composite
def generic_csv(draw: st.DrawFn) -> tuple[list[list[str]], list[list[str]], list[str], str]:
    """A CSV with a header of random names; the text/label columns asked for may be absent."""
    names = draw(st.lists(col_name, min_size=1, max_size=5, unique=True))
    n = len(names)
    # mostly columns the file has, sometimes one it lacks
    pick = st.sampled_from([*[st.sampled_from(names)] * 5, col_name]).flatmap(lambda s: s)
    label = draw(pick)
    text = draw(st.lists(pick, min_size=1, max_size=2))

    def good(cls: str) -> st.SearchStrategy:
        return st.tuples(*[st.just(cls) if c == label else good_text for c in names]).map(list)

    wild = st.one_of(
        st.lists(st.one_of(cell_text, label_value), min_size=n, max_size=n),
        st.lists(cell_text, min_size=0, max_size=n + 2),  # a ragged row
    )
    core_train = [r for c in ("a", "b") for r in draw(st.lists(good(c), min_size=4))]
    core_test = draw(st.lists(good("a") | good("b"), min_size=1, max_size=4))
    return (
        [names, *_mixed(draw, core_train, wild)],
        [names, *_mixed(draw, core_test, wild)],
        text,
        label,
    )


@given(data=generic_csv(), fmt=csv_format)
def test_fuzzed_generic_csv_is_accounted_for_or_refused(data, fmt):
    train, test, text, label = data
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        _write_csv(folder / "train.csv", train, *fmt)
        _write_csv(folder / "test.csv", test, *fmt)
        kind, _ = _outcome(folder, text, label)
        event(kind)  # the outcome mix, in --hypothesis-show-statistics


column_values = {
    "text": st.lists(good_text, min_size=5, max_size=30),
    "string": st.lists(st.one_of(st.none(), cell_text), max_size=30),
    "int": st.lists(st.one_of(st.none(), st.integers(-3, 6)), max_size=30),
    "float": st.lists(st.one_of(st.none(), st.floats(allow_nan=True), st.just(1.0)), max_size=30),
    "bool": st.lists(st.one_of(st.none(), st.booleans()), max_size=30),
    "label": st.lists(st.one_of(st.none(), label_value), max_size=30),
    "class": st.lists(st.sampled_from(["0", "1"]), min_size=4, max_size=30).map(
        lambda v: ["0", "0", "1", "1", *v]  # two classes, each stratifiable
    ),
}


@st.composite
def parquet_split(draw: st.DrawFn, names: list[str], usual: dict[str, str]) -> list[pa.Table]:
    """One split as 1-3 shards; each column of its usual type or a random one, padded to one
    length."""
    shards = []
    for _ in range(draw(st.integers(1, 3))):
        kinds = {
            n: draw(st.sampled_from([usual.get(n, "string")] * 12 + sorted(column_values)))
            for n in names
        }
        cols = {n: draw(column_values[k]) for n, k in kinds.items()}
        height = max((len(v) for v in cols.values()), default=0)
        cols = {n: v + [None] * (height - len(v)) for n, v in cols.items()}
        shards.append(pa.table(cols) if cols else pa.table({"x": pa.array([], pa.int64())}))
    return shards


@st.composite
def generic_parquet(draw: st.DrawFn) -> tuple[list[pa.Table], list[pa.Table], list[str], str]:
    names = draw(st.lists(col_name, min_size=1, max_size=4, unique=True))
    if draw(st.booleans()):  # AG News' public form: text and label
        names = ["text", "label", *names[:2]]
    pick = st.sampled_from([*[st.sampled_from(names)] * 5, col_name]).flatmap(lambda s: s)
    label = draw(pick)
    text = draw(st.lists(pick, min_size=1, max_size=2))
    usual = {**dict.fromkeys(text, "text"), label: "class", "label": "class", "text": "text"}
    return draw(parquet_split(names, usual)), draw(parquet_split(names, usual)), text, label


@given(data=generic_parquet(), name_columns=st.booleans())
def test_fuzzed_parquet_is_accounted_for_or_refused(data, name_columns):
    train, test, text, label = data
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        for split, shards in (("train", train), ("test", test)):
            for i, t in enumerate(shards):
                pq.write_table(t, folder / f"{split}-{i:05d}-of-{len(shards):05d}.parquet")
        # AG News' public form (text/label, classes 0-3) or the user's named columns
        tc, lc = (text, label) if name_columns else (None, None)
        kind, _ = _outcome(folder, tc, lc)
        event(kind)  # the outcome mix, in --hypothesis-show-statistics
