"""Labelled-data stages: fetch a source, ingest it into validated Parquet (the stage folder's
path is what the task returns). Pretraining text is ``tasks.corpus``."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import task

from storage.datasets import rows_table, write_parquet
from storage.download import fetch_source
from storage.errors import DataError
from storage.hashing import sha256_dir, sha256_file
from storage.paths import Home, read_json, write_json
from storage.quarantine import quarantine_table
from storage.readers import read_source
from storage.splits import check_usable, plan_splits
from tasks.common import logger
from tasks.stage import StageContext, stage


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


@task(name="fetch-data", retries=3, retry_delay_seconds=[2, 10, 30])
def fetch_data(data: str, home: str) -> str:
    """A local folder for ``data``: URLs are downloaded once (checksum-checked) into the home."""
    return str(fetch_source(data, Home(home).downloads))


def source_hash(source: str) -> str:
    p = Path(source)
    if not p.exists():
        raise DataError(f"{p}: data folder or file does not exist")
    return sha256_dir(p) if p.is_dir() else sha256_file(p)


INGEST = stage("ingest", __name__, inputs={"source": source_hash}, config=["config"])


@INGEST.task(name="ingest")
def ingest(source: str, config: IngestConfig, ctx: StageContext) -> str:
    """Validate rows, quarantine bad ones, carve a stratified validation split, write Parquet."""
    return INGEST.build(locals(), lambda d: _build_ingest(source, d, config))


def _read(source: str, config: IngestConfig, keep: bool) -> tuple[dict, list[str], dict]:
    """The source read under the ingestion's rules, and each split's row indices."""
    splits, classes = read_source(
        Path(source), list(config.text_columns) or None, config.label_column or None, keep
    )
    check_usable(splits, source)
    plan = plan_splits(
        splits["train"].labels,
        splits["test"].labels,
        classes,
        config.val_fraction,
        config.seed,
        config.limit_train,
        config.limit_test,
        source,
    )
    return splits, classes, plan


def preflight(source: str, config: IngestConfig) -> dict[str, Any]:
    """Everything ingestion would refuse, found by the same rules without tokenising or
    writing anything: raises DataError naming the file, column or class; returns the counts."""
    splits, classes, plan = _read(source, config, keep=False)
    counts = {
        name: Counter(splits["test" if name == "test" else "train"].labels[i] for i in idx)
        for name, idx in plan.items()
    }
    return {
        "classes": len(classes),
        "rows": {name: len(idx) for name, idx in plan.items()},
        "quarantined": {name: len(rows.quarantine) for name, rows in splits.items()},
        "smallest_class_train": min(counts["train"].values()),
    }


@task(name="preflight-data")
def preflight_data(source: str, config: IngestConfig, shown: str = "") -> dict[str, Any]:
    """The flow's first check of the data (deployments start here, not at the CLI); errors
    name ``shown`` (the URL the user gave) instead of its download folder."""
    try:
        report = preflight(source, config)
    except DataError as e:
        if not shown or shown == source:
            raise
        raise DataError(str(e).replace(source, shown)) from e
    logger().info("preflight %s: %s", source, report)
    return report


def _build_ingest(source: str, out: Path, config: IngestConfig) -> None:
    splits, classes, plan = _read(source, config, keep=True)
    stats: dict[str, float] = {}
    quarantine: list[dict] = []
    for name, rows in splits.items():
        stats[f"rows_in_{name}"] = rows.rows_in
        stats[f"rows_accepted_{name}"] = len(rows.rows)
        stats[f"rows_quarantined_{name}"] = len(rows.quarantine)
        stats[f"rows_duplicate_{name}"] = rows.duplicates
        quarantine += rows.quarantine
    for name, idx in plan.items():
        rows = splits["test" if name == "test" else "train"].rows
        write_parquet(rows_table([rows[i] for i in idx], name), out / f"{name}.parquet")
        stats[f"rows_{name}"] = len(idx)
    write_parquet(quarantine_table(quarantine), out / "quarantine.parquet")
    write_json(out / "labels.json", classes)
    write_json(out / "metrics.json", stats)
    write_json(out / "config.json", asdict(config))
    logger().info("ingest %s: %s", source, stats)


def dataset_stats(dataset: str) -> dict[str, float]:
    return read_json(Path(dataset) / "metrics.json")
