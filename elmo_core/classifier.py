"""Document classifier on frozen ELMo layers: mix -> dropout -> BiLSTM -> pooling -> MLP."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import torch
from torch import nn

from elmo_core.bilm import BiLM
from elmo_core.classifier_config import ClassifierConfig
from elmo_core.lstm import reverse_padded


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool mask of ``shape``, each element kept with probability 1 - p (quantised to
    1/32,768), four elements per 64-bit random draw: a step drew one 32-bit uniform per element
    of its (B, T, D+E) input before, a visible share of it."""
    n = math.prod(shape)
    keep = 1.0 - p
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # [0, 2^63)
    lanes = bits.view(torch.int16).view(-1, 4)  # (n/4, 4): three lanes uniform over int16,
    # the top lane (the sign bit is 0) uniform over [0, 2^15)
    full, top = round(keep * 65536) - 32768, round(keep * 32768)
    kept = lanes < full  # (n/4, 4): one scalar compare (a broadcast (4,) threshold was slower)
    kept[:, 3] = lanes[:, 3] < top
    return kept.view(-1)[:n].view(shape)


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, element-wise as ``nn.Dropout``, with ``keep_mask``'s cheap draws.

    (B, T, D) -> (B, T, D)."""
    if not training or p == 0.0:
        return x
    # bool * a 0-dim tensor of x's dtype: the mask becomes the scale in one pass, in x's dtype
    scale = keep_mask(tuple(x.shape), p, x.device).mul(x.new_tensor(1.0 / (1.0 - p)))
    return x * scale  # a float multiply: bool masked_fill / where were slower here


def reverse_each(h: torch.Tensor, lengths: torch.Tensor, full: bool) -> torch.Tensor:
    """Each document reversed within its length: (B, T, D) -> (B, T, D). ``full`` (every
    document spans T, as most length-bucketed batches do) takes a plain flip."""
    return h.flip(1) if full else reverse_padded(h, lengths)


def check_token_embedding(config: ClassifierConfig, bilm_embedding_dim: int) -> None:
    """The task token embedding starts as the first E columns of the biLM's token embedding, so
    it cannot be wider; the run parameters check this before pretraining, the task again."""
    if config.token_embedding_dim > bilm_embedding_dim:
        raise ValueError(
            f"classifier token_embedding_dim {config.token_embedding_dim} exceeds the biLM's "
            f"embedding_dim {bilm_embedding_dim} it is initialised from"
        )


_LEGACY_RNN = re.compile(r"^rnn\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")


def _upgrade_legacy_rnn(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: checkpoints written before the BiLSTM was split into
    ``rnn_forward`` / ``rnn_backward`` hold one bidirectional ``nn.LSTM`` named ``rnn``
    (``rnn.*_l{k}[_reverse]``); rename its tensors in place so those checkpoints still load."""
    for key in [k for k in state if k.startswith(prefix + "rnn.")]:
        m = _LEGACY_RNN.match(key[len(prefix) :])
        if m is not None:
            name, layer, reverse = m.groups()
            direction = "backward" if reverse else "forward"
            state[f"{prefix}rnn_{direction}.{layer}.{name}_l0"] = state.pop(key)


class ELMoClassifier(nn.Module):
    """Takes precomputed biLM layers (the biLM stays frozen and outside this module).

    With ``config.token_embedding_dim > 0`` the mixed ELMo vector is concatenated with a
    task-specific token embedding, as ELMo's authors do for their task models ([x_k; ELMo_k]);
    ``init_embedding`` (V, E), the biLM's own token embedding, gives it a pretrained start.
    """

    def __init__(
        self,
        config: ClassifierConfig,
        mix: nn.Module,
        input_dim: int,
        num_classes: int,
        vocab_size: int = 0,
        init_embedding: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.mix = mix
        e = config.token_embedding_dim
        # row-sparse gradients: a step's Adam and weight average touch the batch's rows only
        # (with weight decay, which every row takes, the gradient stays dense)
        sparse = config.sparse_embedding and config.weight_decay == 0.0
        self.embedding = nn.Embedding(vocab_size, e, padding_idx=0, sparse=sparse) if e else None
        if self.embedding is not None and init_embedding is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init_embedding[:, :e])
        # the BiLSTM as one forward and one backward LSTM per layer, run on the padded batch (the
        # backward one on each document reversed within its length): at real positions this is
        # exactly a packed bidirectional LSTM, but it takes the fused (oneDNN) kernel; packed
        # sequences fall back to a per-step loop that was ~3x slower here
        sizes_in = [input_dim + e] + [2 * config.hidden_dim] * (config.num_layers - 1)
        self.rnn_forward = nn.ModuleList(
            nn.LSTM(d, config.hidden_dim, batch_first=True) for d in sizes_in
        )
        self.rnn_backward = nn.ModuleList(
            nn.LSTM(d, config.hidden_dim, batch_first=True) for d in sizes_in
        )
        self.register_load_state_dict_pre_hook(_upgrade_legacy_rnn)
        # ELMo at the output too: the same strategy's mix with its own parameters (a deep copy
        # keeps the strategy's data: its start, trainable flag and lr scale)
        self.output_mix = copy.deepcopy(mix) if config.elmo_output else None
        pooled = 2 * config.hidden_dim + (input_dim if config.elmo_output else 0)
        sizes = [2 * pooled, *config.mlp_hidden]
        mlp: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            mlp += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(config.dropout)]
        mlp.append(nn.Linear(sizes[-1], num_classes))
        self.mlp = nn.Sequential(*mlp)

    def bilstm(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) right-padded, lengths (B,) -> (B, T, 2Hc) = [forward; backward] states.

        Positions past a document's length hold garbage; callers mask them.
        """
        full = bool((lengths == h.shape[1]).all())
        for i, (fwd, bwd) in enumerate(zip(self.rnn_forward, self.rnn_backward, strict=True)):
            if i > 0:  # between layers, as nn.LSTM(dropout=...) does
                h = fast_dropout(h, self.config.dropout, self.training)
            f, _ = fwd(h)  # (B, T, Hc)
            b, _ = bwd(reverse_each(h, lengths, full))  # (B, T, Hc), each document reversed
            h = torch.cat([f, reverse_each(b, lengths, full)], dim=-1)  # (B, T, 2Hc)
        return h

    def forward(
        self, layers: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """layers (L, B, T, D) float, mask (B, T) bool, tokens (B, T) ids -> logits (B, C).

        With ``config.elmo_output`` the output mix joins the BiLSTM states before pooling:
        (B, T, 2Hc + D) instead of (B, T, 2Hc)."""
        h = self.mix(layers, mask)  # (B, T, D)
        if self.embedding is not None:
            if tokens is None:
                raise ValueError("this classifier concatenates token embeddings: pass tokens")
            h = torch.cat([h, self.embedding(tokens)], dim=-1)  # (B, T, D+E)
        h = fast_dropout(h, self.config.dropout, self.training)
        out = self.bilstm(h, mask.sum(1))  # (B, T, 2Hc)
        if self.output_mix is not None:
            elmo = fast_dropout(self.output_mix(layers, mask), self.config.dropout, self.training)
            out = torch.cat([out, elmo.to(out.dtype)], dim=-1)  # (B, T, 2Hc+D)
        m = mask.unsqueeze(-1)  # (B, T, 1)
        if bool(mask.all()):  # every document spans T (most length-bucketed batches): no masking
            mean = out.sum(1) / m.sum(1).clamp_min(1)  # (B, P), P = 2Hc (+ D)
            mx = out.max(1).values  # (B, P)
        else:
            mean = (out * m).sum(1) / m.sum(1).clamp_min(1)  # (B, P)
            mx = out.masked_fill(~m, -1e4).max(1).values  # (B, P)
        return self.mlp(torch.cat([mean, mx], dim=-1))  # (B, C)


class FineTunedClassifier(nn.Module):
    """A biLM and a classifier head trained together (``ClassifierConfig.finetune_bilm``;
    ULMFiT, Howard & Ruder 2018): discriminative learning rates (each lower biLM layer's lr
    divided by ``bilm_lr_decay``) and gradual unfreezing (``unfreeze``: top layer first).

    The biLM's word table (row-sparse gradients) and its output softmax (unused by the task)
    stay frozen; the head's task token embedding is the token table that trains."""

    def __init__(self, bilm: BiLM, head: ELMoClassifier) -> None:
        super().__init__()
        self.bilm = bilm
        self.head = head
        for p in bilm.parameters():
            p.requires_grad_(False)

    @property
    def config(self) -> ClassifierConfig:
        return self.head.config

    def bilm_groups(self) -> list[list[nn.Parameter]]:
        """The biLM's trainable layer groups, top first: LSTM layer L (both directions), ...,
        LSTM layer 1, then the token encoder (char CNN or the E -> D projection)."""
        b = self.bilm
        groups = [
            [*f.parameters(), *r.parameters()]
            for f, r in zip(b.forward_lstms, b.backward_lstms, strict=True)
        ][::-1]
        encoder = [*b.project.parameters()]
        if b.char_encoder is not None:
            encoder += [*b.char_encoder.parameters()]
        return [g for g in [*groups, encoder] if g]

    def unfreeze(self, n: int) -> None:
        """Let the top ``n`` biLM groups train (0 = the head alone)."""
        for i, group in enumerate(self.bilm_groups()):
            for p in group:
                p.requires_grad_(i < n)

    def forward(
        self, layers: torch.Tensor | None, mask: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """layers: ignored (None: the biLM computes them), mask (B, T) bool, tokens (B, T)
        vocabulary ids -> logits (B, C)."""
        tuned = any(p.requires_grad for p in self.bilm.parameters())
        with torch.set_grad_enabled(tuned and torch.is_grad_enabled()):
            layers = self.bilm(tokens, mask).layers  # (L+1, B, T, 2H)
        return self.head(layers, mask, tokens)
