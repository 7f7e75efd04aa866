"""ELMo's character token encoder: byte ids of each word, a character CNN, highway layers
and a projection, so any word gets a vector (no input <unk>). Two id schemes: our compact
one, and ELMo's own (``BiLMConfig.char_ids``), with which published ELMo weights compute
exactly what the original implementation computes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from elmo_core.bilm_config import BiLMConfig
from elmo_core.highway import Highway
from elmo_core.vocab import BOS, EOS

CHAR_PAD, CHAR_BOW, CHAR_EOW = 0, 1, 2  # compact character ids; UTF-8 byte b is id b + 3


NUM_CHARS = 256 + 3

# ELMo's character ids as its biLM reads them: its vocabulary's ids (bytes 0-255, then begin
# and end of sentence, begin and end of word, padding) + 1, so that 0 marks no token at all
ELMO_BOS, ELMO_EOS, ELMO_BOW, ELMO_EOW, ELMO_PAD = 257, 258, 259, 260, 261
ELMO_NUM_CHARS = 262


def char_ids(words: Sequence[str], max_chars: int, scheme: str = "compact") -> torch.Tensor:
    """Words -> (N, max_chars) long character ids, long words cut (their end mark kept).

    compact: [BOW, UTF-8 bytes + 3, EOW, 0...]. elmo: [BOW, UTF-8 bytes + 1, EOW, PAD...],
    and the sentence marks <s> / </s> as [BOW, BOS or EOS, EOW, PAD...], as ELMo's batcher
    makes them. Deterministic: no character vocabulary."""
    if scheme == "elmo":
        return _elmo_char_ids(words, max_chars)
    out = torch.zeros(len(words), max_chars, dtype=torch.long)
    for i, w in enumerate(words):
        b = list(w.encode("utf-8", "replace")[: max_chars - 2])
        out[i, : len(b) + 2] = torch.tensor([CHAR_BOW, *(x + 3 for x in b), CHAR_EOW])
    return out


def _elmo_char_ids(words: Sequence[str], max_chars: int) -> torch.Tensor:
    out = torch.full((len(words), max_chars), ELMO_PAD, dtype=torch.long)
    marks = {BOS: [ELMO_BOS], EOS: [ELMO_EOS]}
    for i, w in enumerate(words):
        inner = marks.get(w) or [x + 1 for x in w.encode("utf-8", "ignore")[: max_chars - 2]]
        out[i, : len(inner) + 2] = torch.tensor([ELMO_BOW, *inner, ELMO_EOW])
    return out


class CharEncoder(nn.Module):
    """ELMo's token encoder: character embeddings -> 1-D convolutions of widths 1..K -> max
    over positions -> relu -> highway layers -> linear projection to E.

    The padding character embeds to zero, and a batch's character tensor is cut to its longest
    word plus K padding positions: every word then has all its windows that start inside it
    and one that is all padding, so its max-pool (and its vector) does not depend on which
    other words share its batch."""

    tap_mask: torch.Tensor  # (F, 1, K) which taps of the width-K convolution each filter uses
    widths: torch.Tensor  # (F,) each filter's width

    def __init__(self, config: BiLMConfig) -> None:
        super().__init__()
        self.max_width = len(config.char_filters)
        self.elmo_ids = config.char_ids == "elmo"
        self.max_chars = config.max_chars
        self.activation = torch.tanh if config.char_activation == "tanh" else F.relu
        chars = ELMO_NUM_CHARS if self.elmo_ids else NUM_CHARS
        # id 0 embeds to zero: the compact padding character, or ELMo's "no token"
        self.char_embedding = nn.Embedding(chars, config.char_dim, padding_idx=0)
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
        widths = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(config.char_filters)])
        self.register_buffer("widths", widths, persistent=False)
        with torch.no_grad():  # each filter initialised at its own width's fan-in
            fan_in = tap_mask.sum((1, 2)) * config.char_dim  # (width,)
            bound = fan_in.rsqrt().unsqueeze(-1).unsqueeze(-1)
            self.conv.weight.uniform_(-1.0, 1.0).mul_(bound).mul_(tap_mask)
            assert self.conv.bias is not None
            self.conv.bias.uniform_(-1.0, 1.0).mul_(bound.flatten())
        self.highways = nn.ModuleList(Highway(width) for _ in range(config.char_highway))
        self.project = nn.Linear(width, config.embedding_dim)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        """chars (N, C) long character ids -> word vectors (N, E)."""
        h = self._elmo_pool(chars) if self.elmo_ids else self._compact_pool(chars)  # (N, F)
        for hw in self.highways:
            h = hw(h)
        return self.project(h)  # (N, E)

    def _elmo_pool(self, chars: torch.Tensor) -> torch.Tensor:
        """ELMo's CNN: every window of each width that lies inside the max_chars positions,
        max-pooled, then the activation. (N, C) -> (N, F).

        Words are read up to the batch's longest word plus K positions (at most max_chars):
        the windows left out are all padding, like one that is kept, so no max changes."""
        real = (chars != ELMO_PAD) & (chars != 0)
        used = int(real.sum(1).max()) if chars.numel() else 0
        c = min(used + self.max_width, self.max_chars)
        x = chars[:, :c]
        if self.max_width > 1:  # room for the width-K convolution's last start
            x = F.pad(x, (0, self.max_width - 1), value=ELMO_PAD)
        e = self.char_embedding(x).transpose(1, 2)  # (N, char_dim, C+K-1)
        y = F.conv1d(e, self.conv.weight * self.tap_mask, self.conv.bias)  # (N, F, C)
        starts = torch.arange(c, device=chars.device)  # (C,)
        outside = starts.unsqueeze(0) > (c - self.widths).unsqueeze(1)  # (F, C)
        y = y.masked_fill(outside, float("-inf"))
        return self.activation(y.max(dim=-1).values)  # (N, F)

    def _compact_pool(self, chars: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, F): windows up to the batch's longest word plus K zero positions."""
        used = int((chars != CHAR_PAD).sum(1).max()) if chars.numel() else 1
        c = min(chars.shape[1], used) + self.max_width  # every word: >= 1 all-padding window
        if chars.shape[1] < c:
            chars = F.pad(chars, (0, c - chars.shape[1]), value=CHAR_PAD)
        x = self.char_embedding(chars[:, :c]).transpose(1, 2)  # (N, char_dim, C)
        y = F.conv1d(x, self.conv.weight * self.tap_mask, self.conv.bias)  # (N, F, C-K+1)
        return self.activation(y.max(dim=-1).values)  # (N, F), F = sum of char_filters
