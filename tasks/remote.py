"""Stage: a labelled dataset on an object store (``s3://bucket/prefix``) -> a local copy."""

from __future__ import annotations

from prefect import task

from storage.paths import Home
from storage.remote import fetch_object_store


@task(name="fetch-object-store", retries=3, retry_delay_seconds=[2, 10, 30])
def fetch_remote(data: str, home: str) -> str:
    """The files under the prefix, copied once into the home's downloads (re-copied only
    when an object changed); ingestion then reads the folder like any local one."""
    return str(fetch_object_store(data, Home(home).downloads))
