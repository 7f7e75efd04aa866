"""Row-sparse ("lazy") Adam for the biLM's embedding and softmax rows.

The same update as ``torch.optim.SparseAdam`` — only the rows present in a step's sparse gradient
have their moments and values updated, with the bias correction of a per-parameter step count —
written with dense row gathers (index_select / index_copy_ / index_add_) instead of sparse-tensor
arithmetic. On this CPU that is ~3x cheaper per step (a 44k x 256 softmax, ~5.6k rows a step:
4.3 ms vs 13 ms), which matters because it runs on every biLM step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class LazyAdam(torch.optim.Optimizer):
    """Adam over the rows a sparse gradient touches. Parameters must receive sparse gradients."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if lr <= 0.0:
            raise ValueError(f"LazyAdam needs lr > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LazyAdam betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("LazyAdam takes sparse gradients; use Adam for dense ones")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                grad = p.grad.coalesce()
                rows = grad.indices()[0]  # (U,) distinct rows of this step
                g = grad.values()  # (U, *)
                m = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                bc1 = 1 - b1 ** state["step"]
                bc2 = 1 - b2 ** state["step"]
                denom = v.sqrt_().add_(eps)  # eps outside the bias correction, as SparseAdam
                p.index_add_(0, rows, m.div_(denom), alpha=-lr * math.sqrt(bc2) / bc1)
        return loss
