"""Model stages: pretrain the biLM, extract its layers once, train + evaluate one classifier per
mix strategy. Each returns the path of its stage folder."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import torch
from prefect import task

from elmo_core.bilm import BiLM
from elmo_core.checkpoint import load_bilm, load_classifier, save_bilm, save_classifier
from elmo_core.classifier import ELMoClassifier
from elmo_core.config import BiLMConfig, ClassifierConfig, MixConfig, PretrainConfig
from elmo_core.mix import ScalarMix, build_mix
from elmo_core.training import (
    LayerStore,
    doc_lengths,
    extract_layers,
    pick_device,
    predict_proba,
    pretrain_bilm,
    train_classifier,
)
from storage.datasets import read_dataset, write_parquet
from storage.paths import Home, is_complete, mark_complete, read_json, write_json
from tasks.common import STAGE_OPTS, History, Stage, cache_key, logger, set_threads
from tasks.data import SPLITS, load_vocab, pretraining_documents, stage_id
from tasks.evaluate import evaluate, plot_curves

BILM_CODE = ["elmo_core.bilm", "elmo_core.config", "elmo_core.training", "elmo_core.checkpoint"]
PRETRAIN = Stage("bilm", [*BILM_CODE, "elmo_core.vocab", "tasks.model"])
FEATURES = Stage("features", [*BILM_CODE, "tasks.model"])
CLASSIFIER = Stage(
    "classifier",
    [*BILM_CODE, "elmo_core.mix", "elmo_core.classifier", "tasks.model", "tasks.evaluate"],
)


def _encode_stream(docs: list[list[str]], vocab, seed: int) -> np.ndarray:
    """Documents -> one id stream ``<s> doc </s> <s> doc </s> ...`` in a seeded shuffled order."""
    order = np.random.default_rng(seed).permutation(len(docs))
    parts = []
    for i in order:
        parts.append(
            np.asarray([vocab.bos_id, *vocab.encode(docs[i]), vocab.eos_id], dtype=np.int32)
        )
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _pretrain_key(
    dataset: str,
    corpora: list[str],
    vocab: str,
    home: str,
    bilm: dict,
    train: PretrainConfig,
    device: str = "auto",
) -> str:
    inputs = {
        "dataset": stage_id(dataset),
        "corpora": ",".join(map(stage_id, corpora)),
        "vocab": stage_id(vocab),
    }
    return PRETRAIN.key(inputs, {"bilm": bilm, "train": asdict(train)})


@task(name="pretrain-bilm", cache_key_fn=cache_key(_pretrain_key), **STAGE_OPTS)
def pretrain(
    dataset: str,
    corpora: list[str],
    vocab: str,
    home: str,
    bilm: dict,
    train: PretrainConfig,
    device: str = "auto",
) -> str:
    """Pretrain the biLM on train split + corpora; resumable from the stage's train_state.pt.

    ``bilm`` holds BiLMConfig fields except vocab_size (set from the vocabulary)."""
    out = Home(home).stage_dir("bilm", _pretrain_key(dataset, corpora, vocab, home, bilm, train))
    if is_complete(out):
        return str(out)
    set_threads()
    v = load_vocab(vocab)
    config = BiLMConfig(vocab_size=len(v), **bilm)
    train_ids = _encode_stream(pretraining_documents(dataset, corpora), v, train.seed)
    val_docs = read_dataset(Path(dataset) / "val.parquet")["tokens"].to_list()
    val_ids = _encode_stream(val_docs, v, train.seed)[: max(train.val_tokens, train.window)]
    torch.manual_seed(train.seed)
    model = BiLM(config)
    model.softmax.set_proposal(torch.from_numpy(v.unigram()))
    log = logger()
    log.info(
        "biLM: %d params, %d train tokens, %d val tokens",
        sum(p.numel() for p in model.parameters()),
        len(train_ids),
        len(val_ids),
    )
    hist = History("biLM")
    t0 = time.perf_counter()
    res = pretrain_bilm(
        model, train_ids, val_ids, train, hist, out / "train_state.pt", pick_device(device)
    )
    save_bilm(out / "bilm.pt", model.cpu(), v)
    write_json(out / "config.json", {"bilm": asdict(config), "train": asdict(train)})
    hist.save(out / "history.json")
    plot_curves(hist.points, ["train_loss", "val_perplexity"], out, "biLM pretraining")
    write_json(
        out / "metrics.json",
        {
            "val_perplexity": res.val_perplexity,
            "val_perplexity_forward": res.val_perplexity_forward,
            "val_perplexity_backward": res.val_perplexity_backward,
            "train_tokens": res.tokens,
            "train_steps": res.steps,
            "tokens_per_s": res.tokens / max(res.seconds, 1e-9),
            "wall_s": time.perf_counter() - t0,
        },
    )
    (out / "train_state.pt").unlink(missing_ok=True)
    mark_complete(out)
    return str(out)


def _features_key(
    bilm_dir: str, dataset: str, home: str, max_len: int, device: str = "auto"
) -> str:
    return FEATURES.key(
        {"bilm": stage_id(bilm_dir), "dataset": stage_id(dataset)}, {"max_len": max_len}
    )


@task(name="extract-layers", cache_key_fn=cache_key(_features_key), **STAGE_OPTS)
def features(bilm_dir: str, dataset: str, home: str, max_len: int, device: str = "auto") -> str:
    """Run the frozen biLM once over every split; layers stored flat as float16 .npy files."""
    out = Home(home).stage_dir("features", _features_key(bilm_dir, dataset, home, max_len))
    if is_complete(out):
        return str(out)
    set_threads()
    model, vocab = load_bilm(Path(bilm_dir) / "bilm.pt")
    t0 = time.perf_counter()
    n_tokens = 0
    for split in SPLITS:
        df = read_dataset(Path(dataset) / f"{split}.parquet")
        docs = [vocab.encode(t) for t in df["tokens"].to_list()]
        offsets = np.concatenate([[0], np.cumsum(doc_lengths(docs, max_len))]).astype(np.int64)
        tmp = out / f".layers_{split}.npy.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        arr = np.lib.format.open_memmap(
            tmp,
            mode="w+",
            dtype=np.float16,
            shape=(int(offsets[-1]), model.num_output_layers, model.output_dim),
        )
        extract_layers(model, docs, arr, offsets, device=pick_device(device))
        arr.flush()
        del arr
        tmp.replace(out / f"layers_{split}.npy")
        np.save(out / f"offsets_{split}.npy", offsets)
        np.save(out / f"labels_{split}.npy", df["label"].to_numpy().astype(np.int64))
        n_tokens += int(offsets[-1])
    write_json(
        out / "metrics.json", {"feature_tokens": n_tokens, "wall_s": time.perf_counter() - t0}
    )
    mark_complete(out)
    return str(out)


def layer_store(features_dir: str, split: str) -> LayerStore:
    d = Path(features_dir)
    return LayerStore(
        features=np.load(d / f"layers_{split}.npy", mmap_mode="r"),
        offsets=np.load(d / f"offsets_{split}.npy"),
        labels=np.load(d / f"labels_{split}.npy"),
    )


def _classifier_key(
    features_dir: str,
    dataset: str,
    strategy: str,
    home: str,
    config: ClassifierConfig,
    device: str = "auto",
) -> str:
    inputs = {"features": stage_id(features_dir), "dataset": stage_id(dataset)}
    return CLASSIFIER.key(inputs, {"strategy": strategy, "classifier": asdict(config)})


@task(name="train-classifier", cache_key_fn=cache_key(_classifier_key), **STAGE_OPTS)
def classify(
    features_dir: str,
    dataset: str,
    strategy: str,
    home: str,
    config: ClassifierConfig,
    device: str = "auto",
) -> str:
    """Train the BiLSTM+MLP head with one mix strategy on frozen layers, evaluate on test."""
    out = Home(home).stage_dir(
        "classifier", _classifier_key(features_dir, dataset, strategy, home, config)
    )
    if is_complete(out):
        return str(out)
    set_threads()
    dev = pick_device(device)
    train, val, test = (layer_store(features_dir, s) for s in SPLITS)
    label_names = read_json(Path(dataset) / "labels.json")
    _, n_layers, dim = train.features.shape
    mix_config = MixConfig(strategy=strategy, num_layers=n_layers, dim=dim, seed=config.seed)
    torch.manual_seed(config.seed)
    model = ELMoClassifier(config, build_mix(mix_config), dim, len(label_names))
    hist = History(f"classifier-{strategy}")
    t0 = time.perf_counter()
    res = train_classifier(model, train, val, config, hist, out / "train_state.pt", dev)
    save_classifier(out / "model.pt", model.cpu(), mix_config, dim, label_names)
    probs = predict_proba(model, test, dev)
    pred = probs.argmax(1)
    metrics = evaluate(test.labels, pred, label_names, out, f"ELMo {strategy}")
    metrics.update(
        {
            "best_val_accuracy": res.best_val_accuracy,
            "best_epoch": res.best_epoch,
            "epochs_run": res.epochs_run,
            "wall_s": time.perf_counter() - t0,
        }
    )
    if isinstance(model.mix, ScalarMix):
        weights = model.mix.layer_weights().tolist()
        write_json(
            out / "layer_weights.json",
            {"weights": weights, "gamma": float(model.mix.gamma.detach())},
        )
        metrics.update({f"layer_weight_{i}": w for i, w in enumerate(weights)})
    test_ids = read_dataset(Path(dataset) / "test.parquet")["id"].to_numpy()
    write_parquet(
        pl.DataFrame(
            {
                "id": test_ids,
                "label": test.labels,
                "pred": pred,
                **{f"p_{n}": probs[:, i] for i, n in enumerate(label_names)},
            }
        ).to_arrow(),
        out / "predictions.parquet",
    )
    hist.save(out / "history.json")
    plot_curves(hist.points, ["train_loss", "val_accuracy"], out, f"classifier {strategy}")
    write_json(
        out / "config.json",
        {"strategy": strategy, "classifier": asdict(config), "mix": asdict(mix_config)},
    )
    write_json(out / "metrics.json", metrics)
    (out / "train_state.pt").unlink(missing_ok=True)
    mark_complete(out)
    logger().info("classifier %s: test accuracy %.4f", strategy, metrics["test_accuracy"])
    return str(out)


def load_pipeline_model(classifier_dir: str) -> tuple[ELMoClassifier, list[str]]:
    return load_classifier(Path(classifier_dir) / "model.pt")
