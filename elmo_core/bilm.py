"""The bidirectional language model of ELMo (Peters et al. 2018).

token encoder (a word embedding table, or ELMo's character CNN) -> L-layer forward LSTM LM and L-layer backward LSTM LM (separate stacks, residual
connections after the first layer) -> one output softmax shared by both directions, sampled during
training so a large vocabulary stays cheap. Letters: B batch, T time, L layers, E/H/D dims, V vocab,
N flattened tokens, C softmax candidates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn

from elmo_core.bilm_config import BiLMConfig
from elmo_core.char_encoder import CharEncoder, char_ids
from elmo_core.dropout import locked_dropout
from elmo_core.lstm import clipped_lstm, compute_dtype, lstm_steps, reverse_padded
from elmo_core.sampled_softmax import SampledSoftmax
from elmo_core.vocab import Vocab

# the stateful reading's states: direction -> per layer (h (B, D), c (B, H))
Carry = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


def _direction(
    carry: Carry | None, direction: str, lengths: torch.Tensor | None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, torch.Tensor | None]:
    return (None, None) if carry is None else (carry[direction], lengths)


def with_sentence_marks(
    tokens: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows (B, T), lengths (B,) -> <s> row </s> (B, T+2), lengths + 2."""
    b, t = tokens.shape
    out = tokens.new_zeros(b, t + 2)  # (B, T+2)
    out[:, 0] = Vocab.bos_id
    out[:, 1 : t + 1] = tokens * (torch.arange(t, device=tokens.device) < lengths.unsqueeze(1))
    out[torch.arange(b, device=tokens.device), lengths + 1] = Vocab.eos_id
    return out, lengths + 2


@dataclass
class BiLMOutput:
    layers: torch.Tensor  # (L+1, B, T, 2H): layer 0 = [x; x], layer k = [forward_k; backward_k]
    mask: torch.Tensor  # (B, T) bool, True on real tokens


class BiLM(nn.Module):
    """ELMo's biLM. ``forward`` gives every layer and the mask; ``lm_loss`` trains it.

    With ``projection_dim`` P each LSTM has H cells and a P-wide projected output (ELMo's
    4096 / 512), so D = P below; without it D = H."""

    word_chars: torch.Tensor  # (V, C) character ids of the vocabulary (char encoder; a buffer)

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
        self.word_chars.copy_(self._spell(words))

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
                [state["word_chars"], self._spell(words).to(proposal.device)]
            )
        grown.load_state_dict(state)
        return grown.train(self.training)

    def _spell(self, words: Sequence[str]) -> torch.Tensor:
        """(W, C) character ids of ``words`` in this biLM's id scheme."""
        return char_ids(words, self.config.max_chars, self.config.char_ids)

    @property
    def open_vocabulary(self) -> bool:
        """True when words outside the vocabulary get their own input vectors (char encoder)."""
        return self.char_encoder is not None

    def extra_chars(self, words: Sequence[str]) -> torch.Tensor | None:
        """Character ids (W, C) of out-of-vocabulary words, addressed as ids V.. V+W-1 by
        ``forward``; None for the word encoder or when there are none."""
        if self.char_encoder is None or not words:
            return None
        return self._spell(words).to(self.word_chars.device)

    @torch.no_grad()
    def input_vectors(self, chunk: int = 4096) -> torch.Tensor:
        """(V, E) the token encoder's vector of every vocabulary word (before the projection
        to D): the start of a task token embedding."""
        if self.char_encoder is None:
            assert self.embedding is not None
            return self.embedding.weight.detach()
        out = [
            self.char_encoder(self.word_chars[i : i + chunk])
            for i in range(0, self.config.vocab_size, chunk)
        ]
        vecs = torch.cat(out)
        vecs[0] = 0.0  # <pad>
        return vecs

    def sparse_parameters(self) -> list[torch.Tensor]:
        """Parameters with sparse gradients (embedding, softmax rows): for a row-sparse Adam."""
        table: list[torch.Tensor] = [] if self.embedding is None else [self.embedding.weight]
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
            assert self.embedding is not None
            return compute_dtype(self.project(self.embedding(tokens)))
        ids, inv = torch.unique(tokens, return_inverse=True)  # (U,), (B, T)
        table = self.word_chars if extra is None else torch.cat([self.word_chars, extra])
        if int(ids[-1]) >= len(table):
            raise ValueError(f"token id {int(ids[-1])} is outside vocabulary + extra words")
        vecs = self.project(self.char_encoder(table.index_select(0, ids)))  # (U, D)
        pad = ids == 0
        if bool(pad.any()):  # <pad> reads as zero, as the word table's padding row
            vecs = vecs.masked_fill(pad.unsqueeze(1), 0.0)
        return compute_dtype(vecs.index_select(0, inv.reshape(-1)).view(*tokens.shape, -1))

    def _drop(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), variational dropout while training."""
        return locked_dropout(x, self.dropout_p, self.training, inplace)

    def _lstm(self, lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
        """One LSTM layer (B, T, D) -> (B, T, D): the fused kernel, or the step loop when
        clipping is on."""
        if self.config.cell_clip or self.config.proj_clip:
            return clipped_lstm(lstm, x, self.config.cell_clip, self.config.proj_clip)
        return lstm(x)[0]

    def _stack(
        self,
        lstms: nn.ModuleList,
        x: torch.Tensor,
        carry: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        lengths: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Run one direction's stack; residual after the first layer (``config.residual``).
        (B, T, D) -> L x (B, T, D).

        ``x`` arrives with dropout applied (once, shared by both directions); dropout is applied
        again between layers. All dropout is variational (``locked_dropout``). ``carry``: each
        layer's (h (B, D), c (B, H)) to start from, replaced by each row's final state at its
        ``lengths`` (the stateful reading); None starts every layer from zeros.
        """
        outs = []
        for i, lstm in enumerate(lstms):
            inp = x if i == 0 else self._drop(x)
            if carry is None:
                y = self._lstm(cast(nn.LSTM, lstm), inp)  # (B, T, D)
            else:
                clips = self.config.cell_clip, self.config.proj_clip
                y, h, c = lstm_steps(cast(nn.LSTM, lstm), inp, *clips, carry[i], lengths)
                carry[i] = (h, c)
            if i > 0 and self.config.residual:
                y = y + x
            outs.append(y)
            x = y
        return outs

    def states(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        carry: Carry | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """tokens (B, T) -> token vectors (B, T, H), forward and backward layer states L x (B, T, H).

        ``lengths`` (B,) marks right padding; None means every row is full (training windows).
        Backward states are returned in the original time order. ``extra``: see ``forward``;
        ``carry``: the stateful reading's states per direction (``elmo_core.stateful``).
        """
        x = self._embed(tokens, extra)  # (B, T, H)
        xd = self._drop(x)
        if carry is not None and lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
        fwd = self._stack(self.forward_lstms, xd, *_direction(carry, "forward", lengths))
        if lengths is None:
            bwd = [y.flip(1) for y in self._stack(self.backward_lstms, xd.flip(1))]
        else:
            rev = reverse_padded(xd, lengths)  # (B, T, H)
            back = self._stack(self.backward_lstms, rev, *_direction(carry, "backward", lengths))
            bwd = [reverse_padded(y, lengths) for y in back]
        return x, fwd, bwd

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        extra: torch.Tensor | None = None,
        carry: Carry | None = None,
    ) -> BiLMOutput:
        """tokens (B, T) long, mask (B, T) bool (right padding) -> BiLMOutput, layers (L+1, B, T, 2H).

        ``extra`` (W, C), char encoder only: character ids of out-of-vocabulary words, which
        ``tokens`` address as ids V .. V+W-1 (``extra_chars``). With ``config.sentence_marks``
        each row is read as <s> row </s> and the marks' positions are dropped again."""
        lengths = mask.sum(1)  # (B,)
        if self.config.sentence_marks:
            tokens, lengths = with_sentence_marks(tokens, lengths)  # (B, T+2), (B,)
        x, fwd, bwd = self.states(tokens, lengths, extra, carry)
        layers = [torch.cat([x, x], dim=-1)]  # (B, T, 2H)
        layers += [torch.cat([f, b], dim=-1) for f, b in zip(fwd, bwd, strict=True)]
        stacked = torch.stack(layers)  # (L+1, B, T or T+2, 2H)
        if self.config.sentence_marks:
            stacked = stacked[:, :, 1 : mask.shape[1] + 1]  # (L+1, B, T, 2H): marks dropped
        stacked = stacked * mask.unsqueeze(0).unsqueeze(-1)  # (L+1, B, T, 2H)
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
