"""The classifier's optimizer side: Adam over its parameter groups (fused Adam for dense
parameters, the row-sparse ``LazyAdam`` for tables with row-sparse gradients) and gradient
clipping over both kinds of gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from elmo_core.classifier import FineTunedClassifier
from elmo_core.optim import LazyAdam, fused_adam


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``nn.utils.clip_grad_norm_`` over dense and row-sparse gradients (a sparse gradient is
    coalesced first: its norm is that of the summed rows). Returns the total norm."""
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    # a multiply by exactly 1 changes nothing: on a CPU skip the pass over every gradient (on an
    # accelerator the check would stall the step on a host sync, costlier than the multiply)
    if coef.device.type != "cpu" or bool(coef < 1.0):
        torch._foreach_mul_(grads, coef)
    return total


class Optimizers:
    """Adam over the classifier's groups: fused Adam for the dense parameters, the project's
    row-sparse Adam (``LazyAdam``) for tables with sparse gradients (the task token embedding).
    A group's learning rate is the same in both."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> None:
        dense: list[dict[str, Any]] = []
        sparse: list[dict[str, Any]] = []
        for g in groups:
            for kind, out in ((False, dense), (True, sparse)):
                params = [p for p in g["params"] if _is_sparse(p) == kind]
                if params:
                    out.append({**g, "params": params})
        self.all: list[torch.optim.Optimizer] = [
            fused_adam(dense, lr=lr, weight_decay=weight_decay)
        ]
        if sparse:
            self.all.append(LazyAdam(cast(Any, sparse), lr=lr))  # groups, as torch takes

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.all for g in o.param_groups]

    def zero_grad(self) -> None:
        for o in self.all:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.all:
            o.step()

    def warm_up(self, step: int, steps: int) -> None:
        """Linear warm-up: optimizer step ``step`` (0-based) of the first ``steps`` trains at
        ``(step + 1) / steps`` of each group's learning rate (its ``peak_lr``, kept in the group
        so that it travels with the optimizer's state through a checkpoint)."""
        for g in self.param_groups:
            peak = g.setdefault("peak_lr", g["lr"])
            g["lr"] = peak * min(1.0, (step + 1) / steps)

    def scale_lr(self, factor: float) -> None:
        """Every group's learning rate (and its warm-up target) times ``factor``."""
        for g in self.param_groups:
            g["lr"] *= factor
            if "peak_lr" in g:
                g["peak_lr"] *= factor

    def state_dict(self) -> list[dict[str, Any]]:
        return [o.state_dict() for o in self.all]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for o, st in zip(self.all, states, strict=True):
            o.load_state_dict(st)


def _is_sparse(p: torch.Tensor) -> bool:
    """Marked by ``mark_sparse_parameters``: the parameter's gradient is row-sparse."""
    return bool(getattr(p, "_row_sparse", False))


def mark_sparse_parameters(model: nn.Module) -> None:
    """Tag the weights of embeddings built with ``sparse=True`` (their gradients are sparse)."""
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.sparse:
            m.weight._row_sparse = True  # type: ignore[attr-defined]  # a marker attribute


def classifier_param_groups(
    model: nn.Module, lr: float, embedding_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Trainable parameters in Adam groups: the mix at ``lr * mix.lr_scale`` (its strategy's
    data), the task token embedding at ``lr * embedding_lr_scale``, everything else at ``lr``."""
    head = getattr(model, "head", model)  # a FineTunedClassifier's head, or the head itself
    mix = getattr(head, "mix", None)
    output_mix = getattr(head, "output_mix", None)
    special = [
        (mix, getattr(mix, "lr_scale", 1.0)),
        (output_mix, getattr(output_mix, "lr_scale", 1.0)),
        (getattr(head, "embedding", None), embedding_lr_scale),
    ]
    groups: list[dict[str, Any]] = []
    taken: set[int] = set()
    for module, scale in special:
        params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        if params:
            groups.append({"params": params, "lr": lr * scale})
            taken |= {id(p) for p in params}
    rest = [p for p in head.parameters() if p.requires_grad and id(p) not in taken]
    if head is not model:  # fine-tuning: one group per biLM layer, lr shrinking downwards
        tuned = cast(FineTunedClassifier, model)
        c = tuned.config
        for i, params in enumerate(tuned.bilm_groups()):
            groups.append({"params": params, "lr": lr * c.bilm_lr_scale / c.bilm_lr_decay**i})
    return [{"params": rest, "lr": lr}, *groups]
