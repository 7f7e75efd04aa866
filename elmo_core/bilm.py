"""The bidirectional language model of ELMo (Peters et al. 2018).

token encoder (a word embedding table, or ELMo's character CNN) -> L-layer forward LSTM LM and L-layer backward LSTM LM (separate stacks, residual
connections after the first layer) -> one output softmax shared by both directions, sampled during
training so a large vocabulary stays cheap. Letters: B batch, T time, L layers, E/H/D dims, V vocab,
N flattened tokens, C softmax candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
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


def dropout_mask(like: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """An inverted-dropout mask of ``shape`` in like's dtype and device: Bernoulli(1 - p) / (1 - p),
    drawn as uniforms < 1 - p (the same distribution as ``bernoulli_``, ~4x cheaper here)."""
    keep = 1.0 - p
    return like.new_empty(shape).uniform_().lt_(keep).div_(keep)


def locked_dropout(
    x: torch.Tensor, p: float, training: bool, inplace: bool = False
) -> torch.Tensor:
    """Variational dropout: one mask per sequence and feature, shared by every time step.

    x: (B, T, D) -> (B, T, D). Dropping the same units at each step is the standard regulariser
    for LSTM LMs (Gal & Ghahramani 2016; AWD-LSTM), and it draws B*D random numbers instead of
    B*T*D: on a CPU, per-element Bernoulli draws were ~8 % of a biLM training step. ``inplace``
    scales x itself (a fresh tensor no one else reads): one pass and one allocation less.
    """
    if not training or p == 0.0:
        return x
    mask = dropout_mask(x, (x.shape[0], 1, x.shape[2]), p)  # (B, 1, D)
    return x.mul_(mask) if inplace else x * mask


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
        softmax's matmuls the same shapes: with S varying from step to step they ran ~2.5x
        slower here (oneDNN builds a kernel per new shape). Expected counts use the number of
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


# --------------------------------------------------------------------------- character encoder

CHAR_PAD, CHAR_BOW, CHAR_EOW = 0, 1, 2  # character ids; UTF-8 byte b is id b + 3
NUM_CHARS = 256 + 3


def char_ids(words: Sequence[str], max_chars: int) -> torch.Tensor:
    """Words -> (N, max_chars) long: [BOW, UTF-8 bytes + 3, EOW, PAD...], long words cut
    (their EOW kept), as ELMo's character ids. Deterministic: no character vocabulary."""
    out = torch.zeros(len(words), max_chars, dtype=torch.long)
    for i, w in enumerate(words):
        b = list(w.encode("utf-8", "replace")[: max_chars - 2])
        out[i, : len(b) + 2] = torch.tensor([CHAR_BOW, *(x + 3 for x in b), CHAR_EOW])
    return out


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


class CharEncoder(nn.Module):
    """ELMo's token encoder: character embeddings -> 1-D convolutions of widths 1..K -> max
    over positions -> relu -> highway layers -> linear projection to E.

    The padding character embeds to zero, and a batch's character tensor is cut to its longest
    word plus K padding positions: every word then has all its windows that start inside it
    and one that is all padding, so its max-pool (and its vector) does not depend on which
    other words share its batch."""

    def __init__(self, config: BiLMConfig) -> None:
        super().__init__()
        self.max_width = len(config.char_filters)
        self.char_embedding = nn.Embedding(NUM_CHARS, config.char_dim, padding_idx=CHAR_PAD)
        # the filters of every width as one convolution of width K: a width-k filter is a
        # width-K one whose last K - k taps are held at zero (``tap_mask``), so the CNN is one
        # matmul and one max-pool instead of K (~1.6x faster a biLM step here than K convs)
        width = sum(config.char_filters)
        self.conv = nn.Conv1d(config.char_dim, width, kernel_size=self.max_width)
        tap_mask = torch.zeros(width, 1, self.max_width)
        row = 0
        for k, n in enumerate(config.char_filters):
            tap_mask[row : row + n, :, : k + 1] = 1.0
            row += n
        self.register_buffer("tap_mask", tap_mask, persistent=False)
        with torch.no_grad():  # each filter initialised at its own width's fan-in
            fan_in = tap_mask.sum((1, 2)) * config.char_dim  # (width,)
            bound = fan_in.rsqrt().unsqueeze(-1).unsqueeze(-1)
            self.conv.weight.uniform_(-1.0, 1.0).mul_(bound).mul_(tap_mask)
            self.conv.bias.uniform_(-1.0, 1.0).mul_(bound.flatten())
        self.highways = nn.ModuleList(Highway(width) for _ in range(config.char_highway))
        self.project = nn.Linear(width, config.embedding_dim)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        """chars (N, C) long character ids -> word vectors (N, E)."""
        used = int((chars != CHAR_PAD).sum(1).max()) if chars.numel() else 1
        c = min(chars.shape[1], used) + self.max_width  # every word: >= 1 all-padding window
        if chars.shape[1] < c:
            chars = F.pad(chars, (0, c - chars.shape[1]), value=CHAR_PAD)
        x = self.char_embedding(chars[:, :c]).transpose(1, 2)  # (N, char_dim, C)
        y = F.conv1d(x, self.conv.weight * self.tap_mask, self.conv.bias)  # (N, F, C-K+1)
        h = F.relu(y.max(dim=-1).values)  # (N, F), F = sum of char_filters
        for hw in self.highways:
            h = hw(h)
        return self.project(h)  # (N, E)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype where autocast is on (so dropout and copies run in bf16 and the
    LSTM does not cast again), else unchanged."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return x.to(torch.get_autocast_dtype(kind))
    return x


def clipped_lstm(
    lstm: nn.LSTM, x: torch.Tensor, cell_clip: float, proj_clip: float
) -> torch.Tensor:
    """One layer of ``lstm`` (batch_first, optionally with ``proj_size``) stepped by hand so
    the cell state and the output can be clipped at every step, as ELMo's LSTMs do (cuDNN /
    oneDNN's fused kernels cannot). Same weights, same gate order (i, f, g, o) and, without
    clipping, the same output as ``lstm(x)[0]``. x: (B, T, I) -> (B, T, P or H)."""
    w_hh, w_hr = lstm.weight_hh_l0, getattr(lstm, "weight_hr_l0", None)
    gates_x = F.linear(x, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)  # (B, T, 4H)
    b, t = x.shape[:2]
    h = x.new_zeros(b, w_hh.shape[1])  # (B, P or H)
    c = x.new_zeros(b, lstm.hidden_size)  # (B, H)
    outs = []
    for step in range(t):
        g = torch.addmm(gates_x[:, step], h, w_hh.t())  # (B, 4H)
        i, f, cand, o = g.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cand)
        if cell_clip:
            c = c.clamp(-cell_clip, cell_clip)
        h = torch.sigmoid(o) * torch.tanh(c)  # (B, H)
        if w_hr is not None:
            h = h @ w_hr.t()  # (B, P)
        if proj_clip:
            h = h.clamp(-proj_clip, proj_clip)
        outs.append(h)
    return torch.stack(outs, 1)  # (B, T, P or H)


class BiLM(nn.Module):
    """ELMo's biLM. ``forward`` gives every layer and the mask; ``lm_loss`` trains it.

    With ``projection_dim`` P each LSTM has H cells and a P-wide projected output (ELMo's
    4096 / 512), so D = P below; without it D = H."""

    def __init__(self, config: BiLMConfig) -> None:
        super().__init__()
        self.config = config
        e, h, p = config.embedding_dim, config.hidden_dim, config.projection_dim
        d = p or h  # D: what each layer carries between layers and into the softmax
        self.state_dim = d
        self.embedding: nn.Embedding | None = None
        self.char_encoder: CharEncoder | None = None
        if config.token_encoder == "char":
            self.char_encoder = CharEncoder(config)
            # (V, max_chars) character ids of the vocabulary's words: set_words fills it, the
            # checkpoint carries it
            self.register_buffer(
                "word_chars", torch.zeros(config.vocab_size, config.max_chars, dtype=torch.long)
            )
        else:
            self.embedding = nn.Embedding(config.vocab_size, e, padding_idx=0, sparse=True)
            nn.init.normal_(self.embedding.weight, std=e**-0.5)
            with torch.no_grad():
                self.embedding.weight[0].zero_()
        self.project = nn.Linear(e, d) if e != d else nn.Identity()

        def lstm() -> nn.LSTM:
            return nn.LSTM(d, h, batch_first=True, proj_size=p)

        self.forward_lstms = nn.ModuleList(lstm() for _ in range(config.num_layers))
        self.backward_lstms = nn.ModuleList(lstm() for _ in range(config.num_layers))
        self.dropout_p = config.dropout
        self.softmax = SampledSoftmax(config.vocab_size, d, config.num_samples)

    def set_words(self, words: Sequence[str]) -> None:
        """The vocabulary's words (id order), read by the character encoder; a no-op for the
        word encoder, whose table needs no spelling."""
        if self.char_encoder is None:
            return
        if len(words) != self.config.vocab_size:
            raise ValueError(f"set_words got {len(words)} words for V = {self.config.vocab_size}")
        self.word_chars.copy_(char_ids(words, self.config.max_chars))

    @torch.no_grad()
    def with_new_words(self, words: Sequence[str], log_share: torch.Tensor) -> BiLM:
        """A copy of this biLM whose vocabulary grows by ``words`` (ids V .. V+W-1): what a
        reused biLM needs before it adapts to a task whose words its pretraining corpus lacked,
        where they would all read as <unk>. Every new word starts as <unk>: its input vector is
        <unk>'s (the char encoder reads its spelling instead) and its output row is <unk>'s
        with ``log_share`` (W,) added to the bias: log of the word's share of <unk>'s
        probability mass, so a new word starts as likely as <unk> scaled by that share and
        every old word's logit is unchanged."""
        w = len(words)
        if log_share.shape != (w,):
            raise ValueError(f"log_share has shape {tuple(log_share.shape)}, expected ({w},)")
        v = self.config.vocab_size
        grown = BiLM(replace(self.config, vocab_size=v + w)).to(self.softmax.weight.device)
        state = self.state_dict()
        unk = 1

        def rows(t: torch.Tensor) -> torch.Tensor:  # (V, ...) -> (V+W, ...): <unk>'s row W times
            return torch.cat([t, t[unk : unk + 1].expand(w, *t.shape[1:])])

        for name in ("embedding.weight", "softmax.weight"):
            if name in state:
                state[name] = rows(state[name])
        bias = rows(state["softmax.bias"])  # (V+W, 1)
        bias[v:, 0] += log_share.to(bias)
        state["softmax.bias"] = bias
        proposal = rows(state["softmax.proposal"])  # reset by set_proposal from the new counts
        state["softmax.proposal"] = proposal / proposal.sum()
        if "word_chars" in state:
            state["word_chars"] = torch.cat(
                [state["word_chars"], char_ids(words, self.config.max_chars).to(proposal.device)]
            )
        grown.load_state_dict(state)
        return grown.train(self.training)

    @property
    def open_vocabulary(self) -> bool:
        """True when words outside the vocabulary get their own input vectors (char encoder)."""
        return self.char_encoder is not None

    def extra_chars(self, words: Sequence[str]) -> torch.Tensor | None:
        """Character ids (W, C) of out-of-vocabulary words, addressed as ids V.. V+W-1 by
        ``forward``; None for the word encoder or when there are none."""
        if self.char_encoder is None or not words:
            return None
        return char_ids(words, self.config.max_chars).to(self.word_chars.device)

    @torch.no_grad()
    def input_vectors(self, chunk: int = 4096) -> torch.Tensor:
        """(V, E) the token encoder's vector of every vocabulary word (before the projection
        to D): the start of a task token embedding."""
        if self.char_encoder is None:
            return self.embedding.weight.detach()
        out = [
            self.char_encoder(self.word_chars[i : i + chunk])
            for i in range(0, self.config.vocab_size, chunk)
        ]
        vecs = torch.cat(out)
        vecs[0] = 0.0  # <pad>
        return vecs

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters with sparse gradients (embedding, softmax rows): for a row-sparse Adam."""
        table = [] if self.embedding is None else [self.embedding.weight]
        if self.config.num_samples == 0:  # full softmax: dense gradients over all V rows
            return table
        return [*table, self.softmax.weight, self.softmax.bias]

    @property
    def num_output_layers(self) -> int:
        return self.config.num_layers + 1

    @property
    def output_dim(self) -> int:
        return 2 * self.state_dim

    def _embed(self, tokens: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> token vectors (B, T, D), in autocast's dtype when it is on.

        Char encoder: the CNN runs once per distinct id of the batch; ids >= V address the
        rows of ``extra`` (W, C), the character ids of out-of-vocabulary words."""
        if self.char_encoder is None:
            return _compute_dtype(self.project(self.embedding(tokens)))
        ids, inv = torch.unique(tokens, return_inverse=True)  # (U,), (B, T)
        table = self.word_chars if extra is None else torch.cat([self.word_chars, extra])
        if int(ids[-1]) >= len(table):
            raise ValueError(f"token id {int(ids[-1])} is outside vocabulary + extra words")
        vecs = self.project(self.char_encoder(table.index_select(0, ids)))  # (U, D)
        pad = ids == 0
        if bool(pad.any()):  # <pad> reads as zero, as the word table's padding row
            vecs = vecs.masked_fill(pad.unsqueeze(1), 0.0)
        return _compute_dtype(vecs.index_select(0, inv.reshape(-1)).view(*tokens.shape, -1))

    def _drop(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), variational dropout while training."""
        return locked_dropout(x, self.dropout_p, self.training, inplace)

    def _lstm(self, lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
        """One LSTM layer (B, T, D) -> (B, T, D): the fused kernel, or the step loop when
        clipping is on."""
        if self.config.cell_clip or self.config.proj_clip:
            return clipped_lstm(lstm, x, self.config.cell_clip, self.config.proj_clip)
        return lstm(x)[0]

    def _stack(self, lstms: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
        """Run one direction's stack; residual after the first layer. (B, T, D) -> L x (B, T, D).

        ``x`` arrives with dropout applied (once, shared by both directions); dropout is applied
        again between layers. All dropout is variational (``locked_dropout``).
        """
        outs = []
        for i, lstm in enumerate(lstms):
            y = self._lstm(lstm, x if i == 0 else self._drop(x))  # (B, T, D)
            if i > 0:
                y = y + x
            outs.append(y)
            x = y
        return outs

    def states(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """tokens (B, T) -> token vectors (B, T, H), forward and backward layer states L x (B, T, H).

        ``lengths`` (B,) marks right padding; None means every row is full (training windows).
        Backward states are returned in the original time order. ``extra``: see ``forward``.
        """
        x = self._embed(tokens, extra)  # (B, T, H)
        xd = self._drop(x)
        fwd = self._stack(self.forward_lstms, xd)
        if lengths is None:
            bwd = [y.flip(1) for y in self._stack(self.backward_lstms, xd.flip(1))]
        else:
            rev = reverse_padded(xd, lengths)  # (B, T, H)
            bwd = [reverse_padded(y, lengths) for y in self._stack(self.backward_lstms, rev)]
        return x, fwd, bwd

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None = None
    ) -> BiLMOutput:
        """tokens (B, T) long, mask (B, T) bool (right padding) -> BiLMOutput, layers (L+1, B, T, 2H).

        ``extra`` (W, C), char encoder only: character ids of out-of-vocabulary words, which
        ``tokens`` address as ids V .. V+W-1 (``extra_chars``)."""
        lengths = mask.sum(1)  # (B,)
        x, fwd, bwd = self.states(tokens, lengths, extra)
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
        reversed time and its targets are the reversed tokens: no flip of any state.
        """
        x = self._drop(self._embed(tokens), inplace=True)  # (B, T, H), a fresh tensor
        f = self._stack(self.forward_lstms, x)[-1][:, :-1]  # (B, T-1, H)
        r = self._stack(self.backward_lstms, x.flip(1))[-1][:, :-1]  # (B, T-1, H), reversed time
        # one dropout and one softmax call for both directions: shared negatives, one matmul
        states = self._drop(torch.cat([f, r]), inplace=True)  # (2B, T-1, H)
        targets = torch.cat([tokens[:, 1:], tokens.flip(1)[:, 1:]])  # (2B, T-1)
        d = self.state_dim
        return self.softmax(states.reshape(-1, d), targets.reshape(-1), generator)

    @torch.no_grad()
    def exact_nll(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full windows (B, T) -> per-token exact NLL (forward (N,), backward (N,)), full softmax."""
        _, fwd, bwd = self.states(tokens)
        d = self.state_dim
        f = self.softmax.nll(fwd[-1][:, :-1].reshape(-1, d), tokens[:, 1:].reshape(-1))
        b = self.softmax.nll(bwd[-1][:, 1:].reshape(-1, d), tokens[:, :-1].reshape(-1))
        return f, b
