"""Test accuracy against the number of labelled training documents: one ELMo strategy, the
static-word-vector ablation (``classifier-static``: the biLM's layer 0 only) and the TF-IDF
baseline, each trained on stratified subsets of a finished run's train split, evaluated on
the whole test split.

It reuses a finished run's stages (biLM, stored layers, classifier settings) from its home
folder, so it takes minutes, not a pretraining. The validation split and early stopping are the
run's own. From the two largest subsets it fits accuracy = a + b * log2(n) and reports the n at
which that line would reach --target: how far the labelled sample is from it.

    .venv/bin/python bench/learning_curve.py --home .elmo-news [--strategy wsum] \\
        [--fractions 0.125 0.25 0.5 1] [--target 0.91]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.machine import machine, write_report  # noqa: E402
from elmo_core.classifier_config import ClassifierConfig  # noqa: E402
from elmo_core.classifier_training import predict_proba, train_classifier  # noqa: E402
from elmo_core.mix import ABLATION  # noqa: E402
from storage.datasets import read_dataset  # noqa: E402
from storage.layers import LayerStore  # noqa: E402
from storage.paths import Home, read_json  # noqa: E402
from tasks.baseline import BaselineConfig, fit_baseline  # noqa: E402
from tasks.classify import new_classifier  # noqa: E402
from tasks.common import set_threads  # noqa: E402
from tasks.features import layer_store  # noqa: E402


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted document indices: ``fraction`` of each class (at least one), seeded."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(keep))


def subset_store(store: LayerStore, idx: np.ndarray) -> LayerStore:
    """The documents ``idx`` of a store, copied into memory (rows stay whole documents)."""
    lens = store.offsets[idx + 1] - store.offsets[idx]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    rows = np.concatenate([np.arange(store.offsets[i], store.offsets[i + 1]) for i in idx])
    return LayerStore(  # a document's rows are one contiguous range (a RowFile reads ranges)
        features=np.concatenate(
            [store.features[store.offsets[i] : store.offsets[i + 1]] for i in idx]
        ),
        offsets=offsets,
        labels=store.labels[idx],
        tokens=None if store.tokens is None else store.tokens[rows],
        static=store.static,  # layer 0 per distinct token: the table is shared, its rows picked
        static_rows=None if store.static is None else store.static_rows[rows],
    )


def run_classifier_config(run: dict, model_key: str) -> ClassifierConfig:
    """The classifier settings a finished run trained ``model_key`` with, without checkpoints
    (a bench's fits are not resumed)."""
    saved = read_json(Path(run["models"][model_key]["dir"]) / "config.json")["classifier"]
    config = ClassifierConfig(**{**saved, "mlp_hidden": tuple(saved["mlp_hidden"])})
    return replace(config, checkpoint_every=0)


def split_texts(run: dict) -> dict[str, list[str]]:
    """The train and test documents' texts of a finished run's dataset, in split order (the
    order of its layer stores)."""
    return {
        s: read_dataset(Path(run["dataset"]) / f"{s}.parquet")["text"].to_list()
        for s in ("train", "test")
    }


def tfidf_test_accuracy(
    texts: dict[str, list[str]], idx: np.ndarray, labels: np.ndarray, test_labels: np.ndarray
) -> float:
    """The TF-IDF baseline fitted on the train documents ``idx`` (labels ``labels``): its test
    accuracy."""
    vec, clf = fit_baseline([texts["train"][i] for i in idx], labels, BaselineConfig())
    return float((clf.predict(vec.transform(texts["test"])) == test_labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=None)
    ap.add_argument("--strategy", default="wsum", choices=["sum", "wsum", "function"])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
    ap.add_argument("--seed", type=int, default=0, help="subset draw")
    ap.add_argument("--target", type=float, default=0.91)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "learning_curve.json"))
    args = ap.parse_args()
    home = Home(args.home)
    run = home.latest_run()
    model_key = f"classifier-{args.strategy}"
    if model_key not in run["models"]:
        raise ValueError(f"the latest run under {home.root} has no {model_key}")
    config = run_classifier_config(run, model_key)
    set_threads()
    import torch

    train, val, test = (layer_store(run["features"], s) for s in ("train", "val", "test"))
    label_names = read_json(Path(run["dataset"]) / "labels.json")
    texts = split_texts(run)
    n_layers, dim = train.layer_shape
    points = []
    for fraction in sorted(args.fractions):
        idx = stratified_subset(train.labels, fraction, args.seed)
        sub = subset_store(train, idx)
        fits = {}
        for strategy in (args.strategy, ABLATION):
            model, _ = new_classifier(
                run["bilm"], strategy, config, n_layers, dim, len(label_names)
            )
            t0 = time.perf_counter()
            res = train_classifier(model, sub, val, config, device=torch.device("cpu"))
            acc = float((predict_proba(model, test).argmax(1) == test.labels).mean())
            fits[strategy] = (acc, res, time.perf_counter() - t0)
        elmo_acc, res, elmo_s = fits[args.strategy]
        static_acc, static_res, _ = fits[ABLATION]
        base_acc = tfidf_test_accuracy(texts, idx, sub.labels, test.labels)
        point = {
            "fraction": fraction,
            "train_docs": len(idx),
            "elmo_test_accuracy": elmo_acc,
            "elmo_best_val_accuracy": res.best_val_accuracy,
            "elmo_best_step": res.best_step,
            "elmo_stop_reason": res.stop_reason,
            "elmo_wall_s": elmo_s,
            "static_test_accuracy": static_acc,
            "static_best_val_accuracy": static_res.best_val_accuracy,
            "elmo_gain": elmo_acc - static_acc,
            "baseline_test_accuracy": base_acc,
        }
        points.append(point)
        print(json.dumps(point), flush=True)
    report: dict = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "run": run["parent_run_id"],
        "strategy": args.strategy,
        "classifier": asdict(config),
        "test_docs": len(test),
        "points": points,
    }
    if len(points) >= 2:
        (n1, a1), (n2, a2) = [(p["train_docs"], p["elmo_test_accuracy"]) for p in points[-2:]]
        slope = (a2 - a1) / math.log2(n2 / n1)  # accuracy per doubling of labelled documents
        report["elmo_gain_per_doubling"] = slope
        if slope > 0:
            report["elmo_docs_for_target_extrapolated"] = round(
                n2 * 2 ** ((args.target - a2) / slope)
            )
    gain = report.get("elmo_gain_per_doubling", float("nan"))
    write_report(args.out, report, f"elmo_gain_per_doubling={gain:.4f}", hide="points")


if __name__ == "__main__":
    main()
