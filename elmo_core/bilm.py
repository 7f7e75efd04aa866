"""The bidirectional language model of ELMo (Peters et al. 2018), word-level.

token embedding -> L-layer forward LSTM LM and L-layer backward LSTM LM (separate stacks, residual
connections after the first layer) -> one output softmax shared by both directions, sampled during
training so a large vocabulary stays cheap. Letters: B batch, T time, L layers, E/H/D dims, V vocab,
N flattened tokens, C softmax candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from elmo_core.config import BiLMConfig


@dataclass
class BiLMOutput:
    layers: torch.Tensor  # (L+1, B, T, 2H): layer 0 = [x; x], layer k = [forward_k; backward_k]
    mask: torch.Tensor  # (B, T) bool, True on real tokens


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of a right-padded batch within its own length (an involution).

    x: (B, T, *) ; lengths: (B,) -> (B, T, *), padding stays at the end.
    """
    b, t = x.shape[:2]
    pos = torch.arange(t, device=x.device).unsqueeze(0).expand(b, t)  # (B, T)
    lens = lengths.to(x.device).unsqueeze(1)  # (B, 1)
    idx = torch.where(pos < lens, lens - 1 - pos, pos)  # (B, T)
    idx = idx.view(b, t, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Variational dropout: one mask per sequence and feature, shared by every time step.

    x: (B, T, D) -> (B, T, D). Dropping the same units at each step is the standard regulariser
    for LSTM LMs (Gal & Ghahramani 2016; AWD-LSTM), and it draws B*D random numbers instead of
    B*T*D: on a CPU, per-element Bernoulli draws were ~8 % of a biLM training step.
    """
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    # uniforms < keep: the same Bernoulli(keep) mask as bernoulli_, ~4x cheaper to draw here
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).uniform_().lt_(keep)  # (B, 1, D)
    return x * mask.div_(keep)


class SampledNLL(torch.autograd.Function):
    """Mean over N of -log softmax([true; sampled])[0], in float32, with its gradient.

    true_logit (N,), sampled (N, S) -> scalar. Takes the true word's logit and the (N, S) sampled
    logits separately, so the (N, 1+S) matrix is never built, and works out the gradient in the
    forward pass from the same exponentials (softmax / N): the backward pass only scales it. The
    autograd of ``logsumexp`` would re-read the logits, subtract and exponentiate them again.
    """

    @staticmethod
    def forward(ctx: Any, true_logit: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
        n = sampled.shape[0]
        t = true_logit.float()  # (N,)
        z = sampled.to(torch.float32, copy=True)  # (N, S), overwritten below
        m = torch.maximum(z.amax(1), t)  # (N,) row max over [true; sampled]
        z.sub_(m.unsqueeze(1)).exp_()  # (N, S) exp(logit - max)
        e_t = (t - m).exp_()  # (N,)
        denom = z.sum(1).add_(e_t)  # (N,) partition function / exp(max)
        loss = (denom.log() + m - t).mean()
        scale = denom.mul_(n).reciprocal_()  # (N,) 1 / (N * denom)
        grad_sampled = z.mul_(scale.unsqueeze(1)).to(sampled.dtype)  # (N, S) softmax / N
        grad_true = e_t.mul_(scale).sub_(1.0 / n).to(true_logit.dtype)  # (N,) (p_true - 1) / N
        ctx.save_for_backward(grad_true, grad_sampled)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad_true, grad_sampled = ctx.saved_tensors
        return grad_true * grad, grad_sampled * grad


class SampledSoftmax(nn.Module):
    """Output softmax over V words shared by both directions.

    Training: each prediction scores its true word against ``num_samples`` negatives shared by the
    whole batch, drawn from a unigram^0.75 proposal; every logit is corrected by the log expected
    count of its word and accidental hits are masked (Jean et al. 2015; TF's sampled_softmax).
    The cost is one (N, D) x (D, S) matmul, whatever V is. Weight rows are looked up with sparse
    gradients so the optimizer touches only the rows a step used. Evaluation (or
    num_samples == 0): the exact full softmax, in chunks.
    """

    def __init__(self, vocab_size: int, dim: int, num_samples: int) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.bias = nn.Parameter(torch.zeros(vocab_size, 1))
        nn.init.normal_(self.weight, std=dim**-0.5)
        proposal = torch.ones(vocab_size)
        proposal[0] = 0.0
        self.register_buffer("proposal", proposal / proposal.sum())

    def set_proposal(self, unigram: torch.Tensor) -> None:
        """Use unigram^0.75 of the pretraining counts as the negative-sampling proposal."""
        p = unigram.double().clamp_min(0).pow(0.75)
        p[0] = 0.0
        self.proposal.copy_((p / p.sum()).to(self.proposal.dtype))

    def _log_expected(self, ids: torch.Tensor) -> torch.Tensor:
        """log of the expected number of times each id is drawn in ``num_samples`` draws."""
        p = self.proposal[ids].double()
        return torch.log1p(-torch.pow(1 - p, self.num_samples)).clamp_min(-30.0).float()

    def _rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight rows (U, D) and biases (U,) of distinct ids (U,), with sparse gradients."""
        w = F.embedding(ids, self.weight, sparse=True)  # (U, D)
        b = F.embedding(ids, self.bias, sparse=True).squeeze(-1)  # (U,)
        return w, b

    def forward(
        self,
        h: torch.Tensor,
        targets: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """h: (N, D), targets: (N,) -> mean negative log-likelihood (scalar)."""
        if not self.training or self.num_samples == 0:
            return self.nll(h, targets).mean()
        samples = torch.multinomial(
            self.proposal, self.num_samples, replacement=True, generator=generator
        )
        samples = torch.unique(samples).to(targets.device)  # (S,) distinct
        n, s = targets.shape[0], samples.shape[0]
        # one sparse lookup of the distinct rows a step needs (targets repeat a lot): the sparse
        # gradient, and the optimizer work on it, scale with U instead of N + S
        rows, inv = torch.unique(torch.cat([targets, samples]), return_inverse=True)  # (U,), (N+S,)
        inv_t, inv_s = inv[:n], inv[n:]  # (N,), (S,)
        w_u, b_u = self._rows(rows)  # (U, D), (U,)
        # under bf16 autocast h is bf16: cast the U rows once, so the (N, D) gathers, the true
        # logits' products and addmm's operand are bf16 too (fp32: a no-op)
        w_u = w_u.to(h.dtype)
        corr = b_u - self._log_expected(rows)  # (U,) bias minus log expected count
        # index_select (not advanced indexing): its backward is an index_add, not a slower
        # accumulating index_put
        w_t = w_u.index_select(0, inv_t)  # (N, D)
        true_logit = (h * w_t).sum(-1, dtype=torch.float32) + corr.index_select(0, inv_t)  # (N,)
        w_s = w_u.index_select(0, inv_s)  # (S, D)
        sampled = torch.addmm(corr.index_select(0, inv_s), h, w_s.t())  # (N, S)
        # accidental hits: samples are distinct, so a target equals at most one sampled column;
        # masked in place (addmm's backward does not need its output)
        col = torch.full_like(rows, -1)
        col[inv_s] = torch.arange(s, device=rows.device)
        hit = col.index_select(0, inv_t)  # (N,) column of the target among the samples, or -1
        hit_rows = (hit >= 0).nonzero().squeeze(1)  # (K,)
        sampled = sampled.index_put_(
            (hit_rows, hit.index_select(0, hit_rows)), sampled.new_tensor(-1e4)
        )
        return SampledNLL.apply(true_logit, sampled)

    def nll(self, h: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Exact per-token negative log-likelihood under the full softmax. (N, D) -> (N,)"""
        out = []
        for i in range(0, h.shape[0], chunk):
            logits = h[i : i + chunk] @ self.weight.t() + self.bias.squeeze(-1)  # (n, V)
            out.append(F.cross_entropy(logits.float(), targets[i : i + chunk], reduction="none"))
        return torch.cat(out) if out else h.new_zeros(0)


class BiLM(nn.Module):
    """ELMo's biLM. ``forward`` gives every layer and the mask; ``lm_loss`` trains it."""

    def __init__(self, config: BiLMConfig) -> None:
        super().__init__()
        self.config = config
        e, h = config.embedding_dim, config.hidden_dim
        self.embedding = nn.Embedding(config.vocab_size, e, padding_idx=0, sparse=True)
        nn.init.normal_(self.embedding.weight, std=e**-0.5)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.project = nn.Linear(e, h) if e != h else nn.Identity()
        self.forward_lstms = nn.ModuleList(
            nn.LSTM(h, h, batch_first=True) for _ in range(config.num_layers)
        )
        self.backward_lstms = nn.ModuleList(
            nn.LSTM(h, h, batch_first=True) for _ in range(config.num_layers)
        )
        self.dropout_p = config.dropout
        self.softmax = SampledSoftmax(config.vocab_size, h, config.num_samples)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters with sparse gradients (embedding, softmax rows): for a row-sparse Adam."""
        if self.config.num_samples == 0:  # full softmax: dense gradients over all V rows
            return [self.embedding.weight]
        return [self.embedding.weight, self.softmax.weight, self.softmax.bias]

    @property
    def num_output_layers(self) -> int:
        return self.config.num_layers + 1

    @property
    def output_dim(self) -> int:
        return 2 * self.config.hidden_dim

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), variational dropout while training."""
        return locked_dropout(x, self.dropout_p, self.training)

    def _stack(self, lstms: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
        """Run one direction's stack; residual after the first layer. (B, T, H) -> L x (B, T, H).

        ``x`` arrives with dropout applied (once, shared by both directions); dropout is applied
        again between layers. All dropout is variational (``locked_dropout``).
        """
        outs = []
        for i, lstm in enumerate(lstms):
            y, _ = lstm(x if i == 0 else self._drop(x))  # (B, T, H)
            if i > 0:
                y = y + x
            outs.append(y)
            x = y
        return outs

    def states(
        self, tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """tokens (B, T) -> token vectors (B, T, H), forward and backward layer states L x (B, T, H).

        ``lengths`` (B,) marks right padding; None means every row is full (training windows).
        Backward states are returned in the original time order.
        """
        x = self.project(self.embedding(tokens))  # (B, T, H)
        xd = self._drop(x)
        fwd = self._stack(self.forward_lstms, xd)
        if lengths is None:
            bwd = [y.flip(1) for y in self._stack(self.backward_lstms, xd.flip(1))]
        else:
            rev = reverse_padded(xd, lengths)  # (B, T, H)
            bwd = [reverse_padded(y, lengths) for y in self._stack(self.backward_lstms, rev)]
        return x, fwd, bwd

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> BiLMOutput:
        """tokens (B, T) long, mask (B, T) bool (right padding) -> BiLMOutput, layers (L+1, B, T, 2H)."""
        lengths = mask.sum(1)  # (B,)
        x, fwd, bwd = self.states(tokens, lengths)
        layers = [torch.cat([x, x], dim=-1)]  # (B, T, 2H)
        layers += [torch.cat([f, b], dim=-1) for f, b in zip(fwd, bwd, strict=True)]
        stacked = torch.stack(layers) * mask.unsqueeze(0).unsqueeze(-1)  # (L+1, B, T, 2H)
        return BiLMOutput(layers=stacked, mask=mask)

    def lm_loss(
        self, tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Full windows (B, T) -> mean sampled NLL over the 2*B*(T-1) predictions of both directions.

        The forward state at t predicts token t+1; the backward state at t predicts token t-1.
        The backward LM is a forward LM over the time-reversed window, so its states stay in
        reversed order and its targets are the reversed tokens: no flip of any state.
        """
        x = self._drop(self.project(self.embedding(tokens)))  # (B, T, H)
        f = self._stack(self.forward_lstms, x)[-1][:, :-1]  # (B, T-1, H)
        b = self._stack(self.backward_lstms, x.flip(1))[-1][:, :-1]  # (B, T-1, H), reversed time
        # one dropout and one softmax call for both directions: shared negatives, one matmul
        states = self._drop(torch.cat([f, b]))  # (2B, T-1, H)
        targets = torch.cat([tokens[:, 1:], tokens.flip(1)[:, 1:]])  # (2B, T-1)
        h = self.config.hidden_dim
        return self.softmax(states.reshape(-1, h), targets.reshape(-1), generator)

    @torch.no_grad()
    def exact_nll(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full windows (B, T) -> per-token exact NLL (forward (N,), backward (N,)), full softmax."""
        _, fwd, bwd = self.states(tokens)
        h = self.config.hidden_dim
        f = self.softmax.nll(fwd[-1][:, :-1].reshape(-1, h), tokens[:, 1:].reshape(-1))
        b = self.softmax.nll(bwd[-1][:, 1:].reshape(-1, h), tokens[:, :-1].reshape(-1))
        return f, b
