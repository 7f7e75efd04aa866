"""Does a learning-rate schedule pay on few labels? Classifier fits on a stratified subset of a
finished run's train split, once per schedule setting (learning-rate warm-up, decay on plateau),
strategy and seed, evaluated on the whole test split, validated and early-stopped on the run's
own validation split with the run's own classifier settings otherwise.

It reuses a finished run's stages (biLM, stored layers) from its home folder: minutes per fit,
no pretraining. Each ``--setting`` is a comma-separated list of classifier fields
(``warmup_steps=100,lr_decay=0.5``); an empty string is the run's own settings.

    .venv/bin/python bench/lr_schedule.py --home .elmo-news [--docs 500] \\
        [--setting "" warmup_steps=100 lr_decay=0.5] [--strategy wsum function] [--seeds 7 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.learning_curve import (  # noqa: E402
    run_classifier_config,
    stratified_subset,
    subset_store,
)
from bench.machine import machine, write_report  # noqa: E402
from elmo_core.classifier_config import ClassifierConfig  # noqa: E402
from elmo_core.classifier_training import predict_proba, train_classifier  # noqa: E402
from storage.paths import Home, read_json  # noqa: E402
from tasks.classify import new_classifier  # noqa: E402
from tasks.common import set_threads  # noqa: E402
from tasks.features import layer_store  # noqa: E402


def parse_setting(text: str, config: ClassifierConfig) -> dict[str, Any]:
    """``"warmup_steps=100,lr_decay=0.5"`` -> overrides typed as the config's own fields; an
    unknown field or a bad value raises ValueError naming it."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not hasattr(config, key):
            raise ValueError(f"setting {item!r}: expected FIELD=VALUE with a classifier field")
        kind = type(getattr(config, key))
        if kind not in (int, float):
            raise ValueError(f"setting {item!r}: only numeric classifier fields")
        out[key] = kind(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=None)
    ap.add_argument("--docs", type=int, default=500, help="stratified labelled train documents")
    ap.add_argument("--setting", nargs="+", default=["", "warmup_steps=100", "lr_decay=0.5"])
    ap.add_argument("--strategy", nargs="+", default=["wsum", "function"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8])
    ap.add_argument("--subset-seed", type=int, default=0, help="the subset's draw")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lr_schedule.json"))
    args = ap.parse_args()
    home = Home(args.home)
    run = home.latest_run()
    key = next(k for k in run["models"] if k.startswith("classifier-"))
    base = run_classifier_config(run, key)
    # report label -> classifier overrides ("" is the run's own settings)
    settings = {(s or "(run's own)"): parse_setting(s, base) for s in args.setting}
    set_threads()
    import torch

    train, val, test = (layer_store(run["features"], s) for s in ("train", "val", "test"))
    if not 0 < args.docs <= len(train):
        raise ValueError(f"--docs {args.docs}: the run's train split has {len(train)} documents")
    idx = stratified_subset(train.labels, args.docs / len(train), args.subset_seed)
    sub = subset_store(train, idx)
    classes = len(read_json(Path(run["dataset"]) / "labels.json"))
    n_layers, dim = train.layer_shape
    fits = []
    for label, overrides in settings.items():
        for strategy in args.strategy:
            for seed in args.seeds:
                config = replace(base, seed=seed, **overrides)
                model, _ = new_classifier(run["bilm"], strategy, config, n_layers, dim, classes)
                t0 = time.perf_counter()
                res = train_classifier(model, sub, val, config, device=torch.device("cpu"))
                pred = predict_proba(model, test).argmax(1)
                fit = {
                    "setting": label,
                    "strategy": strategy,
                    "seed": seed,
                    "test_accuracy": float((pred == test.labels).mean()),
                    "best_val_accuracy": res.best_val_accuracy,
                    "steps": res.steps,
                    "best_step": res.best_step,
                    "stop_reason": res.stop_reason,
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
                fits.append(fit)
                print(json.dumps(fit), flush=True)
    summary = []
    for label in settings:
        for strategy in args.strategy:
            accs = [
                f["test_accuracy"]
                for f in fits
                if f["setting"] == label and f["strategy"] == strategy
            ]
            summary.append(
                {
                    "setting": label,
                    "strategy": strategy,
                    "test_accuracy_mean": statistics.mean(accs),
                    "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "seeds": len(accs),
                }
            )
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "run": run["parent_run_id"],
        "train_docs": len(idx),
        "test_docs": len(test),
        "summary": summary,
        "fits": fits,
    }
    best = max(summary, key=lambda r: r["test_accuracy_mean"])
    write_report(args.out, report, f"best_setting={best['setting']}", hide="fits")


if __name__ == "__main__":
    main()
