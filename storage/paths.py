"""The home folder: where Parquet, checkpoints, caches and the MLflow store live.

Every name placed under it is checked so parameters or data can never point outside it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_HOME = ".elmo-news"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_name(name: str) -> str:
    """A single path component made only of safe characters; anything else is a ValueError."""
    if not isinstance(name, str) or not _SAFE.match(name) or ".." in name:
        raise ValueError(f"unsafe name for a file under the home folder: {name!r}")
    return name


class Home:
    """Layout: ``<root>/<stage>/<cache key>/...``, ``downloads/``, ``prefect-results/``, ``mlflow.db``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        root = root or os.environ.get("ELMO_NEWS_HOME") or DEFAULT_HOME
        self.root = Path(root).expanduser().resolve()

    def stage_dir(self, stage: str, key: str) -> Path:
        path = self.root / safe_name(stage) / safe_name(key)
        if self.root not in path.resolve().parents:
            raise ValueError(f"{path} escapes the home folder {self.root}")
        return path

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def prefect_results(self) -> Path:
        return self.root / "prefect-results"

    def mlflow_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temp file beside ``path``, fsync, rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def is_complete(stage_dir: Path) -> bool:
    """A stage folder counts only once its DONE marker (written last) exists."""
    return (stage_dir / "DONE").exists()


def mark_complete(stage_dir: Path) -> None:
    write_json(stage_dir / "DONE", {"ok": True})
