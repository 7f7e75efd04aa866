"""Content hashes for cache keys: files by their bytes, configs by canonical JSON, code by source."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | Path, pattern: str = "*") -> str:
    """Hash of the names and bytes of the files directly in a folder (sorted)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).glob(pattern)):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.name.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """Hash of canonical JSON (sorted keys): equal configs give equal keys."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def code_version(modules: Iterable[str]) -> str:
    """Hash of the source files of the given modules (``elmo_core.bilm`` ...), so editing one of
    them invalidates exactly the stages that list it."""
    h = hashlib.sha256()
    for mod in sorted(set(modules)):
        path = ROOT / (mod.replace(".", "/") + ".py")
        h.update(mod.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stage_key(stage: str, inputs: dict[str, str], config: Any, modules: Iterable[str]) -> str:
    """The cache key of a stage: its input content hashes, its config and its code version."""
    return hash_json(
        {"stage": stage, "inputs": inputs, "config": config, "code": code_version(modules)}
    )[:24]
