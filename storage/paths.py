"""The home folder: where Parquet, checkpoints, caches and the MLflow store live.

Every name placed under it is checked so parameters or data can never point outside it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from elmo_core.checkpoint import atomic_file
from storage.errors import HomeError

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

    @property
    def runs(self) -> Path:
        """One summary JSON per finished flow run, named by its MLflow parent run id."""
        return self.root / "runs"

    def latest_run(self) -> dict[str, Any]:
        """The summary of the most recently finished run (stage folders, metrics, run ids)."""
        summaries = sorted(self.runs.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not summaries:
            raise ValueError(f"no finished run under {self.runs}: run `elmo-news run` first")
        return read_json(summaries[-1])

    def mlflow_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    def check_writable(self) -> None:
        """The home is (or can become) a folder this process writes; HomeError otherwise."""
        existing = next((p for p in [self.root, *self.root.parents] if p.exists()), None)
        if existing is not None and not existing.is_dir():
            what = "the home" if existing == self.root else f"its parent {existing}"
            raise HomeError(f"{self.root}: {what} is a file, not a folder")
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise HomeError(f"{self.root}: home folder is not writable ({existing})")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Readers never see a partial file (``atomic_file``)."""
    with atomic_file(path) as f:
        f.write(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


HASH_LIMIT = 256 * 1024 * 1024  # files up to this size are checked by sha256, larger by size


def _manifest_entry(path: Path) -> dict[str, Any]:
    from storage.hashing import sha256_file

    size = path.stat().st_size
    return {"size": size, "sha256": sha256_file(path) if size <= HASH_LIMIT else None}


def mark_complete(stage_dir: Path) -> None:
    """Write the DONE manifest (size and, for files up to 256 MiB, sha256 of every output) last:
    a stage folder without a valid manifest is never used."""
    files = {
        p.name: _manifest_entry(p)
        for p in sorted(stage_dir.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in ("DONE", "mlflow_source.json")
    }
    write_json(stage_dir / "DONE", {"files": files})


def verify_complete(stage_dir: Path) -> tuple[bool, str]:
    """(True, "") when the folder's outputs match its manifest, else (False, why)."""
    done = stage_dir / "DONE"
    if not done.exists():
        return False, f"{stage_dir} has no DONE manifest"
    try:
        files = read_json(done)["files"]
    except Exception as e:
        return False, f"{done} is unreadable: {e}"
    for name, want in files.items():
        p = stage_dir / name
        if not p.exists():
            return False, f"{p} is missing"
        got = p.stat().st_size
        if got != want["size"]:
            return False, f"{p} has {got} bytes, expected {want['size']}"
        if want.get("sha256"):
            from storage.hashing import sha256_file

            if sha256_file(p) != want["sha256"]:
                return False, f"{p} fails its sha256 check"
    return True, ""


def is_complete(stage_dir: Path) -> bool:
    return verify_complete(stage_dir)[0]


@contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """An exclusive, cross-process lock for ``target`` (flock on a hidden file beside it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stage_lock(stage_dir: Path) -> AbstractContextManager[None]:
    """Concurrent runs of the same stage wait for each other; the second then finds the first
    one's complete output."""
    return file_lock(stage_dir)


def clear_incomplete(stage_dir: Path) -> None:
    """Remove a stage folder whose outputs do not match their manifest (keeps resumable
    training checkpoints, which are verified on their own when loaded)."""
    if stage_dir.exists() and not is_complete(stage_dir):
        (stage_dir / "DONE").unlink(missing_ok=True)
        for p in stage_dir.iterdir():
            if p.is_file() and p.name != "train_state.pt":
                p.unlink()


def build_stage(stage_dir: Path, build: Callable[[Path], Any]) -> str:
    """The protocol every stage follows, written once: lock the folder (concurrent runs of
    the same stage wait for each other) → already complete? use it → clear what an
    interrupted build left (resumable ``train_state.pt`` excepted) → ``build(stage_dir)`` →
    manifest (DONE) last. ``build`` may call ``mark_complete`` itself when something must
    follow it (a tracking run that records the finished folder); a complete folder is never
    marked again. Returns the folder as a string (what tasks pass on)."""
    with stage_lock(stage_dir):
        if is_complete(stage_dir):
            return str(stage_dir)
        clear_incomplete(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        build(stage_dir)
        if not (stage_dir / "DONE").exists():  # build did not mark it itself
            mark_complete(stage_dir)
        return str(stage_dir)


SPLITS = ("train", "val", "test")  # an ingested dataset's splits


def split_files(dataset: str) -> dict[str, Path]:
    """An ingested dataset's split files by split name (the MLflow dataset inputs of a run)."""
    return {s: Path(dataset) / f"{s}.parquet" for s in SPLITS}


def stage_id(stage_dir: str) -> str:
    """The content address of a stage folder (its cache key = its folder name)."""
    return Path(stage_dir).name
