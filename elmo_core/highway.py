"""A highway layer (Srivastava et al. 2015), as ELMo's character encoder uses it."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Highway(nn.Module):
    """y = g * relu(W x) + (1 - g) * x, g = sigmoid(W_g x) (Srivastava et al. 2015); the gate
    bias starts negative so each layer starts close to the identity (as ELMo's)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        with torch.no_grad():
            self.linear.bias[dim:].fill_(-2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> (N, D)."""
        h, g = self.linear(x).chunk(2, dim=-1)  # (N, D) each
        g = torch.sigmoid(g)
        return g * F.relu(h) + (1 - g) * x
