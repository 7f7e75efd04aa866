"""Batch prediction and embedding with a registered model (or any MLflow model URI)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from prefect import flow, task

from elmo_core.extraction import encode_for
from elmo_core.text import join_text
from serving.inference import layer_store_for
from storage.datasets import write_parquet
from storage.errors import DataError
from storage.readers import read_ag_csv


def read_texts(path: str | Path) -> pl.DataFrame:
    """Documents to score -> DataFrame(row, text[, label]). CSV: AG News' headerless form or a
    header with ``text`` (or ``title``/``description``); Parquet: ``text`` column; anything else:
    plain text, one document per non-empty line."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: input file does not exist")
    if p.suffix == ".parquet":
        df = pl.read_parquet(p)
        if "text" not in df.columns:
            raise DataError(f"{p}: no 'text' column (has {df.columns})")
        cols = ["text"] + (["label"] if "label" in df.columns else [])
        return df.select(cols).with_row_index("row")
    if p.suffix == ".csv":
        first = p.open(encoding="utf-8", errors="replace").readline()
        if first.startswith('"') and first.split(",")[0].strip('"').isdigit():
            rows = read_ag_csv(p, "input")
            return pl.DataFrame(
                {
                    "row": [r["id"] - 1 for r in rows.rows],
                    "text": [r["text"] for r in rows.rows],
                    "label": [r["label"] for r in rows.rows],
                }
            )
        df = pl.read_csv(p, infer_schema=False)
        if "text" not in df.columns:
            parts = [c for c in ("title", "description", "body") if c in df.columns]
            if not parts:
                raise DataError(f"{p}: no text/title/description column (has {df.columns})")
            texts = [join_text(row) for row in df.select(parts).iter_rows()]
            df = df.with_columns(pl.Series("text", texts, dtype=pl.String))
        return df.select("text").with_row_index("row")
    lines = [
        ln for ln in p.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
    ]
    return pl.DataFrame({"text": lines}).with_row_index("row")


def _load(model_uri: str) -> Any:
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri)


@task(name="predict")
def predict_file(model_uri: str, input_path: str, output_path: str) -> dict[str, float]:
    """Score a file; writes Parquet (row, text, label, label_name, p_<class>...)."""
    model = _load(model_uri)
    df = read_texts(input_path)
    t0 = time.perf_counter()
    pred = pl.from_pandas(model.predict(df.select("text").to_pandas()))
    seconds = time.perf_counter() - t0
    out = pl.concat([df.select(["row", "text"]), pred], how="horizontal")
    write_parquet(out.to_arrow(), output_path)
    stats = {"docs": float(len(df)), "seconds": seconds, "docs_per_s": len(df) / max(seconds, 1e-9)}
    if "label" in df.columns:
        stats["accuracy"] = float((pred["label"].to_numpy() == df["label"].to_numpy()).mean())
    return stats


@flow(name="elmo-news-predict")
def elmo_news_predict(model: str, input: str, output: str) -> dict[str, float]:
    """Batch prediction with a registered model, e.g. models:/elmo-news-classifier@champion."""
    return predict_file(model, input, output)


def embed_file(model_uri: str, input_path: str, output_path: str, all_layers: bool = False) -> int:
    """Contextual token embeddings -> Parquet (row, position, token, vector). ``all_layers`` writes
    every biLM layer (L+1 vectors of 2H) instead of the model's learned mix. Returns tokens written."""
    from elmo_core.text import tokenize

    wrapper = _load(model_uri).unwrap_python_model()
    df = read_texts(input_path)
    toks = [tokenize(t)[: wrapper.layers.max_len] or ["<unk>"] for t in df["text"].to_list()]
    rows, positions, words, vectors = [], [], [], []
    mix = wrapper.classifier.mix.eval()
    # the layers as the classifier saw them: the same cap, the same windows over long documents
    docs, extra = encode_for(wrapper.bilm, wrapper.vocab, toks)  # unseen words: spelled (char)
    store = layer_store_for(wrapper.bilm.eval(), docs, wrapper.layers, extra_words=extra)
    with torch.no_grad():
        for i, t in enumerate(toks):
            doc = store.rows(store.offsets[i], store.offsets[i + 1])  # (T, L+1, 2H)
            layers = torch.from_numpy(doc.astype(np.float32)).permute(1, 0, 2)  # (L+1, T, 2H)
            vec = (
                layers.permute(1, 0, 2) if all_layers else mix(layers.unsqueeze(1), None)[0]
            )  # (T, L+1, 2H) | (T, D)
            for j, w in enumerate(t):
                rows.append(int(df["row"][i]))
                positions.append(j)
                words.append(w)
                vectors.append(vec[j].numpy().astype(np.float32).tolist())
    col = pa.list_(pa.list_(pa.float32())) if all_layers else pa.list_(pa.float32())
    table = pa.table(
        {
            "row": pa.array(rows, pa.int64()),
            "position": pa.array(positions, pa.int32()),
            "token": words,
            "vector": pa.array(vectors, col),
        }
    )
    write_parquet(table, output_path)
    return len(words)
