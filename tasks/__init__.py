"""Thin Prefect tasks: they pass paths, derive cache keys from content, and call elmo_core/storage."""
