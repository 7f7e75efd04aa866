"""The layer-extraction stage's config: how much of each document the biLM reads, and how."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayersConfig:
    # T cap: tokens per document read (the rest is cut, and the run counts what was cut);
    # generous, so whole news articles are read, not their first paragraph
    max_len: int = 1024
    # the biLM reads documents longer than this in overlapping pieces of at most this many
    # tokens (0 = whole); each kept token has `context` tokens of context on both sides
    window: int = 256
    context: int = 32

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.context < 0 or (self.window and self.window <= 2 * self.context):
            raise ValueError(
                f"window must be 0 or > 2 * context, got window {self.window}, "
                f"context {self.context}"
            )
