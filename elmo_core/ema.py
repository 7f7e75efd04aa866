"""An exponential moving average of a model's weights that touches a row-sparse table's rows
only when they change.

Between two updates that touch a row of a sparse-gradient table (the classifier's task token
embedding), the row's value stays fixed, so the average's steps towards it compose into one:
``a <- c + (a - c) * prod(decays)``. The average catches a row up when the row is about to change
(``prepare``, before the optimizer step) and every row before anyone reads the average
(``sync``): the same average as updating every row every step, up to float rounding, at the
cost of the rows a batch touches instead of the whole V x E table.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """``module``: the averaged copy. Update ``u`` (``u >= 1``; update 0 copies the weights)
    moves each weight towards the trained one by ``1 - decay(u)``."""

    def __init__(self, model: nn.Module, decay: Callable[[int], float]) -> None:
        self.module = copy.deepcopy(model)
        self.decay = decay
        self.n_averaged = 0  # updates done, the copy included
        # log of the product of decays of updates 1..m at index m (float64: long runs)
        self._log_decay = [0.0]
        self._sparse = {
            f"{name}.weight"
            for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and m.sparse and m.weight.requires_grad
        }
        # per sparse table: the last update each row of the average includes
        self.synced: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}

    def _factor(self, lo: torch.Tensor, hi: int) -> torch.Tensor:
        """prod of decay(k) for k in (lo, hi], per row: (U,) float64."""
        while len(self._log_decay) <= hi:
            self._log_decay.append(self._log_decay[-1] + math.log(self.decay(len(self._log_decay))))
        table = torch.tensor(self._log_decay, dtype=torch.float64, device=lo.device)
        return torch.exp(table[hi] - table[lo])

    @torch.no_grad()
    def _catch_up(self, name: str, rows: torch.Tensor, current: torch.Tensor, upto: int) -> None:
        avg = self.module.get_parameter(name)
        factor = self._factor(self.synced[name][rows], upto).to(avg.dtype).unsqueeze(1)  # (U, 1)
        a, c = avg.index_select(0, rows), current.index_select(0, rows)  # (U, E)
        avg.index_copy_(0, rows, c.add_(a.sub_(c).mul_(factor)))
        self.synced[name][rows] = upto

    @torch.no_grad()
    def prepare(self, model: nn.Module) -> None:
        """Before the optimizer step: bring the rows it will change up to the last update, with
        the value they held since they were last touched."""
        self._pending = {}
        if self.n_averaged == 0:
            return
        for name in self._sparse:
            p = model.get_parameter(name)
            if p.grad is None:
                continue
            rows = p.grad.coalesce().indices()[0]  # (U,)
            self._catch_up(name, rows, p, self.n_averaged - 1)
            self._pending[name] = rows

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """After the optimizer step: the dense weights all move; a sparse table's touched rows."""
        params = dict(model.named_parameters())
        if self.n_averaged == 0:
            for name, a in self.module.named_parameters():
                a.copy_(params[name])
            self.synced = {
                n: torch.zeros(params[n].shape[0], dtype=torch.long, device=params[n].device)
                for n in self._sparse
            }
        else:
            weight = 1.0 - self.decay(self.n_averaged)
            for name, a in self.module.named_parameters():
                if name not in self._sparse:
                    a.lerp_(params[name], weight)
                elif name in self._pending:
                    rows = self._pending[name]
                    cur = params[name].index_select(0, rows)
                    a.index_copy_(0, rows, a.index_select(0, rows).lerp_(cur, weight))
                    self.synced[name][rows] = self.n_averaged
        self._pending = {}
        self.n_averaged += 1

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        """Every row up to the last update: call before reading ``module`` or saving."""
        if self.n_averaged == 0:
            return
        for name in self._sparse:
            stale = (self.synced[name] < self.n_averaged - 1).nonzero().squeeze(1)  # (U,)
            if len(stale):
                self._catch_up(name, stale, model.get_parameter(name), self.n_averaged - 1)

    def reset(self, model: nn.Module) -> None:
        """The trained weights were replaced (sent back to the best ones): the average starts
        from them, as a copy, its update count kept."""
        with torch.no_grad():
            for a, p in zip(self.module.parameters(), model.parameters(), strict=True):
                a.copy_(p)
        for name in self._sparse:
            self.synced[name].fill_(self.n_averaged - 1)

    def averaged_state(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "n_averaged": self.n_averaged,
            "synced": self.synced,
        }

    def load_averaged_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.n_averaged = int(state["n_averaged"])
        self.synced = dict(state["synced"])
