"""Row-sparse ("lazy") Adam for the biLM's embedding and softmax rows.

The update of ``torch.optim.SparseAdam`` — only the rows present in a step's sparse gradient have
their moments and values updated, with the bias correction of a per-parameter step count — done
as: gather the rows of the values and both moments, one fused Adam kernel over all parameters'
rows (``torch.optim.adam.adam(fused=True)``), scatter the three back. Sparse-tensor arithmetic
(SparseAdam) was several times slower, and an elementwise update on the gathered rows makes
more passes over them. It runs on every biLM step. (eps is added to the bias-corrected
root as in Adam, not to the raw root as in SparseAdam: a difference of order eps.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.adam import adam


class LazyAdam(torch.optim.Optimizer):
    """Adam over the rows a sparse gradient touches. Parameters must receive sparse gradients."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if lr <= 0.0:
            raise ValueError(f"LazyAdam needs lr > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LazyAdam betas must be in [0, 1), got {betas}")
        # fused: the kernel it runs; also makes load_state_dict put step counts on the
        # parameters' device, where the fused kernel needs them
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "fused": True})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]  # torch types closure loosely
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            touched, values, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("LazyAdam takes sparse gradients; use Adam for dense ones")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                grad = p.grad.coalesce()
                rows = grad.indices()[0]  # (U,) distinct rows of this step
                touched.append((p, state, rows))
                values.append(p.index_select(0, rows))  # (U, *)
                grads.append(grad.values())
                exp_avgs.append(state["exp_avg"].index_select(0, rows))
                exp_avg_sqs.append(state["exp_avg_sq"].index_select(0, rows))
                steps.append(state["step"])
            if not touched:
                continue
            b1, b2 = group["betas"]
            adam(
                values,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,  # incremented in place
                fused=True,
                amsgrad=False,
                beta1=b1,
                beta2=b2,
                lr=group["lr"],
                weight_decay=0.0,
                eps=group["eps"],
                maximize=False,
            )
            for (p, state, rows), v, m, s in zip(
                touched, values, exp_avgs, exp_avg_sqs, strict=True
            ):
                p.index_copy_(0, rows, v)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, s)
        return loss


def fused_adam(params: Any, **kwargs: Any) -> torch.optim.Adam:
    """torch's Adam, fused into one kernel per step (CPU and CUDA): far cheaper than the
    per-tensor loop for the biLM's LSTM weights; same update rule."""
    return torch.optim.Adam(params, fused=True, **kwargs)
