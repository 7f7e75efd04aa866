"""Layer-combination strategies: how the biLM's L layers become one vector per token.

A strategy is data — its initial layer weights, whether they train, or a function module — and
``build_mix`` turns that data into a module. No call site branches on the strategy's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from elmo_core.classifier_config import MixConfig


class ScalarMix(nn.Module):
    """ELMo's scalar mix: ``gamma * sum_k softmax(w)_k * h_k``.

    ``trainable=False`` freezes both ``w`` and ``gamma`` (the fixed-weight `sum` strategy).
    """

    def __init__(self, init_logits: torch.Tensor, trainable: bool) -> None:
        super().__init__()
        self.weights = nn.Parameter(init_logits.clone().float(), requires_grad=trainable)
        self.gamma = nn.Parameter(torch.ones(1), requires_grad=trainable)

    def layer_weights(self) -> torch.Tensor:
        """The normalised layer weights (L,)."""
        return torch.softmax(self.weights, dim=0)

    def forward(self, layers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """layers (L, B, T, D), mask (B, T) unused -> (B, T, D).

        A weighted sum in the layers' own dtype, outside autocast: under bf16 autocast the
        einsum became a cast copy of every layer and a bmm of awkward shapes."""
        with torch.autocast(layers.device.type, enabled=False):
            w = (self.gamma * self.layer_weights()).to(layers.dtype)  # (L,)
            out = layers[0] * w[0]  # (B, T, D)
            for k in range(1, layers.shape[0]):
                out = out.add_(layers[k] * w[k])
            return out


class FunctionMix(nn.Module):
    """A learned ``tanh(Linear([h_0; ...; h_{L-1}]))``: (L*D) -> D per token.

    The Linear starts as the plain layer average ``[I/L, ..., I/L]`` plus small noise, so training
    starts from what the fixed-weight mix already gives and learns cross-layer terms from there;
    a default (Kaiming) start scrambles the biLM's dimensions and overfits the small train split.
    """

    def __init__(self, num_layers: int, dim: int, seed: int = 0, noise: float = 0.01) -> None:
        super().__init__()
        self.linear = nn.Linear(num_layers * dim, dim)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            eye = torch.eye(dim) / num_layers  # (D, D)
            self.linear.weight.copy_(torch.cat([eye] * num_layers, dim=1))  # (D, L*D)
            self.linear.weight.add_(noise * torch.randn(dim, num_layers * dim, generator=g))
            self.linear.bias.zero_()

    def forward(self, layers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """layers (L, B, T, D), mask (B, T) unused -> (B, T, D)."""
        n_layers, b, t, d = layers.shape
        flat = layers.permute(1, 2, 0, 3).reshape(b, t, n_layers * d)  # (B, T, L*D)
        return torch.tanh(self.linear(flat))


class LayerSelect(nn.Module):
    """One layer of the biLM, unchanged: with layer 0 (the biLM's context-independent token
    vectors) it is the static-word-vector ablation that every run trains beside the strategies."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, layers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """layers (L, B, T, D), mask (B, T) unused -> (B, T, D)."""
        return layers[self.index]


def _uniform_logits(config: MixConfig) -> torch.Tensor:
    return torch.zeros(config.num_layers)


def _random_logits(config: MixConfig) -> torch.Tensor:
    """Random positive weights summing to one, seeded, as log-weights (softmax gives them back)."""
    g = torch.Generator().manual_seed(config.seed)
    w = torch.rand(config.num_layers, generator=g, dtype=torch.float64) + 1e-3
    return torch.log(w / w.sum()).float()


ABLATION = "static"  # the strategy name of the static-word-vector ablation


@dataclass(frozen=True)
class Strategy:
    """What a strategy is. Exactly one of ``init_logits`` / ``module`` is set."""

    description: str
    init_logits: Callable[[MixConfig], torch.Tensor] | None = None  # scalar mix start (L,)
    trainable: bool = False  # do the scalar-mix weights and gamma learn?
    module: Callable[[MixConfig], nn.Module] | None = None  # a function of all layers instead
    lr_scale: float = 1.0  # the mix's learning rate relative to the classifier's


STRATEGIES: dict[str, Strategy] = {
    "sum": Strategy("fixed random layer weights, frozen", _random_logits, trainable=False),
    "wsum": Strategy("trainable softmax weights and gamma (ELMo)", _uniform_logits, trainable=True),
    "function": Strategy(
        "learned Linear + Tanh over the concatenated layers",
        module=lambda c: FunctionMix(c.num_layers, c.dim, seed=c.seed),
        # Adam moves each of the (L*D) x D weights by ~lr per step: at the classifier's rate the
        # layer-average start is scrambled within an epoch, so this mix learns 10x slower
        lr_scale=0.1,
    ),
    # not a layer combination: the ablation that measures what the contextual layers add
    ABLATION: Strategy(
        "layer 0 only: the biLM's static word vectors, no contextual layers (ablation)",
        module=lambda c: LayerSelect(0),
    ),
}
# the strategies a user chooses among (the ablation always runs beside them)
MIX_STRATEGIES = tuple(k for k in STRATEGIES if k != ABLATION)


def build_mix(config: MixConfig) -> nn.Module:
    """The mix module for ``config.strategy``; unknown names raise ValueError."""
    if config.strategy not in STRATEGIES:
        raise ValueError(
            f"unknown mix strategy {config.strategy!r}; expected one of {sorted(STRATEGIES)}"
        )
    spec = STRATEGIES[config.strategy]
    if spec.module is not None:
        mix = spec.module(config)
    else:
        assert spec.init_logits is not None
        mix = ScalarMix(spec.init_logits(config), spec.trainable)
    # read by the training loop for the mix's parameter group
    mix.lr_scale = spec.lr_scale  # type: ignore[assignment]  # Module types attributes as tensors
    return mix
