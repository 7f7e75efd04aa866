"""ELMo's published files: options.json and a weights HDF5 read into arrays (every problem
one ``PublishedFormatError`` naming the file), and written atomically. What the arrays mean
is ``elmo_core.published``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from elmo_core.checkpoint import atomic_file
from elmo_core.published import PublishedFormatError


def read_options(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        options = json.loads(Path(path).read_text())
    except OSError as e:
        raise PublishedFormatError(f"{path}: unreadable options ({e.strerror or e})") from e
    except json.JSONDecodeError as e:
        raise PublishedFormatError(f"{path}: options are not JSON ({e})") from e
    if not isinstance(options, dict):
        raise PublishedFormatError(f"{path}: options are not a JSON object")
    return options


def read_weights(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every dataset of the file by its path (``CNN/W_cnn_0``, ...)."""
    arrays: dict[str, np.ndarray] = {}

    def take(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            arrays[name] = obj[...]

    try:
        with h5py.File(path, "r") as f:
            f.visititems(take)
    except OSError as e:  # missing, truncated, not HDF5
        raise PublishedFormatError(f"{path}: unreadable HDF5 weights ({e})") from e
    return arrays


def write_elmo(
    folder: str | os.PathLike[str],
    options: dict,
    arrays: dict[str, np.ndarray],
    vocab: list[str] | None = None,
) -> None:
    """``options.json`` and ``weights.hdf5`` in ``folder``; for bilm-tf's token-input form
    (``vocab`` given) the token vectors go to ``embedding.hdf5`` and the words to
    ``vocab.txt``. Each file is written atomically."""
    folder = Path(folder)
    arrays = dict(arrays)
    with atomic_file(folder / "options.json") as f:
        f.write(json.dumps(options, indent=2).encode())
    if vocab is not None:
        with atomic_file(folder / "embedding.hdf5") as f, h5py.File(f, "w") as h:
            h.create_dataset("embedding", data=arrays.pop("embedding"))
        with atomic_file(folder / "vocab.txt") as f:
            f.write(("\n".join(vocab) + "\n").encode())
    with atomic_file(folder / "weights.hdf5") as f, h5py.File(f, "w") as h:
        for name, a in sorted(arrays.items()):
            h.create_dataset(name, data=a)


def read_vocab(path: str | os.PathLike[str]) -> list[str]:
    """A bilm-tf vocabulary file: one token per line."""
    try:
        return [t for t in Path(path).read_text(encoding="utf-8").splitlines() if t]
    except (OSError, UnicodeDecodeError) as e:
        raise PublishedFormatError(f"{path}: unreadable vocabulary ({e})") from e
