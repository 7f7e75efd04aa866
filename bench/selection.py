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
    "macro F1": lambda v: (v["small"]["macro_f1"],),
    "accuracy + macro F1": lambda v: (v["small"]["accuracy"] + v["small"]["macro_f1"],),
    # references, not rules: a large validation split's choice, and the best test accuracy
    "(whole validation split's accuracy)": lambda v: (v["full"]["accuracy"],),
    "(test oracle)": lambda v: (v["test"]["accuracy"],),
}
# rules that keep the best of one score but count patience on two: a validation that improves
# either score's best resets it, so training goes on while the rare classes (macro F1) still
# improve after accuracy, which the frequent classes dominate, has levelled off
PATIENCE_ON_TWO: dict[str, tuple[str, str]] = {  # name: (rule kept by, rule also resetting)
    "accuracy, patience also on macro F1": ("accuracy", "macro F1"),
}


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1, mean NLL and mean true-class probability of (N, C) probabilities."""
    pred = probs.argmax(1)
    return {
        "accuracy": float((pred == labels).mean()),
        "macro_f1": training.macro_f1(labels, pred, probs.shape[1]),
        "loss": training.validation_loss(probs, labels),
        "true_class_probability": float(probs[np.arange(len(labels)), labels].mean()),
    }


def replay(
    trace: list[dict[str, Any]],
    key: Callable[[dict[str, dict[str, float]]], tuple[float, ...]],
    patience: int,
    min_steps: int,
    also: Callable[[dict[str, dict[str, float]]], tuple[float, ...]] | None = None,
) -> dict[str, Any]:
    """The training loop's keep-the-best and patience stop, on recorded validations: the
    indices of the kept and the last validation, and whether the trace ended before the
    patience stop. With ``also``, a new best of that score resets the patience too (the kept
    validation is still the best of ``key``)."""
    best, best_i, bad = None, 0, 0
    best_also = None
    for i, v in enumerate(trace):
        k = key(v)
        gained = False
        if also is not None:
            a = also(v)
            if best_also is None or a > best_also:
                best_also, gained = a, True
        if best is None or k > best:
            best, best_i, bad = k, i, 0
        elif gained:
            bad = 0
        else:
            bad += 1
        if bad >= patience and v["step"] >= min_steps:
            return {"kept": best_i, "stopped": i, "truncated": False}
    return {"kept": best_i, "stopped": len(trace) - 1, "truncated": True}


def summarize(
    fits: list[dict[str, Any]], strategies: list[str], patience: int, min_steps: int
) -> list[dict[str, Any]]:
    """Every rule replayed on every fit: per rule and strategy, the kept averages' test scores
    and the kept and stopped steps."""
    rules: list[tuple[str, Any, Any]] = [(name, key, None) for name, key in RULES.items()]
    rules += [(name, RULES[k], RULES[also]) for name, (k, also) in PATIENCE_ON_TWO.items()]
    summary = []
    for rule, rule_key, also in rules:
        if "macro_f1" not in fits[0]["trace"][0]["small"] and "macro F1" in rule:
            continue  # a report recorded before macro F1 was
        for strategy in strategies:
            kept = []
            for fit in (f for f in fits if f["strategy"] == strategy):
                r = replay(fit["trace"], rule_key, patience, min_steps, also)
                kept.append((fit["trace"][r["kept"]], fit["trace"][r["stopped"]], r["truncated"]))
            accs = [k["test"]["accuracy"] for k, _, _ in kept]
            row = {
                "rule": rule,
                "strategy": strategy,
                "test_accuracy_mean": statistics.mean(accs),
                "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "kept_steps": [k["step"] for k, _, _ in kept],
                "stopped_steps": [s["step"] for _, s, _ in kept],
                "trace_ended_first": sum(t for _, _, t in kept),
            }
            if "macro_f1" in kept[0][0]["test"]:
                row["test_macro_f1_mean"] = statistics.mean(
                    k["test"]["macro_f1"] for k, _, _ in kept
                )
            summary.append(row)
    return summary


def write(out: str, report: dict[str, Any]) -> None:
    rules = [r for r in report["summary"] if not r["rule"].startswith("(")]
    best = max(rules, key=lambda r: r["test_accuracy_mean"])
    write_report(out, report, f"best_rule={best['rule']}", hide="fits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=None)
    ap.add_argument("--docs", type=int, default=450, help="stratified labelled train documents")
    ap.add_argument("--val-docs", type=int, default=50, help="the small validation subset")
    ap.add_argument("--strategy", nargs="+", default=["wsum", "sum"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    ap.add_argument("--steps", type=int, default=1600, help="each fit's fixed length")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "selection.json"))
    ap.add_argument(
        "--replay",
        default=None,
        help="a report of this bench: replay the rules on its recorded fits (no training)",
    )
    args = ap.parse_args()
    if args.replay:
        report = read_json(Path(args.replay))
        strategies = list(dict.fromkeys(f["strategy"] for f in report["fits"]))
        report["summary"] = summarize(
            report["fits"], strategies, report["patience"], report["min_steps"]
        )
        report["replayed_by"] = " ".join(["python", *sys.argv])
        write(args.out, report)
        return
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

    summary = summarize(fits, args.strategy, base.patience, base.min_steps)
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
    write(args.out, report)


if __name__ == "__main__":
    main()
