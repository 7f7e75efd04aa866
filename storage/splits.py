"""From a source's accepted rows to train / validation / test: the stratified row limits and
the stratified validation split. The rules they need are checked first, so a dataset they
cannot serve fails in one sentence naming the split, the class and the count; ingestion and
the preflight both go through here, so they cannot disagree."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from sklearn.model_selection import train_test_split

from storage.errors import DataError
from storage.readers import SplitRows


def check_usable(splits: Mapping[str, SplitRows], source: str) -> None:
    """Every split keeps at least one row after quarantine."""
    for name, rows in splits.items():
        if not rows.accepted:
            why = f": {rows.top_reasons()}" if rows.quarantine else ""
            raise DataError(
                f"{source}: no usable {name} rows ({len(rows.quarantine)} of {rows.rows_in} "
                f"quarantined{why})"
            )


def _stratified(
    idx: list[int],
    labels: Sequence[int],
    names: Sequence[str],
    n_first: int,
    what: str,
    split: str,
    source: str,
    seed: int,
) -> tuple[list[int], list[int]]:
    """Stratified cut of ``idx`` into ``n_first`` rows and the rest (each sorted), after the
    checks scikit-learn's stratified split needs, worded for the user. A class with a single
    document cannot be stratified: that document stays in the first part (train, or the
    limited sample), so a rare class is learned from, never validated on."""
    counts = Counter(labels[i] for i in idx)
    single = [i for i in idx if counts[labels[i]] == 1]
    idx = [i for i in idx if counts[labels[i]] > 1]
    n_first = max(n_first - len(single), 0)
    sub = [labels[i] for i in idx]
    counts = Counter(sub)
    n_rest = len(idx) - n_first
    if min(n_first, n_rest) < max(len(counts), 1):
        raise DataError(
            f"{source}: {what} would hold {min(n_first, n_rest)} of {len(idx)} {split} rows "
            f"(classes of one document aside), fewer than the {len(counts)} classes it must "
            "stratify: use more rows or change ingest.val_fraction / the row limits"
        )
    first, rest = train_test_split(
        idx, train_size=n_first, test_size=n_rest, stratify=sub, random_state=seed
    )
    return sorted([*first, *single]), sorted(rest)


def plan_splits(
    train_labels: Sequence[int],
    test_labels: Sequence[int],
    names: Sequence[str],
    val_fraction: float,
    seed: int,
    limit_train: int,
    limit_test: int,
    source: str,
) -> dict[str, list[int]]:
    """Row indices (into the accepted train and test rows, ascending) of each split: the
    stratified limits (0 = all), then a stratified ``val_fraction`` of train for validation."""
    distinct = sorted(set(train_labels))
    if len(distinct) < 2:
        only = f" ({names[distinct[0]]!r})" if distinct else ""
        raise DataError(
            f"{source}: the train split holds one class only{only}; a classifier needs at least two"
        )
    train = list(range(len(train_labels)))
    test = list(range(len(test_labels)))
    if 0 < limit_train < len(train):
        train, _ = _stratified(
            train, train_labels, names, limit_train, "ingest.limit_train", "train", source, seed
        )
    if 0 < limit_test < len(test):
        test, _ = _stratified(
            test, test_labels, names, limit_test, "ingest.limit_test", "test", source, seed
        )
    n_val = math.ceil(val_fraction * len(train))  # scikit-learn's rounding of a test fraction
    within = "train" if len(train) == len(train_labels) else "train (in the limited sample)"
    rest, val = _stratified(
        train,
        train_labels,
        names,
        len(train) - n_val,
        "the stratified validation split",
        within,
        source,
        seed,
    )
    return {"train": rest, "val": val, "test": test}
