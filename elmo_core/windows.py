"""Language-model training windows: a token stream cut into fixed windows, read from
memory-mapped shards in a seeded, block-shuffled order of bounded memory."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


def make_windows(ids: np.ndarray, window: int) -> torch.Tensor:
    """A token stream (N,) -> non-overlapping windows (W, T) (the tail that does not fill one is dropped)."""
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"token stream of {len(ids)} ids is shorter than one window of {window}")
    return torch.from_numpy(np.ascontiguousarray(ids[: n * window], dtype=np.int64)).view(n, window)


class TokenWindows:
    """Training windows (W, T) over one or more token-id shards (numpy arrays, typically
    ``np.load(..., mmap_mode="r")``): nothing is copied until a batch is asked for, so a corpus
    of any size costs its page cache, not RAM. Windows never cross a shard's end (each shard's
    tail that does not fill one is dropped)."""

    def __init__(self, shards: Sequence[np.ndarray], window: int) -> None:
        self.shards = [s for s in shards if len(s) >= window]
        self.window = window
        counts = np.array([len(s) // window for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            total = sum(len(s) for s in shards)
            raise ValueError(f"token stream of {total} ids is shorter than one window of {window}")
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # (S+1,) first window per shard

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        """Windows ``idx`` (B,) → ids (B, T) int64."""
        idx_np = idx.numpy()
        shard = np.searchsorted(self.starts, idx_np, side="right") - 1
        out = np.empty((len(idx_np), self.window), dtype=np.int64)  # (B, T)
        for r, (s, w) in enumerate(zip(shard, idx_np - self.starts[shard], strict=True)):
            a = int(w) * self.window
            out[r] = self.shards[s][a : a + self.window]
        return torch.from_numpy(out)


SHUFFLE_BLOCK = 1 << 20  # windows per shuffle block: an epoch's order costs 8 MiB, any corpus size


def epoch_order(
    n: int, seed: int, epoch: int, block: int = SHUFFLE_BLOCK
) -> Iterator[torch.Tensor]:
    """The windows of one epoch in a seeded random order, block by block, in bounded memory:
    the full blocks of ``block`` windows in random order (the partial one last), each
    shuffled within. Up to ``block`` windows this is exactly ``randperm(n)``."""
    g = torch.Generator().manual_seed(seed * 1009 + epoch)
    if n <= block:
        yield torch.randperm(n, generator=g)
        return
    n_full = n // block
    for b in [*torch.randperm(n_full, generator=g).tolist(), *([n_full] if n % block else [])]:
        size = min(block, n - b * block)
        yield torch.randperm(size, generator=g) + b * block


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, start: int = 0, block: int = SHUFFLE_BLOCK
) -> Iterator[torch.Tensor]:
    """Batches of window indices of one epoch (``ceil(n / batch_size)`` of them), from batch
    ``start`` on: a resumed run gets the batches an uninterrupted one would have."""
    pending: list[torch.Tensor] = []
    have = 0
    skip = start * batch_size  # windows before the first batch wanted
    for part in epoch_order(n, seed, epoch, block):
        if skip >= len(part):
            skip -= len(part)
            continue
        part = part[skip:]
        skip = 0
        pending.append(part)
        have += len(part)
        while have >= batch_size:
            cat = torch.cat(pending)
            yield cat[:batch_size]
            rest = cat[batch_size:]
            pending, have = [rest], len(rest)
    if have:
        yield torch.cat(pending)
