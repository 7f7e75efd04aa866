"""Layers for inference: the same float16 layers, batching and truncation as the layer
extraction stage, in memory, so a served prediction reproduces the evaluated one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from elmo_core.bilm import BiLM
from elmo_core.extraction import doc_lengths, extract_layers, open_ids, static_layer, vocab_ids
from elmo_core.layers_config import LayersConfig
from storage.layers import LayerStore


def layer_store_for(
    model: BiLM,
    docs: Sequence[Sequence[int]],
    layers: LayersConfig,
    labels: np.ndarray | None = None,
    device: torch.device | None = None,
    extra_words: Sequence[str] = (),
) -> LayerStore:
    """In-memory LayerStore of documents (ids, from ``encode_for``): the same float16 layers
    (layer 0 once per distinct token), batching and truncation as the pipeline's
    layer-extraction stage, so predictions reproduce the evaluated ones."""
    offsets = np.concatenate([[0], np.cumsum(doc_lengths(docs, layers.max_len))]).astype(np.int64)
    out = np.zeros((int(offsets[-1]), model.config.num_layers, model.output_dim), np.float16)
    extract_layers(
        model, docs, out, offsets, device=device, window=layers.window, context=layers.context,
        extra_words=extra_words, contextual_only=True,
    )  # fmt: skip
    static, rows = static_layer(model, open_ids(docs, offsets), extra_words, device)
    tokens = vocab_ids(docs, offsets, model.config.vocab_size)
    if labels is None:
        labels = np.full(len(docs), -1, dtype=np.int64)
    return LayerStore(out, offsets, labels, tokens, static, rows)
