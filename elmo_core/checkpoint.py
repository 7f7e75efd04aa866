"""Checkpoints = config + state_dict + vocab, written atomically and read with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from elmo_core.bilm import BiLM
from elmo_core.classifier import ELMoClassifier
from elmo_core.config import BiLMConfig, ClassifierConfig, MixConfig
from elmo_core.mix import build_mix
from elmo_core.vocab import Vocab


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, or not one of ours."""


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """torch.load with weights_only=True; anything unreadable raises CheckpointError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} does not exist") from e
    except Exception as e:  # truncated zip, pickle with globals, ...
        raise CheckpointError(f"checkpoint {path} is unreadable or unsafe: {e}") from e
    if not isinstance(obj, dict) or "kind" not in obj:
        raise CheckpointError(f"checkpoint {path} is not an elmo-news checkpoint")
    return obj


def _config(cls: type, d: dict[str, Any]) -> Any:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


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
    model = BiLM(_config(BiLMConfig, ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    vocab = Vocab(tuple(ckpt["vocab_tokens"]), tuple(ckpt["vocab_counts"]))
    return model.eval(), vocab


def save_classifier(
    path: str | os.PathLike[str],
    model: ELMoClassifier,
    mix_config: MixConfig,
    input_dim: int,
    label_names: list[str],
) -> None:
    atomic_save(
        {
            "kind": "classifier",
            "config": asdict(model.config),
            "mix_config": asdict(mix_config),
            "input_dim": input_dim,
            "vocab_size": model.embedding.num_embeddings if model.embedding is not None else 0,
            "label_names": list(label_names),
            "state_dict": model.state_dict(),
        },
        path,
    )


def load_classifier(path: str | os.PathLike[str]) -> tuple[ELMoClassifier, list[str]]:
    """Rebuild a classifier head (mix included) and its label names."""
    ckpt = safe_load(path)
    if ckpt["kind"] != "classifier":
        raise CheckpointError(f"{path} holds a {ckpt['kind']!r}, not a classifier")
    mix = build_mix(_config(MixConfig, ckpt["mix_config"]))
    labels = list(ckpt["label_names"])
    model = ELMoClassifier(
        _config(ClassifierConfig, ckpt["config"]),
        mix,
        ckpt["input_dim"],
        len(labels),
        vocab_size=ckpt.get("vocab_size", 0),
    )
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), labels
