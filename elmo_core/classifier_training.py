"""The classifier's training loop (Adam, an exponential moving average of the weights, a budget
in optimizer steps with early stopping on the average's validation accuracy, best average kept)
and batch prediction, over precomputed biLM layers (``DocumentBatches``).

Like the biLM loop it reports through ``log_metrics(metrics, step)``, checkpoints atomically and
resumes from its checkpoint file.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch.nn import functional as F

from elmo_core.batches import DocumentBatches
from elmo_core.callbacks import (
    LogFn,
    ProgressFn,
    no_log,
    no_progress,
    report_epoch_progress,
    rng_state,
    set_rng_state,
    try_resume,
)
from elmo_core.checkpoint import atomic_save
from elmo_core.classifier import ELMoClassifier, FineTunedClassifier
from elmo_core.classifier_config import ClassifierConfig
from elmo_core.classifier_optim import (
    Optimizers,
    classifier_param_groups,
    clip_grad_norm,
    mark_sparse_parameters,
)
from elmo_core.device import autocast, pick_device
from elmo_core.ema import WeightAverage
from elmo_core.task_embedding import restore_full, restrict_to_rows


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x.to(device)


@torch.no_grad()
def predict_proba(
    model: ELMoClassifier | FineTunedClassifier,
    store: DocumentBatches,
    device: torch.device | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Class probabilities (N, C) in document order."""
    device = device or pick_device()
    model.to(device).eval()
    probs: list[tuple[np.ndarray, np.ndarray]] = []
    for idx in store.batches(batch_size):
        layers, mask, tokens, _ = store.batch(idx)
        with autocast(device, model.config.precision):
            logits = model(_to(layers, device), mask.to(device), tokens.to(device))
        probs.append((idx, torch.softmax(logits.float(), -1).cpu().numpy()))
    out = np.zeros((len(store), probs[0][1].shape[1]), dtype=np.float32)
    for idx, p in probs:
        out[idx] = p
    return out


@dataclass
class ClassifierResult:
    best_val_accuracy: float
    best_step: int  # the optimizer step whose weight average was kept
    steps: int  # optimizer steps run
    epochs_run: float  # passes over the train split (steps / steps per epoch)
    seconds: float
    stop_reason: str  # a key of STOP_REASONS


# why a classifier stopped training (recorded in its metrics and the run's summary)
STOP_REASONS = {
    "patience": "validation stopped improving",
    "max_steps": "reached classifier.max_steps",
    "max_minutes": "reached classifier.max_minutes",
}


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean over the classes present in ``y_true`` or ``y_pred`` of per-class F1
    (scikit-learn's ``f1_score(average="macro")``): a rare class weighs as much as a common
    one, which accuracy hides on imbalanced data."""
    tp = np.bincount(y_true[y_true == y_pred], minlength=num_classes).astype(np.float64)
    true_n = np.bincount(y_true, minlength=num_classes)
    pred_n = np.bincount(y_pred, minlength=num_classes)
    present = (true_n + pred_n) > 0
    f1 = 2 * tp / np.maximum(true_n + pred_n, 1)
    return float(f1[present].mean()) if present.any() else 0.0


# Validation, early stopping and the kept model use an exponential moving average of the weights
# (horizon ~1 / (1 - decay) = 100 steps, about half an epoch on the sample profile). Single runs
# of the raw weights differed by ~0.4 pt test accuracy from float-level perturbations alone.
EMA_DECAY = 0.99


def ema_decay(num_averaged: int, decay: float = EMA_DECAY) -> float:
    """The average's decay after ``num_averaged`` updates: ``(1 + n) / (10 + n)``, capped at
    ``decay``. Early updates move the average fast, so a short run's average follows its trained
    weights instead of staying near the random start (TensorFlow's ExponentialMovingAverage does
    the same with ``num_updates``)."""
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


# layers (L, B, T, D) or None, mask (B, T), token ids (B, T), labels (B,): ``store.batch``'s
Batch = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]


def reader_has_core(device: torch.device) -> bool:
    """Whether a background batch reader gets a core of its own: with an accelerator, or when the
    CPU has more cores than torch's compute threads. Where every core computes (a 2-core CPU),
    the reader's copies took cycles from the step's matmuls and the step ran slower with it."""
    return device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()


def prefetched(
    store: DocumentBatches, batches: list[np.ndarray], start: int, background: bool = True
) -> Generator[Batch, None, None]:
    """``store.batch`` of batches[start:]. With ``background`` the next one is read by a thread
    while the caller computes on the current one (the reads and float16 -> float32 copies
    release the GIL), so a step does not wait on them; without, each is read when asked for."""
    if not background:
        for i in range(start, len(batches)):
            yield store.batch(batches[i])
        return
    with ThreadPoolExecutor(1, thread_name_prefix="batch-reader") as pool:
        pending = pool.submit(store.batch, batches[start]) if start < len(batches) else None
        for i in range(start, len(batches)):
            assert pending is not None
            current = pending.result()
            pending = pool.submit(store.batch, batches[i + 1]) if i + 1 < len(batches) else None
            yield current


def train_step(
    model: ELMoClassifier | FineTunedClassifier,
    opt: Optimizers,
    ema: WeightAverage,
    params: Sequence[torch.Tensor],
    batch: Batch,
    device: torch.device,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch (layers, mask, tokens, labels) and the average's update;
    returns the loss and the batch's mask. The loop's step, and what bench/ times."""
    layers, mask, tokens, y = batch
    with autocast(device, precision):
        logits = model(_to(layers, device), mask.to(device), tokens.to(device))
    loss = F.cross_entropy(logits.float(), y.to(device))
    opt.zero_grad()
    loss.backward()
    clip_grad_norm(params, 5.0)
    ema.prepare(model)
    opt.step()
    ema.update(model)
    return loss.detach(), mask


def validation_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes: (N, C) probabilities, (N,) labels."""
    p = probs[np.arange(len(labels)), labels]  # (N,)
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def train_classifier(
    model: ELMoClassifier | FineTunedClassifier,
    train: DocumentBatches,
    val: DocumentBatches,
    config: ClassifierConfig,
    log_metrics: LogFn = no_log,
    checkpoint: Path | None = None,
    device: torch.device | None = None,
    progress: ProgressFn = no_progress,
) -> ClassifierResult:
    """Adam on a budget in optimizer steps: the weight average (``EMA_DECAY``) is validated
    every ``config.eval_every`` steps, and training stops after ``config.patience`` validations
    without a gain once ``config.min_steps`` are done, at ``config.max_steps`` or after
    ``config.max_minutes``; ``model`` ends holding the best average (highest accuracy, or
    lowest loss as ``config.select_on`` says; with ``config.patience_also_on`` a new best
    validation macro F1 also counts as a gain for the patience). The task token embedding
    trains as the rows the train split uses (``restrict_to_rows``: the same updates as the
    whole table's, cheaper) and ends as the whole table again.

    With ``config.lr_decay < 1`` a validation without a gain also sends the model back to its
    best weights and shrinks every group's learning rate (restored on resume with the
    optimizer's state). With ``config.warmup_steps`` the first steps' learning rates rise
    linearly to their set values."""
    device = device or pick_device()
    torch.manual_seed(config.seed)
    model.to(device).train()
    head = model.head if isinstance(model, FineTunedClassifier) else model
    if config.weight_decay == 0.0:  # decay moves every row: the whole table trains
        restrict_to_rows(head, train.tokens)
    mark_sparse_parameters(model)
    groups = classifier_param_groups(model, config.lr, config.embedding_lr_scale)
    params = [p for g in groups for p in g["params"]]
    opt = Optimizers(groups, config.lr, config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    epoch, batch_i, step, seconds = 0, 0, 0, 0.0
    best_acc, best_step, bad, stop = -1.0, 0, 0, ""
    best_score = -math.inf  # the selection score of the kept average (higher is better)
    best_f1 = -math.inf  # the best validation macro F1 so far (config.patience_also_on)
    # what is evaluated and kept: an exponential moving average of the trained weights
    ema = WeightAverage(model, ema_decay)
    best_state = copy.deepcopy(model.state_dict())
    epoch_gen_state = gen.get_state()
    steps_per_epoch = 1
    select_on_loss = config.select_on == "loss"
    background = reader_has_core(device)  # read the next batch while this one computes
    state = try_resume(checkpoint, "classifier-train")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        epoch_gen_state = state["epoch_gen"]
        epoch, batch_i, step, seconds = (
            state["epoch"],
            state["batch"],
            state["step"],
            state["seconds"],
        )
        best_acc, best_step, bad, stop = (
            state["best_acc"],
            state["best_step"],
            state["bad"],
            state["stop"],
        )
        best_state = state["best_model"]
        best_score = state["best_score"]
        best_f1 = state["best_f1"]
        ema.load_averaged_state(state["ema"])
        run_loss, run_n = state["run_loss"], state["run_n"]
    else:
        run_loss, run_n = 0.0, 0

    def save() -> None:
        if checkpoint is not None:
            atomic_save(
                {
                    "kind": "classifier-train",
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": rng_state(),
                    "epoch_gen": epoch_gen_state,
                    "epoch": epoch,
                    "batch": batch_i,
                    "step": step,
                    "seconds": seconds,
                    "best_acc": best_acc,
                    "best_score": best_score,
                    "best_f1": best_f1,
                    "best_step": best_step,
                    "bad": bad,
                    "stop": stop,
                    "best_model": best_state,
                    "ema": ema.averaged_state(),
                    "run_loss": run_loss,
                    "run_n": run_n,
                },
                checkpoint,
            )

    def validate() -> str:
        """Validate the average at ``step``, keep it if best; returns why to stop, or ""."""
        nonlocal best_acc, best_score, best_f1, best_step, bad, best_state
        ema.sync(model)
        probs = predict_proba(cast(ELMoClassifier, ema.module), val, device)
        model.train()
        pred = probs.argmax(1)
        acc = float((pred == val.labels).mean())
        loss = validation_loss(probs, val.labels)
        score = -loss if select_on_loss else acc
        f1 = macro_f1(val.labels, pred, probs.shape[1])
        f1_gain = f1 > best_f1
        best_f1 = max(best_f1, f1)
        log_metrics(
            {
                "train_loss": run_loss / max(run_n, 1),  # since the last validation
                "val_loss": loss,
                "val_accuracy": acc,
                "val_macro_f1": f1,
                "lr": opt.param_groups[0]["lr"],  # the lr these steps trained with
            },
            step,
        )
        if score > best_score:
            best_acc, best_score, best_step, bad = acc, score, step, 0
            best_state = copy.deepcopy(ema.module.state_dict())
        elif config.patience_also_on == "macro_f1" and f1_gain:
            bad = 0  # still learning the rare classes: not a validation without a gain
        else:
            bad += 1
            if config.lr_decay < 1.0:  # overshot: go back to the best weights, smaller steps
                model.load_state_dict(best_state)
                ema.reset(model)
                opt.scale_lr(config.lr_decay)
        return why_stop()

    def why_stop() -> str:
        if step >= config.max_steps:
            return "max_steps"
        if config.max_minutes and seconds >= 60.0 * config.max_minutes:
            return "max_minutes"
        if bad >= config.patience and step >= config.min_steps:
            return "patience"
        return ""

    if stop:  # resumed after the last validation: stop, unless a larger budget goes on
        stop = why_stop()

    while not stop:
        gen.set_state(epoch_gen_state)  # the epoch's batch order is a function of this state
        batches = list(train.batches(config.batch_size, gen))
        steps_per_epoch = len(batches)
        next_epoch_gen_state = gen.get_state()
        t0 = time.perf_counter()
        t_epoch, tokens_epoch = t0, 0
        if isinstance(model, FineTunedClassifier):  # gradual unfreezing: a function of epoch
            model.unfreeze(epoch // config.unfreeze_every)
        model.train()
        epochs_cap = -(-config.max_steps // steps_per_epoch)
        with closing(prefetched(train, batches, batch_i, background)) as reader:
            for batch in reader:
                if step < config.warmup_steps:
                    opt.warm_up(step, config.warmup_steps)
                loss, mask = train_step(model, opt, ema, params, batch, device, config.precision)
                batch_i += 1
                step += 1
                run_loss += float(loss.detach())
                run_n += 1
                tokens_epoch += int(mask.sum())
                report_epoch_progress(
                    progress, batch_i, len(batches), epoch, epochs_cap, tokens_epoch, t_epoch
                )
                now = time.perf_counter()
                timed_out = bool(config.max_minutes) and (
                    seconds + now - t0 >= 60.0 * config.max_minutes
                )
                if step % config.eval_every == 0 or step >= config.max_steps or timed_out:
                    seconds += now - t0
                    stop = validate()
                    run_loss, run_n = 0.0, 0
                    if batch_i == len(batches):
                        epoch, batch_i = epoch + 1, 0
                        epoch_gen_state = next_epoch_gen_state
                    save()
                    t0 = time.perf_counter()
                    if stop:
                        break
                elif config.checkpoint_every and step % config.checkpoint_every == 0:
                    seconds += now - t0
                    save()
                    t0 = time.perf_counter()
        if not stop:
            seconds += time.perf_counter() - t0
            if batch_i == len(batches):
                epoch, batch_i = epoch + 1, 0
                epoch_gen_state = next_epoch_gen_state
    model.load_state_dict(best_state)
    restore_full(head)
    model.eval()
    return ClassifierResult(
        best_acc, best_step, step, step / max(steps_per_epoch, 1), seconds, stop
    )
