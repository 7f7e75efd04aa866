"""The biLM's output layer: a softmax over the vocabulary, sampled during training (shared
negatives from a unigram proposal, accidental hits removed) so a large vocabulary stays cheap.
Letters: N flattened tokens, D dim, V vocab, S sampled candidates."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class SampledNLL(torch.autograd.Function):
    """Mean over N of -log softmax([true; sampled])[0], with its gradient, in one pass.

    h (N, D), true rows w_t (N, D) and corrections c_t (N,), sampled rows w_s (S, D) and
    corrections c_s (S,), accidental hits (hit_rows (K,), hit_cols (K,)) -> scalar float32.

    The (N, S) block is the cost, so it is touched as few times as possible and never copied or
    cast: with each row shifted by its true logit t, exp(h w_s^T + c_s - t) = E * q where
    E = exp(h w_s^T - t) comes from one addmm (bias -t broadcast over the row) and one in-place
    exp, and q = exp(c_s) is a column factor. The partition function is then E q (a matvec); E
    is scaled in place by s = 1 / (N * denom) per row, and the gradient softmax / N =
    diag(s) E diag(q) is never formed: q scales the (S, D) operand or result of the backward's
    two matmuls. If a sampled logit exceeds its row's true logit by so much that exp may overflow,
    the row-max shift is used instead (q = 1). Under autocast E is bf16 (as autograd's addmm
    output would be); t, the shift, the loss and s are float32.
    """

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        w_t: torch.Tensor,
        c_t: torch.Tensor,
        w_s: torch.Tensor,
        c_s: torch.Tensor,
        hit_rows: torch.Tensor,
        hit_cols: torch.Tensor,
    ) -> torch.Tensor:
        n, dt = h.shape[0], h.dtype
        ctx.dtypes = (w_t.dtype, c_t.dtype, w_s.dtype, c_s.dtype)
        w_s = w_s.to(dt)
        t = (h * w_t.to(dt)).sum(-1, dtype=torch.float32) + c_t.float()  # (N,) true logits
        hit = (hit_rows, hit_cols)
        with torch.autocast(h.device.type, enabled=False):  # h's dtype decides, as in backward
            m = t.to(dt)  # (N,) row shift, as rounded to h's dtype
            e = torch.addmm(m.neg().unsqueeze(1), h, w_s.t()).exp_()  # (N, S) exp(h w - m)
            e.index_put_(hit, e.new_zeros(()))  # a sample that is the target
            q = c_s.float().exp()  # (S,) column factor exp(c_s)
            denom = torch.mv(e, q.to(dt)).float()  # (N,) sampled part of the partition function
            # a sampled logit ~70 over its row's true one (p_true < 1e-30): exp may overflow, or
            # 1 / (N * denom) underflow in bf16; then shift rows by their max instead, q = 1
            if not bool((denom < 1e30).all()):  # also catches inf and nan
                z = torch.addmm(c_s.to(dt), h, w_s.t())  # (N, S)
                m = torch.maximum(z.amax(1).float(), t).to(dt)
                e, q = z.sub_(m.unsqueeze(1)).exp_(), torch.ones_like(q)
                e.index_put_(hit, e.new_zeros(()))
                denom = e.sum(1, dtype=torch.float32)
            m = m.float()
            e_t = (t - m).exp_()  # (N,) the true word's term
            denom.add_(e_t)  # (N,) partition function / exp(m)
        loss = (denom.log() + m - t).mean()
        s = denom.mul_(n).reciprocal_()  # (N,) 1 / (N * denom)
        grad_t = e_t.mul_(s).sub_(1.0 / n)  # (N,) (p_true - 1) / N
        e.mul_(s.to(dt).unsqueeze(1))  # (N, S) diag(s) E: softmax / N without the column factor
        ctx.save_for_backward(h, w_t, w_s, e, q, grad_t)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, w_t, w_s, e, q, grad_t = ctx.saved_tensors  # e = diag(s) E
        dt, g = h.dtype, float(grad)  # the upstream scalar
        g_t = grad_t.mul(g)  # (N,) float32: d loss / d true logit
        qc = q.mul(g).to(dt).unsqueeze(1)  # (S, 1) column factors, upstream scale included
        g_tc = g_t.to(dt).unsqueeze(1)  # (N, 1)
        dh = torch.addmm(g_tc * w_t.to(dt), e, w_s * qc)  # (N, D) = G w_s + g_t w_t
        dw_s = torch.mm(e.t(), h).mul_(qc)  # (S, D) = G^T h
        dc_s = e.sum(0).float().mul_(q).mul_(g)  # (S,) column sums of G
        dw_t = g_tc * h  # (N, D)
        grads = (dw_t, g_t, dw_s, dc_s)
        return dh, *(x.to(d) for x, d in zip(grads, ctx.dtypes, strict=True)), None, None


class GatherRows(torch.autograd.Function):
    """weight (V, *), distinct sorted ids (U,) -> weight rows (U, *) whose gradient is a sparse
    tensor already marked coalesced (its indices are ``ids``), so the row-sparse optimizer does
    not sort and merge it again as it must for ``F.embedding(..., sparse=True)``'s gradient."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.shape = weight.shape
        return weight.index_select(0, ids)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ids,) = ctx.saved_tensors
        sparse = torch.sparse_coo_tensor(
            ids.unsqueeze(0), grad, ctx.shape, is_coalesced=True, check_invariants=False
        )
        return sparse, None


class SampledSoftmax(nn.Module):
    """Output softmax over V words shared by both directions.

    Training: each prediction scores its true word against ``num_samples`` negatives shared by the
    whole batch, drawn from a unigram^0.75 proposal; every logit is corrected by the log expected
    count of its word and accidental hits are masked (Jean et al. 2015; TF's sampled_softmax).
    The cost is one (N, D) x (D, S) matmul, whatever V is. Weight rows are looked up with sparse
    gradients so the optimizer touches only the rows a step used. Evaluation (or
    num_samples == 0): the exact full softmax, in chunks.
    """

    proposal: torch.Tensor  # (V,) negative-sampling distribution (a buffer)

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

    def _log_expected(self, ids: torch.Tensor, tries: int) -> torch.Tensor:
        """log of the expected number of times each id comes up in ``tries`` draws."""
        p = self.proposal[ids].double()
        return torch.log1p(-torch.pow(1 - p, tries)).clamp_min(-30.0).float()

    def draw(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The step's shared negatives -> (S,) distinct sorted ids, S = ``num_samples``, and the
        number of draws it took.

        Draws with replacement from the proposal until S distinct ids came up and keeps those
        (TensorFlow's ``unique=True`` candidate samplers), so every step has the same S and the
        softmax's matmuls the same shapes: with S varying from step to step they run much
        slower (oneDNN builds a kernel per new shape). Expected counts use the number of
        draws. S is capped at the number of ids the proposal can draw.
        """
        k = min(self.num_samples, int((self.proposal > 0).sum()))
        drawn = self.proposal.new_zeros(0, dtype=torch.long)  # on the proposal's device
        while True:
            more = torch.multinomial(self.proposal, 2 * k, replacement=True, generator=generator)
            drawn = torch.cat([drawn, more])
            ids, inv = torch.unique(drawn, return_inverse=True)  # (U,), (n,)
            if len(ids) >= k:
                break
        pos = torch.arange(len(drawn), device=drawn.device)
        first = torch.full_like(ids, len(drawn)).scatter_reduce_(0, inv, pos, "amin")  # (U,)
        keep = first.argsort()[:k]  # the first k distinct ids to come up
        return ids[keep].sort().values, int(first[keep[-1]]) + 1

    def _rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight rows (U, D) and biases (U,) of distinct sorted ids (U,), with sparse gradients."""
        return GatherRows.apply(self.weight, ids), GatherRows.apply(self.bias, ids).squeeze(-1)

    def forward(
        self,
        h: torch.Tensor,
        targets: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """h: (N, D), targets: (N,) -> mean negative log-likelihood (scalar)."""
        if not self.training or self.num_samples == 0:
            return self.nll(h, targets).mean()
        samples, tries = self.draw(generator)
        samples = samples.to(targets.device)  # (S,)
        # one lookup of the distinct rows a step needs (targets repeat a lot): the sparse
        # gradient, and the optimizer work on it, scale with U instead of N + S
        rows, inv = torch.unique(torch.cat([targets, samples]), return_inverse=True)  # (U,), (N+S,)
        n = targets.shape[0]
        inv_t, inv_s = inv[:n], inv[n:]  # (N,), (S,)
        w_u, b_u = self._rows(rows)  # (U, D), (U,)
        # under bf16 autocast h is bf16: cast the U rows once, so the (N, D) gathers, the true
        # logits' products and addmm's operand are bf16 too (fp32: a no-op)
        w_u = w_u.to(h.dtype)
        corr = b_u - self._log_expected(rows, tries)  # (U,) bias minus log expected count
        # index_select (not advanced indexing): its backward is an index_add, not a slower
        # accumulating index_put
        w_t = w_u.index_select(0, inv_t)  # (N, D)
        w_s = w_u.index_select(0, inv_s)  # (S, D)
        # accidental hits: samples are distinct, so a target equals at most one sampled column
        col = torch.full_like(rows, -1)
        col[inv_s] = torch.arange(inv_s.shape[0], device=rows.device)
        hit = col.index_select(0, inv_t)  # (N,) column of the target among the samples, or -1
        hit_rows = (hit >= 0).nonzero().squeeze(1)  # (K,)
        return SampledNLL.apply(
            h,
            w_t,
            corr.index_select(0, inv_t),
            w_s,
            corr.index_select(0, inv_s),
            hit_rows,
            hit.index_select(0, hit_rows),
        )

    def nll(self, h: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Exact per-token negative log-likelihood under the full softmax. (N, D) -> (N,)"""
        out = []
        for i in range(0, h.shape[0], chunk):
            logits = h[i : i + chunk] @ self.weight.t() + self.bias.squeeze(-1)  # (n, V)
            out.append(F.cross_entropy(logits.float(), targets[i : i + chunk], reduction="none"))
        return torch.cat(out) if out else h.new_zeros(0)
