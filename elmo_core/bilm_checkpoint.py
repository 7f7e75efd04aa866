"""A biLM checkpoint: its config, weights and vocabulary in one weights-only file."""

from __future__ import annotations

import os
from dataclasses import asdict

from elmo_core.bilm import BiLM
from elmo_core.bilm_config import BiLMConfig
from elmo_core.checkpoint import CheckpointError, atomic_save, config_from, safe_load
from elmo_core.vocab import Vocab


def save_bilm(path: str | os.PathLike[str], model: BiLM, vocab: Vocab) -> None:
    atomic_save(
        {
            "kind": "bilm",
            "config": asdict(model.config),
            "state_dict": model.state_dict(),
            "vocab_tokens": list(vocab.tokens),
            "vocab_counts": list(vocab.counts),
        },
        path,
    )


def load_bilm(path: str | os.PathLike[str]) -> tuple[BiLM, Vocab]:
    """Rebuild a biLM and its vocabulary from one checkpoint file."""
    ckpt = safe_load(path)
    if ckpt["kind"] != "bilm":
        raise CheckpointError(f"{path} holds a {ckpt['kind']!r}, not a biLM")
    model = BiLM(config_from(BiLMConfig, ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    vocab = Vocab(tuple(ckpt["vocab_tokens"]), tuple(ckpt["vocab_counts"]))
    return model.eval(), vocab
