"""Which validation score should pick the kept weights when the validation split is small?

A dataset of 500 labelled documents validates on its own 10 %: about 50 documents, where one
document moves accuracy by two points. This bench trains one classifier per strategy and seed
on a stratified few-label subset of a finished run's train split, with the run's own classifier
settings and a fixed number of steps, and at each validation (the run's ``eval_every``) records
the weight average's accuracy, loss and mean true-class probability on a small stratified
validation subset and on the whole validation split, and its test accuracy. Selection rules are
then replayed on the same trajectories with the run's patience and step floor (the rule does not
change what is trained, only which average is kept and when training stops), so every rule is
compared on identical fits. The TF-IDF baseline is fitted on the same subset.

    .venv/bin/python bench/selection.py --home .elmo-news [--docs 450] [--val-docs 50] \\
        [--strategy wsum sum] [--seeds 7 8 9] [--steps 1600]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import elmo_core.classifier_training as training  # noqa: E402
from bench.learning_curve import (  # noqa: E402
    run_classifier_config,
    split_texts,
    stratified_subset,
    subset_store,
    tfidf_test_accuracy,
)
from bench.machine import machine, write_report  # noqa: E402
from storage.paths import Home, read_json  # noqa: E402
from tasks.classify import new_classifier  # noqa: E402
from tasks.common import set_threads  # noqa: E402
from tasks.features import layer_store  # noqa: E402

# a validation's scores -> a sortable key (higher is better); ties keep the earlier average,
# as the training loop's strict ``>`` does
RULES: dict[str, Callable[[dict[str, dict[str, float]]], tuple[float, ...]]] = {
    "accuracy": lambda v: (v["small"]["accuracy"],),
    "loss": lambda v: (-v["small"]["loss"],),
    "true-class probability": lambda v: (v["small"]["true_class_probability"],),
    "accuracy, ties on loss": lambda v: (v["small"]["accuracy"], -v["small"]["loss"]),
    # references, not rules: a large validation split's choice, and the best test accuracy
    "(whole validation split's accuracy)": lambda v: (v["full"]["accuracy"],),
    "(test oracle)": lambda v: (v["test"]["accuracy"],),
}


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, mean NLL and mean true-class probability of (N, C) probabilities."""
    return {
        "accuracy": float((probs.argmax(1) == labels).mean()),
        "loss": training.validation_loss(probs, labels),
        "true_class_probability": float(probs[np.arange(len(labels)), labels].mean()),
    }


def replay(
    trace: list[dict[str, Any]],
    key: Callable[[dict[str, dict[str, float]]], tuple[float, ...]],
    patience: int,
    min_steps: int,
) -> dict[str, Any]:
    """The training loop's keep-the-best and patience stop, on recorded validations: the
    indices of the kept and the last validation, and whether the trace ended before the
    patience stop."""
    best, best_i, bad = None, 0, 0
    for i, v in enumerate(trace):
        k = key(v)
        if best is None or k > best:
            best, best_i, bad = k, i, 0
        else:
            bad += 1
        if bad >= patience and v["step"] >= min_steps:
            return {"kept": best_i, "stopped": i, "truncated": False}
    return {"kept": best_i, "stopped": len(trace) - 1, "truncated": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=None)
    ap.add_argument("--docs", type=int, default=450, help="stratified labelled train documents")
    ap.add_argument("--val-docs", type=int, default=50, help="the small validation subset")
    ap.add_argument("--strategy", nargs="+", default=["wsum", "sum"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    ap.add_argument("--steps", type=int, default=1600, help="each fit's fixed length")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "selection.json"))
    args = ap.parse_args()
    run = Home(args.home).latest_run()
    key = next(k for k in run["models"] if k.startswith("classifier-"))
    base = run_classifier_config(run, key)
    set_threads()
    import torch

    train, val, test = (layer_store(run["features"], s) for s in ("train", "val", "test"))
    for n, store in ((args.docs, train), (args.val_docs, val)):
        if not 0 < n <= len(store):
            raise ValueError(f"{n} documents asked of a split of {len(store)}")
    idx = stratified_subset(train.labels, args.docs / len(train), 0)
    sub = subset_store(train, idx)
    small = subset_store(val, stratified_subset(val.labels, args.val_docs / len(val), 1))
    classes = len(read_json(Path(run["dataset"]) / "labels.json"))
    n_layers, dim = train.layer_shape
    tfidf = tfidf_test_accuracy(split_texts(run), idx, sub.labels, test.labels)

    # each validation of the small subset also scores the same average on the whole
    # validation split and the test split (the loop only reports aggregates)
    trace: list[dict[str, Any]] = []
    validate = training.predict_proba

    def recording(model: Any, store: Any, device: Any = None) -> np.ndarray:
        probs = validate(model, store, device)
        if store is small:
            trace.append(
                {
                    "small": scores(probs, small.labels),
                    "full": scores(validate(model, val, device), val.labels),
                    "test": scores(validate(model, test, device), test.labels),
                }
            )
        return probs

    training.predict_proba = recording  # type: ignore[assignment]
    fits = []
    for strategy in args.strategy:
        for seed in args.seeds:
            trace.clear()
            config = replace(
                base,
                seed=seed,
                min_steps=args.steps,
                max_steps=args.steps,
                patience=args.steps,
            )
            model, _ = new_classifier(run["bilm"], strategy, config, n_layers, dim, classes)
            t0 = time.perf_counter()
            training.train_classifier(model, sub, small, config, device=torch.device("cpu"))
            for i, v in enumerate(trace):
                v["step"] = min((i + 1) * base.eval_every, args.steps)
            fits.append(
                {
                    "strategy": strategy,
                    "seed": seed,
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "trace": list(trace),
                }
            )
            print(strategy, seed, [round(v["test"]["accuracy"], 4) for v in trace], flush=True)
    training.predict_proba = validate  # type: ignore[assignment]

    summary = []
    for rule, rule_key in RULES.items():
        for strategy in args.strategy:
            kept = []
            for fit in (f for f in fits if f["strategy"] == strategy):
                r = replay(fit["trace"], rule_key, base.patience, base.min_steps)
                kept.append((fit["trace"][r["kept"]], fit["trace"][r["stopped"]], r["truncated"]))
            accs = [k["test"]["accuracy"] for k, _, _ in kept]
            summary.append(
                {
                    "rule": rule,
                    "strategy": strategy,
                    "test_accuracy_mean": statistics.mean(accs),
                    "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "kept_steps": [k["step"] for k, _, _ in kept],
                    "stopped_steps": [s["step"] for _, s, _ in kept],
                    "trace_ended_first": sum(t for _, _, t in kept),
                }
            )
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "run": run["parent_run_id"],
        "train_docs": len(idx),
        "validation_docs": {"small": len(small), "whole": len(val)},
        "test_docs": len(test),
        "eval_every": base.eval_every,
        "patience": base.patience,
        "min_steps": base.min_steps,
        "tfidf_test_accuracy": tfidf,
        "summary": summary,
        "fits": fits,
    }
    rules = [r for r in summary if not r["rule"].startswith("(")]
    best = max(rules, key=lambda r: r["test_accuracy_mean"])
    write_report(args.out, report, f"best_rule={best['rule']}", hide="fits")


if __name__ == "__main__":
    main()
