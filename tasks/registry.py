"""Register the best strategy's classifier and apply the champion gate (never cached)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from storage.datasets import read_dataset
from storage.paths import Home, read_json
from storage.registry import register_and_gate, resolve_bilm


@task(name="register-model")
def register_best(
    uri: str,
    parent_run_id: str,
    model_run_id: str,
    classifier_dir: str,
    bilm_dir: str,
    dataset: str,
) -> dict[str, Any]:
    val = read_dataset(Path(dataset) / "val.parquet")
    return register_and_gate(
        uri,
        parent_run_id,
        model_run_id,
        Path(classifier_dir).name,
        Path(dataset).name,
        Path(bilm_dir) / "bilm.pt",
        Path(classifier_dir) / "model.pt",
        val["text"].to_list(),
        val["label"].to_numpy(),
        read_json(Path(dataset) / "labels.json"),
    )


@task(name="fetch-bilm")
def fetch_bilm(ref: str, home: str) -> tuple[str, dict[str, str]]:
    """A ``--bilm`` reference → its complete stage folder in the home (downloaded from the
    registry once) and the tags that record where it came from."""
    h = Home(home)
    path, info = resolve_bilm(ref, h.root / "bilm")
    return str(path), info
