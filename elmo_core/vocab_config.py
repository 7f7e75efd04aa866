"""The vocabulary stage's config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VocabConfig:
    min_count: int = 2  # tokens seen fewer times in the pretraining text map to <unk>
    max_size: int = 50_000  # cap on the vocabulary, special tokens included

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.max_size < 5:  # the four special tokens plus at least one word
            raise ValueError(f"max_size must be >= 5, got {self.max_size}")
