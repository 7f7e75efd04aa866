"""Register the best strategy's classifier and apply the champion gate (never cached)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task

from storage.datasets import read_dataset
from storage.paths import Home, read_json
from storage.registry import register_and_gate, resolve_bilm

REGISTRY_LIMIT = "elmo-news-registry"  # a Prefect global concurrency limit of 1


def ensure_registry_limit(client: Any) -> None:
    """Create the ``elmo-news-registry`` limit (1 slot) on the Prefect server if missing; a
    concurrent creation by another run is fine."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.read_global_concurrency_limit_by_name(REGISTRY_LIMIT)
    except ObjectNotFound:
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=REGISTRY_LIMIT, limit=1)
            )
        except ObjectAlreadyExists:
            pass


@contextmanager
def registry_slot(timeout_s: float = 900, lease_s: float = 600) -> Iterator[None]:
    """Hold the registry for a read-decide-write (register once per key; compare with the
    champion, move the alias). Against a tracking server, a local file lock guarantees
    nothing: the slot is one of the Prefect server's ``elmo-news-registry`` global concurrency
    limit (limit 1), which every run and worker that shares the Prefect server shares. (The
    embedded server of a lone ``elmo-news run`` is its own; a local sqlite store is also
    serialised by its file lock.)

    The lease (``lease_s``, far above the step's ~10 s) frees the slot if this process dies
    holding it. A fresh client per call, on the server the current settings name: Prefect's
    own slot service keeps the first server it talked to for the process's life."""
    import time

    import httpx
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        ensure_registry_limit(client)
        while True:
            try:
                resp = client.increment_concurrency_slots_with_lease(
                    [REGISTRY_LIMIT], 1, "concurrency", lease_s
                )
                lease_id = resp.json()["lease_id"]
                break
            except httpx.HTTPStatusError as e:
                if e.response.status_code != 423 or time.monotonic() > deadline:
                    raise
                time.sleep(min(float(e.response.headers.get("Retry-After", 1)), 5.0))
    try:
        yield
    finally:
        from uuid import UUID

        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(UUID(str(lease_id)))


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
    with registry_slot():
        return register_and_gate(
            uri,
            parent_run_id,
            model_run_id,
            Path(classifier_dir).name,
            Path(dataset).name,
            # a classifier that fine-tuned its biLM keeps that biLM beside its head
            next(
                p
                for p in (Path(classifier_dir) / "bilm.pt", Path(bilm_dir) / "bilm.pt")
                if p.exists()
            ),
            Path(classifier_dir) / "model.pt",
            val["text"].to_list(),
            val["label"].to_numpy(),
            read_json(Path(dataset) / "labels.json"),
        )


@task(name="fetch-bilm")
def fetch_bilm(ref: str, home: str) -> tuple[str, dict[str, str]]:
    """A ``--bilm`` reference → its complete stage folder in the home (downloaded from the
    registry once) and the tags that record where it came from. A ``models:/`` URI is looked
    up in the home's own MLflow store (``MLFLOW_TRACKING_URI`` wins), whoever calls the flow."""
    h = Home(home)
    path, info = resolve_bilm(ref, h.root / "bilm", h.mlflow_uri())
    return str(path), info
