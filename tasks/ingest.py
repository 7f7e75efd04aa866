"""Labelled-data stages: fetch a source, ingest it into validated Parquet (the stage folder's
path is what the task returns). Pretraining text is ``tasks.corpus``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task
from sklearn.model_selection import train_test_split

from storage.datasets import rows_table, write_parquet
from storage.download import fetch_source
from storage.errors import DataError
from storage.hashing import sha256_dir, sha256_file
from storage.paths import Home, read_json, write_json
from storage.quarantine import quarantine_table
from storage.readers import read_source
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


def _stratified_limit(rows: list[dict], limit: int, seed: int) -> list[dict]:
    if not limit or limit >= len(rows):
        return rows
    labels = [r["label"] for r in rows]
    keep, _ = train_test_split(rows, train_size=limit, stratify=labels, random_state=seed)
    return sorted(keep, key=lambda r: r["id"])


@INGEST.task(name="ingest")
def ingest(source: str, config: IngestConfig, ctx: StageContext) -> str:
    """Validate rows, quarantine bad ones, carve a stratified validation split, write Parquet."""
    return INGEST.build(locals(), lambda d: _build_ingest(source, d, config))


def _build_ingest(source: str, out: Path, config: IngestConfig) -> None:
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
            raise DataError(f"{source}: no usable {name} rows ({len(rows.quarantine)} quarantined)")
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


def dataset_stats(dataset: str) -> dict[str, float]:
    return read_json(Path(dataset) / "metrics.json")
