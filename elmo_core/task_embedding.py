"""The task token embedding trained on the rows its train split can move, the rest held fixed.

Dense Adam over a (V, E) table moves only rows that have had a gradient: a row that never gets
one keeps zero moments, so its update is zero, and its weight average never leaves it. The rows
the train split cannot reach (vocabulary words it never uses, the padding row) are therefore
constants of training. ``RowSubsetEmbedding`` holds them in a buffer and trains the others as a
(K, E) parameter, so the gradient, Adam, clipping and the weight average of each step cover K
rows instead of V with the same per-element arithmetic (only the clipping norm's summation order
differs).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class RowSubsetEmbedding(nn.Module):
    """A (V, E) token table whose rows ``rows`` (K,) train as ``weight`` (K, E); the others are
    the fixed ``table`` rows. ``full_table()`` gives the (V, E) table back."""

    table: torch.Tensor  # (V, E) buffer
    rows: torch.Tensor  # (K,) buffer
    row_of: torch.Tensor  # (V,) buffer

    def __init__(self, table: torch.Tensor, rows: torch.Tensor, padding_idx: int | None) -> None:
        super().__init__()
        v = table.shape[0]
        self.padding_idx = padding_idx  # the full table's, for ``restore_full``
        rows = torch.as_tensor(rows, dtype=torch.long, device=table.device)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= v):
            raise ValueError(
                f"trained rows must lie in [0, {v}), got {int(rows.min())}..{int(rows.max())}"
            )
        row_of = torch.full((v,), -1, dtype=torch.long, device=table.device)
        row_of[rows] = torch.arange(len(rows), device=table.device)
        # constants of training, rebuilt with the module: not part of its state
        self.register_buffer("table", table.detach().clone(), persistent=False)  # (V, E)
        self.register_buffer("rows", rows.clone(), persistent=False)  # (K,)
        self.register_buffer("row_of", row_of, persistent=False)  # (V,): row in weight, or -1
        self.weight = nn.Parameter(table.detach()[rows].clone())  # (K, E)

    @property
    def num_embeddings(self) -> int:
        return int(self.table.shape[0])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) ids in [0, V) -> (B, T, E)."""
        r = self.row_of[tokens]  # (B, T): row of weight, -1 for a fixed row
        trained = F.embedding(r.clamp_min(0), self.weight)  # (B, T, E)
        if bool((r >= 0).all()):  # no padding or fixed row in the batch
            return trained
        return torch.where((r >= 0).unsqueeze(-1), trained, self.table[tokens])  # (B, T, E)

    @torch.no_grad()
    def full_table(self) -> torch.Tensor:
        """The (V, E) table: the fixed rows with the trained ones in place."""
        return self.table.index_copy(0, self.rows, self.weight)


def restrict_to_rows(head: nn.Module, tokens: np.ndarray | None) -> bool:
    """Swap ``head.embedding`` (a dense-gradient ``nn.Embedding``) for a ``RowSubsetEmbedding``
    training the rows of ``tokens`` (a train split's token ids, (N_tok,)), its padding row left
    out. A row-sparse table (its Adam is row-wise already), a frozen one, a head without one or
    a split without tokens stays as it is. Returns whether it swapped."""
    emb = getattr(head, "embedding", None)
    if tokens is None or not isinstance(emb, nn.Embedding) or emb.sparse:
        return False
    ids = np.unique(tokens)
    if emb.padding_idx is not None:
        ids = ids[ids != emb.padding_idx]
    if not len(ids) or not emb.weight.requires_grad:
        return False
    rows = torch.from_numpy(ids.astype(np.int64))
    head.embedding = RowSubsetEmbedding(emb.weight, rows, emb.padding_idx)
    return True


def restore_full(head: nn.Module) -> None:
    """Back to a plain ``nn.Embedding`` holding the full table (what checkpoints store)."""
    emb = getattr(head, "embedding", None)
    if isinstance(emb, RowSubsetEmbedding):
        table = emb.full_table()
        full = nn.Embedding(table.shape[0], table.shape[1], padding_idx=emb.padding_idx)
        with torch.no_grad():
            full.weight.copy_(table)
        head.embedding = full.to(table.device)
