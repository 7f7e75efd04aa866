"""Stage: train + evaluate one classifier per mix strategy on the stored layers."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import polars as pl
import torch

from elmo_core.bilm_checkpoint import load_bilm, save_bilm
from elmo_core.classifier import ELMoClassifier, FineTunedClassifier, check_token_embedding
from elmo_core.classifier_checkpoint import load_classifier, save_classifier
from elmo_core.classifier_config import ClassifierConfig, MixConfig
from elmo_core.classifier_training import predict_proba, train_classifier
from elmo_core.device import pick_device
from elmo_core.mix import ScalarMix, build_mix
from storage.charts import plot_curves
from storage.datasets import read_dataset, write_parquet
from storage.paths import (
    SPLITS,
    mark_complete,
    read_json,
    split_files,
    write_json,
)
from storage.tracking import stage_run
from tasks.common import (
    History,
    logger,
    runtime_tags,
    set_threads,
)
from tasks.evaluate import evaluate
from tasks.features import layer_store, layers_config
from tasks.progress import stage_progress
from tasks.stage import StageContext, stage

CLASSIFIER = stage(
    "classifier",
    __name__,
    inputs=["features_dir", "bilm_dir", "dataset"],
    config=["strategy", "config"],
)


def new_classifier(
    bilm_dir: str,
    strategy: str,
    config: ClassifierConfig,
    num_layers: int,
    dim: int,
    num_classes: int,
) -> tuple[ELMoClassifier, MixConfig]:
    """A fresh, seeded classifier over a biLM's layers (L = num_layers, D = dim), its task token
    embedding initialised from that biLM's; the stage and bench/learning_curve.py share it."""
    mix_config = MixConfig(strategy=strategy, num_layers=num_layers, dim=dim, seed=config.seed)
    torch.manual_seed(config.seed)
    bilm, vocab = load_bilm(Path(bilm_dir) / "bilm.pt")
    if not bilm.config.lm_head and config.token_embedding_dim > bilm.config.embedding_dim:
        # a published biLM narrower than the profile's own: the task embedding takes its width
        config = replace(config, token_embedding_dim=bilm.config.embedding_dim)
    check_token_embedding(config, bilm.config.embedding_dim)
    model = ELMoClassifier(
        config,
        build_mix(mix_config),
        dim,
        num_classes,
        vocab_size=len(vocab),
        init_embedding=bilm.input_vectors(),
    )
    return model, mix_config


@CLASSIFIER.task(name="train-classifier")
def classify(
    features_dir: str,
    bilm_dir: str,
    dataset: str,
    strategy: str,
    config: ClassifierConfig,
    ctx: StageContext,
) -> str:
    """Train the BiLSTM+MLP head with one mix strategy on frozen layers, evaluate on test.

    ``ctx.tracking`` (the flow's ``Tracker.target()``) opens the stage's MLflow child run
    when it starts, so its epochs show while it trains."""
    return CLASSIFIER.build(
        locals(),
        lambda d: _build(
            features_dir, bilm_dir, dataset, strategy, d, config, ctx.device, ctx.tracking
        ),
    )


def _build(
    features_dir: str,
    bilm_dir: str,
    dataset: str,
    strategy: str,
    out: Path,
    config: ClassifierConfig,
    device: str,
    tracking: dict[str, str] | None,
) -> None:
    threads = set_threads()
    dev = pick_device(device)
    train, val, test = (layer_store(features_dir, s) for s in SPLITS)
    label_names = read_json(Path(dataset) / "labels.json")
    n_layers, dim = train.layer_shape
    head, mix_config = new_classifier(bilm_dir, strategy, config, n_layers, dim, len(label_names))
    tuned: FineTunedClassifier | None = None
    if config.finetune_bilm:  # the biLM trains inside: token ids in, no stored layers read
        bilm, vocab = load_bilm(Path(bilm_dir) / "bilm.pt")
        tuned = FineTunedClassifier(bilm, head)
        for store in (train, val, test):
            store.features = None
    name = f"classifier-{strategy}"
    tags = {
        "strategy": strategy,
        "code_version": CLASSIFIER.code_version(),
        **runtime_tags(threads),
    }
    with stage_run(tracking, name, tags) as run, stage_progress(name) as progress:
        hist = History(name, sink=run.log_metrics)
        t0 = time.perf_counter()
        trained = tuned if tuned is not None else head
        res = train_classifier(
            trained, train, val, config, hist, out / "train_state.pt", dev, progress=progress
        )
        save_classifier(
            out / "model.pt", head.cpu(), mix_config, dim, label_names, layers_config(features_dir)
        )
        if tuned is not None:  # the tuned biLM is the one predict / embed must read
            save_bilm(out / "bilm.pt", tuned.bilm, vocab)
        probs = predict_proba(trained, test, dev)
        pred = probs.argmax(1)
        metrics: dict[str, float | str] = {
            **evaluate(test.labels, pred, label_names, out, f"ELMo {strategy}")
        }
        metrics.update(
            {
                "best_val_accuracy": res.best_val_accuracy,
                "best_step": res.best_step,
                "steps": res.steps,
                "epochs_run": res.epochs_run,
                "train_s": res.seconds,
                "stop_reason": res.stop_reason,
                "selected_on": config.select_on,  # what chose the kept average
                "wall_s": time.perf_counter() - t0,
            }
        )
        if isinstance(head.mix, ScalarMix):
            weights = head.mix.layer_weights().tolist()
            write_json(
                out / "layer_weights.json",
                {"weights": weights, "gamma": float(head.mix.gamma.detach())},
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
        run.complete(out, split_files(dataset))
    logger().info("classifier %s: test accuracy %.4f", strategy, metrics["test_accuracy"])


def load_pipeline_model(classifier_dir: str) -> tuple[ELMoClassifier, list[str]]:
    return load_classifier(Path(classifier_dir) / "model.pt")
