"""A classifier checkpoint: its config, mix, weights, label names and how its documents were
read (the layer-extraction config) in one weights-only file."""

from __future__ import annotations

import os
from dataclasses import asdict, fields

from elmo_core.checkpoint import CheckpointError, atomic_save, config_from, safe_load
from elmo_core.classifier import ELMoClassifier
from elmo_core.classifier_config import ClassifierConfig, MixConfig
from elmo_core.layers_config import LayersConfig
from elmo_core.mix import build_mix


def save_classifier(
    path: str | os.PathLike[str],
    model: ELMoClassifier,
    mix_config: MixConfig,
    input_dim: int,
    label_names: list[str],
    layers: LayersConfig,
) -> None:
    atomic_save(
        {
            "kind": "classifier",
            "config": asdict(model.config),
            "mix_config": asdict(mix_config),
            "input_dim": input_dim,
            "vocab_size": model.embedding.num_embeddings if model.embedding is not None else 0,
            "label_names": list(label_names),
            "layers": asdict(layers),
            "state_dict": model.state_dict(),
        },
        path,
    )


def load_classifier(path: str | os.PathLike[str]) -> tuple[ELMoClassifier, list[str]]:
    """Rebuild a classifier head (mix included) and its label names."""
    ckpt = safe_load(path)
    if ckpt["kind"] != "classifier":
        raise CheckpointError(f"{path} holds a {ckpt['kind']!r}, not a classifier")
    mix = build_mix(config_from(MixConfig, ckpt["mix_config"]))
    labels = list(ckpt["label_names"])
    known = {f.name for f in fields(ClassifierConfig)}  # older checkpoints carried more
    model = ELMoClassifier(
        config_from(ClassifierConfig, {k: v for k, v in ckpt["config"].items() if k in known}),
        mix,
        ckpt["input_dim"],
        len(labels),
        vocab_size=ckpt.get("vocab_size", 0),
    )
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), labels


def load_layers_config(path: str | os.PathLike[str]) -> LayersConfig:
    """How the classifier's documents were read (cap, biLM windows), so inference reads them
    the same way; checkpoints written before it was recorded carried it in their config."""
    ckpt = safe_load(path)
    saved = ckpt.get("layers") or ckpt["config"]
    return config_from(
        LayersConfig, {f.name: saved[f.name] for f in fields(LayersConfig) if f.name in saved}
    )
