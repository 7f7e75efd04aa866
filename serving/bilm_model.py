"""The MLflow pyfunc of a standalone biLM (``elmo-news-bilm``; "models from code", no pickles).

Artifact ``stage``: the biLM's whole stage folder (``bilm.pt`` = config + weights + vocabulary,
read with ``torch.load(weights_only=True)``; config, metrics, curves, the DONE manifest), so
``elmo-news run --bilm models:/elmo-news-bilm/N`` rebuilds the exact folder a run would have
pretrained. Input: a DataFrame with a ``text`` column. Output per document: ``n_tokens`` and
``embedding``, the mean over tokens of the average of the biLM's layers (``2H`` floats): a
document vector straight from the biLM, for a quick look; task models use the layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from elmo_core.bilm_checkpoint import load_bilm
from elmo_core.device import pick_device
from elmo_core.extraction import encode_for
from elmo_core.layers_config import LayersConfig
from elmo_core.text import tokenize
from serving.inference import layer_store_for

# how the embedding reads documents: the layer stage's defaults (cap, biLM pieces of long ones)
READ = LayersConfig()


class BiLMEmbedder(PythonModel):
    def load_context(self, context: Any) -> None:
        self.bilm, self.vocab = load_bilm(Path(context.artifacts["stage"]) / "bilm.pt")
        self.device = pick_device()

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        toks = [tokenize(str(t)) for t in model_input["text"].tolist()]
        docs, extra = encode_for(self.bilm, self.vocab, toks)
        store = layer_store_for(self.bilm, docs, READ, device=self.device, extra_words=extra)
        out, lens = [], np.diff(store.offsets)
        for i in range(len(docs)):
            rows = store.rows(store.offsets[i], store.offsets[i + 1]).astype(np.float64)
            out.append(rows.mean(axis=(0, 1)).tolist())  # (N_tok, L, 2H) → (2H,)
        return pd.DataFrame({"n_tokens": lens.astype(np.int64), "embedding": out})


mlflow.models.set_model(BiLMEmbedder())
