"""ELMo's stateful reading: the biLM keeps its LSTM states between batches, so a text read in
consecutive batches (batch i holding piece i of each row's text) is read as one continuous
text. Each batch row starts, per direction and layer, from the state the same row ended the
previous batch with; rows a smaller batch does not fill keep theirs."""

from __future__ import annotations

import torch

from elmo_core.bilm import BiLM, BiLMOutput, Carry


class StatefulReader:
    """A frozen biLM read statefully, with states for up to ``max_batch`` rows (zeros at
    first, as ELMo's). ``reset`` starts every row afresh."""

    def __init__(self, model: BiLM, max_batch: int) -> None:
        self.model = model
        self.max_batch = max_batch
        self.states: Carry = {}
        self.reset()

    def reset(self) -> None:
        w = next(self.model.parameters())
        d, h = self.model.state_dim, self.model.config.hidden_dim
        self.states = {
            direction: [
                (w.new_zeros(self.max_batch, d), w.new_zeros(self.max_batch, h))
                for _ in range(self.model.config.num_layers)
            ]
            for direction in ("forward", "backward")
        }

    @torch.no_grad()
    def __call__(
        self, tokens: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None = None
    ) -> BiLMOutput:
        """tokens (B, T), mask (B, T), B <= max_batch -> the biLM's output (see
        ``BiLM.forward``), read from the rows' carried states, which it then updates."""
        b = tokens.shape[0]
        if b > self.max_batch:
            raise ValueError(f"batch of {b} rows exceeds the reader's {self.max_batch}")
        carry = {d: [(h[:b], c[:b]) for h, c in layers] for d, layers in self.states.items()}
        out = self.model(tokens, mask, extra, carry)
        for direction, layers in self.states.items():
            for (h, c), (h_new, c_new) in zip(layers, carry[direction], strict=True):
                h[:b], c[:b] = h_new, c_new
        return out
