"""What the classifier's loop reads documents through: batches of precomputed biLM layers.

``storage.layers.LayerStore`` implements it over files; the loop only needs these methods, so
model code never learns where the rows live."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch


class DocumentBatches(Protocol):
    labels: np.ndarray  # (N,) int64 class ids (or -1 when unknown)
    tokens: np.ndarray | None  # (N_tok,) vocabulary ids of every document's tokens, or None

    def __len__(self) -> int: ...

    def batch(
        self, idx: np.ndarray
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Documents idx -> layers (L, B, T, D) float32 (None: tokens only), mask (B, T) bool,
        token ids (B, T), labels (B,)."""
        ...

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[np.ndarray]:
        """Length-bucketed batches of document indices, shuffled if a generator is given."""
        ...
