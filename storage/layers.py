"""Stored biLM layers: a float16 row file read and written by row ranges, the flat
per-token layer store the classifiers batch from, and an in-memory one for inference."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


class RowFile:
    """A (N, ...) float16 ``.npy`` file read and written by row ranges with pread / pwrite.

    The stored layers of a large dataset are many GB: a memory map of them counts every page
    it touched in the process's resident memory, these reads go through the page cache only,
    so the classifier's memory stays bounded by its batches."""

    def __init__(self, path: Path, shape: tuple[int, ...] | None = None) -> None:
        self.path = Path(path)
        if shape is not None:  # create: header, then the file extended to its full size
            self.shape = tuple(int(x) for x in shape)
            self.dtype = np.dtype(np.float16)
            with open(self.path, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f,
                    {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                     "shape": self.shape},
                )  # fmt: skip
                self.header = f.tell()
                f.truncate(self.header + int(np.prod(self.shape)) * self.dtype.itemsize)
            self._fd = os.open(self.path, os.O_RDWR)
        else:
            # the header only: a map that is never read adds nothing to resident memory
            m = np.load(self.path, mmap_mode="r")
            if not m.flags.c_contiguous:
                raise ValueError(f"{self.path}: Fortran-ordered arrays are not supported")
            self.shape, self.dtype, self.header = tuple(m.shape), m.dtype, int(m.offset)
            del m
            self._fd = os.open(self.path, os.O_RDONLY)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _range(self, key: slice) -> tuple[int, int]:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"RowFile takes contiguous row slices, got {key!r}")
        lo, hi, _ = key.indices(self.shape[0])
        return lo, max(lo, hi)

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi = self._range(key)
        raw = os.pread(self._fd, (hi - lo) * self.row_bytes, self.header + lo * self.row_bytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape(hi - lo, *self.shape[1:])

    def __setitem__(self, key: slice, value: np.ndarray) -> None:
        lo, hi = self._range(key)
        data = np.ascontiguousarray(value, dtype=self.dtype)
        if data.shape != (hi - lo, *self.shape[1:]):
            raise ValueError(
                f"rows {lo}:{hi} take shape {(hi - lo, *self.shape[1:])}, got {data.shape}"
            )
        os.pwrite(self._fd, data.tobytes(), self.header + lo * self.row_bytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


@dataclass
class LayerStore:
    """Precomputed biLM layers of a document set, flat over tokens (no padding stored).

    With ``static`` set, ``features`` holds the contextual layers 1..L only and layer 0 (the
    biLM's context-free token vector) comes from ``static[static_rows]``: one row per
    distinct token instead of one per occurrence."""

    # (N_tok, L+1, D) float16 (or (N_tok, L, D) with ``static``): an array, a memmap or a
    # RowFile; None: tokens only (fine-tuning)
    features: Any
    offsets: np.ndarray  # (N+1,) int64 row offsets per document
    labels: np.ndarray  # (N,) int64 class ids (or -1 when unknown)
    tokens: np.ndarray | None = None  # (N_tok,) int32 vocabulary ids of the same tokens
    static: np.ndarray | None = None  # (U, D) float16 layer 0 of each distinct token
    static_rows: np.ndarray | None = None  # (N_tok,) int32 row of static per token

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def layer_shape(self) -> tuple[int, int]:
        """(L+1, D) of every token's layers, layer 0 included however it is stored."""
        _, n, d = self.features.shape
        return n + (self.static is not None), d

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Tokens lo..hi -> their layers (hi-lo, L+1, D) float16, layer 0 included."""
        x = np.asarray(self.features[lo:hi])  # (n, L or L+1, D)
        if self.static is None:
            return x
        assert self.static_rows is not None
        first = self.static[self.static_rows[lo:hi]][:, None]  # (n, 1, D)
        return np.concatenate([first, x], axis=1)  # (n, L+1, D)

    def batch(
        self, idx: np.ndarray
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Documents idx -> layers (L, B, T, D) float32 (None without features), mask (B, T)
        bool, token ids (B, T) (zeros when the store has none), labels (B,)."""
        lens = self.offsets[idx + 1] - self.offsets[idx]
        t = int(lens.max())
        mask = torch.from_numpy(np.arange(t)[None, :] < lens[:, None])  # (B, T)
        ids = np.zeros((len(idx), t), dtype=np.int64)  # (B, T)
        if self.tokens is not None:
            for r, i in enumerate(idx):
                ids[r, : lens[r]] = self.tokens[self.offsets[i] : self.offsets[i + 1]]
        labels = torch.from_numpy(self.labels[idx])
        if self.features is None:  # tokens only: a fine-tuned biLM computes the layers
            return None, mask, torch.from_numpy(ids), labels
        n_layers, d = self.layer_shape
        # gathered in the stored dtype (plain copies), then widened to float32 by one vectorised
        # torch conversion: numpy's per-document float16 -> float32 assignments took most of a
        # batch's read
        kinds = [self.features.dtype] + ([self.static.dtype] if self.static is not None else [])
        x = np.zeros((len(idx), t, n_layers, d), dtype=np.result_type(*kinds))  # (B, T, L, D)
        first = int(self.static is not None)  # layer 0 from the table, the rest from features
        for r, i in enumerate(idx):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            x[r, : lens[r], first:] = self.features[lo:hi]
            if self.static is not None and self.static_rows is not None:
                x[r, : lens[r], 0] = self.static[self.static_rows[lo:hi]]
        layers = torch.from_numpy(x).float().permute(2, 0, 1, 3)  # (L, B, T, D)
        return layers, mask, torch.from_numpy(ids), labels

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[np.ndarray]:
        """Length-bucketed batches of document indices; shuffled (batches and members) if a generator is given."""
        lens = np.diff(self.offsets)
        if generator is None:
            order = np.argsort(lens, kind="stable")
        else:
            noise = torch.rand(len(lens), generator=generator).numpy()
            order = np.lexsort((noise, lens))  # by length, random among equal lengths
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if generator is not None:
            perm = torch.randperm(len(chunks), generator=generator).tolist()
            chunks = [chunks[p] for p in perm]
        yield from chunks
