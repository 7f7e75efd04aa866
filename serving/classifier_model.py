"""The MLflow pyfunc model of elmo-news (logged as "models from code": nothing is pickled).

Artifacts: ``bilm`` (biLM checkpoint with its vocabulary) and ``classifier`` (head checkpoint), both
read with ``torch.load(weights_only=True)``. Input: a DataFrame with a ``text`` column (title and
description joined as ingest does, or any news text). Output: label id, label name, probabilities.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from elmo_core.bilm_checkpoint import load_bilm
from elmo_core.classifier_checkpoint import load_classifier, load_layers_config
from elmo_core.classifier_training import predict_proba
from elmo_core.device import pick_device
from elmo_core.extraction import encode_for
from elmo_core.text import tokenize
from serving.inference import layer_store_for


class ELMoNewsModel(PythonModel):
    def load_context(self, context: Any) -> None:
        self.bilm, self.vocab = load_bilm(context.artifacts["bilm"])
        self.classifier, self.labels = load_classifier(context.artifacts["classifier"])
        self.layers = load_layers_config(context.artifacts["classifier"])
        self.device = pick_device()

    def predict_tokens(self, tokens: list[list[str]]) -> np.ndarray:
        docs, extra = encode_for(self.bilm, self.vocab, tokens)
        # the stage's own cap and biLM windows: the evaluated layers
        store = layer_store_for(self.bilm, docs, self.layers, device=self.device, extra_words=extra)
        return predict_proba(self.classifier, store, self.device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        texts = model_input["text"].astype(str).tolist()
        probs = self.predict_tokens([tokenize(t) for t in texts])
        pred = probs.argmax(1)
        out = pd.DataFrame(
            {"label": pred.astype(np.int64), "label_name": [self.labels[i] for i in pred]}
        )
        for i, name in enumerate(self.labels):
            out[f"p_{name}"] = probs[:, i].astype(np.float64)
        return out


mlflow.models.set_model(ELMoNewsModel())
