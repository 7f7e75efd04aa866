"""Data-parallel biLM training across processes started by ``torchrun``.

Every rank computes the same global batch order and takes its own contiguous slice of each
global batch (``shard_batch``), so N ranks see exactly the windows one process would. The dense
parameters (LSTMs, projection) are averaged by ``DistributedDataParallel``; the row-sparse ones
(embedding, softmax rows: a different set of rows on every rank) are averaged by an all-gather
of each rank's touched rows, summed where rows repeat (``all_reduce_sparse_rows``): the
gathered rows are what a step touched (a few thousand of V), never the whole table. Negatives
come from a generator seeded identically on every rank, so the shared sampled-softmax
negatives are the ones the single process would draw. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0  # this process's global rank
    world_size: int = 1  # ranks in total
    local_rank: int = 0  # rank on this node (its GPU index on CUDA)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()


def init_from_env(device_type: str = "cpu", timeout_s: float = 600.0) -> DistContext:
    """The process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), or SINGLE when not launched by torchrun."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))


def check_batch(batch_size: int, ctx: DistContext) -> None:
    if batch_size % ctx.world_size:
        raise ValueError(
            f"pretrain batch_size {batch_size} must be divisible by the {ctx.world_size} ranks"
        )


def shard_batch(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (B, T) -> (B / world, T)."""
    if not ctx.active:
        return x
    per = x.shape[0] // ctx.world_size
    return x[ctx.rank * per : (ctx.rank + 1) * per]


class _LMLoss(nn.Module):
    """The biLM's training loss as a module forward, so DDP's hooks see it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.model.lm_loss(x, generator)  # type: ignore[operator]  # a BiLM's own loss


def ddp_loss(
    model: nn.Module, sparse: Sequence[torch.Tensor], ctx: DistContext
) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """``lm_loss`` through DistributedDataParallel (dense gradients averaged in backward);
    the ``sparse`` parameters are left to ``all_reduce_sparse_rows``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    wrapper = _LMLoss(model)
    ids = {id(p) for p in sparse}
    ignore = [n for n, p in wrapper.named_parameters() if id(p) in ids]
    DDP._set_params_and_buffers_to_ignore_for_model(wrapper, ignore)
    on_cuda = next(model.parameters()).device.type == "cuda"
    return DDP(
        wrapper,
        device_ids=[ctx.local_rank] if on_cuda else None,
        forward_sync_buffers=False,  # the proposal buffer is identical on every rank
    )


def all_reduce_sparse_rows(params: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Average row-sparse gradients over ranks: gather every rank's (rows, values), sum the
    rows that repeat, divide by the world size. Afterwards every rank holds the same coalesced
    gradient, so every rank's row-sparse Adam makes the same update."""
    if not ctx.active:
        return
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.coalesce()
        rows, vals = g.indices()[0], g.values()  # (U,), (U, *)
        n = torch.tensor([rows.numel()], device=rows.device)
        sizes = [torch.zeros_like(n) for _ in range(ctx.world_size)]
        dist.all_gather(sizes, n)
        m = int(max(int(s) for s in sizes))
        pad_rows = rows.new_zeros(m)
        pad_rows[: rows.numel()] = rows
        pad_vals = vals.new_zeros((m, *vals.shape[1:]))
        pad_vals[: rows.numel()] = vals
        all_rows = [torch.empty_like(pad_rows) for _ in range(ctx.world_size)]
        all_vals = [torch.empty_like(pad_vals) for _ in range(ctx.world_size)]
        dist.all_gather(all_rows, pad_rows)
        dist.all_gather(all_vals, pad_vals)
        k = [int(s) for s in sizes]
        r = torch.cat([a[:c] for a, c in zip(all_rows, k, strict=True)])  # (ΣU,)
        v = torch.cat([a[:c] for a, c in zip(all_vals, k, strict=True)]) / ctx.world_size
        p.grad = torch.sparse_coo_tensor(
            r.unsqueeze(0), v, p.shape, check_invariants=False
        ).coalesce()  # indices come from valid gradients: in range by construction


def gather_objects(obj: object, ctx: DistContext) -> list[object]:
    """Every rank's ``obj`` (a collective: all ranks call it), in rank order."""
    if not ctx.active:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
