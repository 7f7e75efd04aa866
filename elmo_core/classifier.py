"""Document classifier on frozen ELMo layers: mix -> dropout -> BiLSTM -> pooling -> MLP."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from elmo_core.config import ClassifierConfig


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
        self.dropout = nn.Dropout(config.dropout)
        e = config.token_embedding_dim
        self.embedding = nn.Embedding(vocab_size, e, padding_idx=0) if e else None
        if self.embedding is not None and init_embedding is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init_embedding[:, :e])
        self.rnn = nn.LSTM(
            input_dim + e,
            config.hidden_dim,
            num_layers=config.num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        sizes = [4 * config.hidden_dim, *config.mlp_hidden]
        mlp: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            mlp += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(config.dropout)]
        mlp.append(nn.Linear(sizes[-1], num_classes))
        self.mlp = nn.Sequential(*mlp)

    def forward(
        self, layers: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """layers (L, B, T, D) float, mask (B, T) bool, tokens (B, T) ids -> logits (B, C)."""
        h = self.mix(layers, mask)  # (B, T, D)
        if self.embedding is not None:
            if tokens is None:
                raise ValueError("this classifier concatenates token embeddings: pass tokens")
            h = torch.cat([h, self.embedding(tokens)], dim=-1)  # (B, T, D+E)
        h = self.dropout(h)
        lengths = mask.sum(1).clamp_min(1).cpu()  # (B,)
        packed = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])  # (B, T, 2Hc)
        m = mask.unsqueeze(-1)  # (B, T, 1)
        mean = (out * m).sum(1) / m.sum(1).clamp_min(1)  # (B, 2Hc)
        mx = out.masked_fill(~m, -1e4).max(1).values  # (B, 2Hc)
        return self.mlp(torch.cat([mean, mx], dim=-1))  # (B, C)
