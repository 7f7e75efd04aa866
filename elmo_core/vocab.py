"""Vocabulary: token <-> id, with counts kept for the sampled softmax's unigram proposal."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from elmo_core.vocab_config import VocabConfig

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS)


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]  # id -> token; the specials come first
    counts: tuple[int, ...]  # id -> count in the pretraining text (specials: their stream count)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)  # token -> id
    # the specials' ids (their order in SPECIALS)
    pad_id: ClassVar[int] = 0
    unk_id: ClassVar[int] = 1
    bos_id: ClassVar[int] = 2
    eos_id: ClassVar[int] = 3

    def __post_init__(self) -> None:
        if self.tokens[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {self.tokens[:4]}")
        if len(self.tokens) != len(self.counts):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.counts)} counts")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        index = self._index
        return [index.get(t, 1) for t in tokens]

    def encode_open(self, docs: Sequence[Sequence[str]]) -> tuple[list[list[int]], list[str]]:
        """Documents -> ids where each out-of-vocabulary word gets its own id V, V+1, ... (in
        order of first appearance) instead of <unk>, and the list of those words: the input
        of an open-vocabulary (character) encoder."""
        index = self._index
        extra: dict[str, int] = {}
        out = []
        for doc in docs:
            ids = []
            for t in doc:
                i = index.get(t)
                if i is None:
                    i = extra.setdefault(t, len(self.tokens) + len(extra))
                ids.append(i)
            out.append(ids)
        return out, list(extra)

    def extend(self, counts: Mapping[str, int], min_count: int, max_new: int) -> Vocab:
        """This vocabulary + the words of ``counts`` it lacks, seen ``min_count`` times or more
        (at most ``max_new`` of them, most frequent first, ties by token), appended after the
        existing ids so every old id keeps its meaning. ``counts`` should be on the scale of
        this vocabulary's own counts (they feed the sampled softmax's proposal)."""
        if min_count < 1 or max_new < 0:
            raise ValueError(
                f"extend: min_count >= 1 and max_new >= 0 required, got {min_count}, {max_new}"
            )
        index = self._index
        new = sorted(
            ((t, c) for t, c in counts.items() if c >= min_count and t not in index),
            key=lambda tc: (-tc[1], tc[0]),
        )[:max_new]
        return Vocab(
            self.tokens + tuple(t for t, _ in new), self.counts + tuple(int(c) for _, c in new)
        )

    def unigram(self) -> np.ndarray:
        """Unigram probabilities over ids (pad never sampled)."""
        c = np.asarray(self.counts, dtype=np.float64)
        c[0] = 0.0
        c = np.maximum(c, 0.0)
        return c / c.sum()

    @classmethod
    def build(cls, documents: Iterable[Sequence[str]], config: VocabConfig) -> Vocab:
        """Count tokens, keep those seen ``min_count`` times, most frequent first (ties by token)."""
        counter: Counter[str] = Counter()
        n_docs = 0
        for doc in documents:
            counter.update(doc)
            n_docs += 1
        return cls.from_counts(counter, n_docs, config)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], n_docs: int, config: VocabConfig) -> Vocab:
        """The vocabulary of already counted text (``n_docs`` documents: the count of <s> and
        </s>); what a streamed corpus's merged counts give, identical to ``build`` on its text."""
        kept = sorted(
            ((t, c) for t, c in counts.items() if c >= config.min_count and t not in SPECIALS),
            key=lambda tc: (-tc[1], tc[0]),
        )[: config.max_size - len(SPECIALS)]
        kept_set = {t for t, _ in kept}
        unk = sum(c for t, c in counts.items() if t not in kept_set and t not in SPECIALS)
        tokens = SPECIALS + tuple(t for t, _ in kept)
        freq = (0, unk, n_docs, n_docs) + tuple(c for _, c in kept)
        return cls(tokens=tokens, counts=freq)
