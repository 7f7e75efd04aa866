"""The classifier's training loop (Adam, an exponential moving average of the weights, early
stopping on the average's validation accuracy, best average kept) and batch prediction, over
precomputed biLM layers (``DocumentBatches``).

Like the biLM loop it reports through ``log_metrics(metrics, step)``, checkpoints atomically and
resumes from its checkpoint file.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel

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
from elmo_core.device import autocast, pick_device
from elmo_core.optim import fused_adam


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
    best_epoch: int
    epochs_run: int
    seconds: float


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


@torch.no_grad()
def _ema_update(
    averaged: Sequence[torch.Tensor],
    current: Sequence[torch.Tensor],
    num_averaged: torch.Tensor | int,
) -> None:
    """``AveragedModel``'s multi_avg_fn: averaged <- lerp(averaged, current, 1 - decay)."""
    weight = 1.0 - ema_decay(int(num_averaged))
    for a, c in zip(averaged, current, strict=True):
        a.lerp_(c, weight)


def classifier_param_groups(
    model: nn.Module, lr: float, embedding_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Trainable parameters in Adam groups: the mix at ``lr * mix.lr_scale`` (its strategy's
    data), the task token embedding at ``lr * embedding_lr_scale``, everything else at ``lr``."""
    head = getattr(model, "head", model)  # a FineTunedClassifier's head, or the head itself
    mix = getattr(head, "mix", None)
    output_mix = getattr(head, "output_mix", None)
    special = [
        (mix, getattr(mix, "lr_scale", 1.0)),
        (output_mix, getattr(output_mix, "lr_scale", 1.0)),
        (getattr(head, "embedding", None), embedding_lr_scale),
    ]
    groups: list[dict[str, Any]] = []
    taken: set[int] = set()
    for module, scale in special:
        params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        if params:
            groups.append({"params": params, "lr": lr * scale})
            taken |= {id(p) for p in params}
    rest = [p for p in head.parameters() if p.requires_grad and id(p) not in taken]
    if head is not model:  # fine-tuning: one group per biLM layer, lr shrinking downwards
        tuned = cast(FineTunedClassifier, model)
        c = tuned.config
        for i, params in enumerate(tuned.bilm_groups()):
            groups.append({"params": params, "lr": lr * c.bilm_lr_scale / c.bilm_lr_decay**i})
    return [{"params": rest, "lr": lr}, *groups]


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
    """Adam with early stopping on validation accuracy; ``model`` ends holding the best weights
    (of the exponential moving average, ``EMA_DECAY``).

    With ``config.lr_decay < 1`` an epoch without a validation gain also sends the model back to
    its best weights and shrinks every group's learning rate (restored on resume with the
    optimizer's state)."""
    device = device or pick_device()
    torch.manual_seed(config.seed)
    model.to(device).train()
    groups = classifier_param_groups(model, config.lr, config.embedding_lr_scale)
    params = [p for g in groups for p in g["params"]]
    opt = fused_adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    epoch, batch_i, step, seconds = 0, 0, 0, 0.0
    best_acc, best_epoch, bad = -1.0, 0, 0
    # what is evaluated and kept: an exponential moving average of the trained weights
    ema = AveragedModel(model, multi_avg_fn=_ema_update)
    best_state = copy.deepcopy(model.state_dict())
    epoch_gen_state = gen.get_state()
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
        best_acc, best_epoch, bad = state["best_acc"], state["best_epoch"], state["bad"]
        best_state = state["best_model"]
        ema.load_state_dict(state["ema"])
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
                    "best_epoch": best_epoch,
                    "bad": bad,
                    "best_model": best_state,
                    "ema": ema.state_dict(),
                    "run_loss": run_loss,
                    "run_n": run_n,
                },
                checkpoint,
            )

    while epoch < config.epochs and bad < config.patience:
        gen.set_state(epoch_gen_state)  # the epoch's batch order is a function of this state
        batches = list(train.batches(config.batch_size, gen))
        next_epoch_gen_state = gen.get_state()
        t0 = time.perf_counter()
        t_epoch, tokens_epoch = t0, 0
        if isinstance(model, FineTunedClassifier):  # gradual unfreezing: a function of epoch
            model.unfreeze(epoch // config.unfreeze_every)
        model.train()
        while batch_i < len(batches):
            layers, mask, tokens, y = train.batch(batches[batch_i])
            with autocast(device, config.precision):
                logits = model(_to(layers, device), mask.to(device), tokens.to(device))
            loss = F.cross_entropy(logits.float(), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            ema.update_parameters(model)
            batch_i += 1
            step += 1
            run_loss += float(loss.detach())
            run_n += 1
            tokens_epoch += int(mask.sum())
            report_epoch_progress(
                progress, batch_i, len(batches), epoch, config.epochs, tokens_epoch, t_epoch
            )
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save()
        seconds += time.perf_counter() - t0
        probs = predict_proba(cast(ELMoClassifier, ema.module), val, device)
        acc = float((probs.argmax(1) == val.labels).mean())
        log_metrics(
            {
                "train_loss": run_loss / max(run_n, 1),
                "val_accuracy": acc,
                "lr": opt.param_groups[0]["lr"],  # the lr this epoch trained with
            },
            epoch + 1,
        )
        if acc > best_acc:
            best_acc, best_epoch, bad = acc, epoch + 1, 0
            best_state = copy.deepcopy(ema.module.state_dict())
        else:
            bad += 1
            if config.lr_decay < 1.0:  # overshot: go back to the best weights, smaller steps
                model.load_state_dict(best_state)
                ema.module.load_state_dict(best_state)
                for g in opt.param_groups:
                    g["lr"] *= config.lr_decay
        epoch, batch_i, run_loss, run_n = epoch + 1, 0, 0.0, 0
        epoch_gen_state = next_epoch_gen_state
        save()
    model.load_state_dict(best_state)
    model.eval()
    return ClassifierResult(best_acc, best_epoch, epoch, seconds)
