"""Checkpoints = config + state_dict + vocab, written atomically and read with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, or not one of ours."""


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A file to write in place of ``path``: a temp file beside it, fsynced and renamed over
    it when the block ends, removed if the block raises. Readers never see a partial file.
    The one atomic write of the project (checkpoints, JSON, Parquet, id shards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save, atomically."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def safe_load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """torch.load with weights_only=True; anything unreadable raises CheckpointError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} does not exist") from e
    except Exception as e:  # truncated zip, pickle with globals, ...
        raise CheckpointError(f"checkpoint {path} is unreadable or unsafe: {e}") from e
    if not isinstance(obj, dict) or "kind" not in obj:
        raise CheckpointError(f"checkpoint {path} is not an elmo-news checkpoint")
    return obj


def config_from(cls: type, d: dict[str, Any]) -> Any:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
