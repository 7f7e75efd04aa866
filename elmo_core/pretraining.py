"""The biLM's pretraining loop: sampled-softmax LM steps with lazy row-sparse Adam for the
tables, periodic validation perplexity, atomic checkpoints it resumes from."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from elmo_core.bilm import BiLM
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
from elmo_core.device import autocast, pick_device
from elmo_core.distributed import (
    SINGLE,
    DistContext,
    all_reduce_sparse_rows,
    barrier,
    check_batch,
    ddp_loss,
    gather_objects,
    shard_batch,
)
from elmo_core.optim import LazyAdam, fused_adam
from elmo_core.pretrain_config import PretrainConfig
from elmo_core.windows import TokenWindows, epoch_batches, make_windows


def bilm_optimizers(model: BiLM, lr: float) -> list[torch.optim.Optimizer]:
    """Row-sparse Adam for the embedding and softmax rows, fused Adam for the LSTMs."""
    return [LazyAdam(model.sparse_parameters(), lr=lr), fused_adam(dense_parameters(model), lr=lr)]


def bilm_step(
    model: BiLM,
    opts: Sequence[torch.optim.Optimizer],
    x: torch.Tensor,
    generator: torch.Generator,
    precision: str,
    dense: Sequence[torch.Tensor],
    clip_norm: float,
    loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One biLM training step on windows x (B, T): sampled-softmax loss under ``precision``,
    backward, gradient-norm clip of the ``dense`` parameters, every optimizer. Returns the loss.

    The pretraining loop and bench/bilm_throughput.py both run this, so the benchmark times
    exactly the pipeline's step. Data-parallel training passes ``loss_fn`` (the DDP-wrapped
    loss) and ``after_backward`` (the all-reduce of the row-sparse gradients)."""
    with autocast(x.device, precision):
        loss = (loss_fn or model.lm_loss)(x, generator)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:  # data-parallel: the row-sparse gradients' all-reduce
        after_backward()
    # clip_grad_norm_, but the gradients are rescaled only when the norm is over the limit
    # (clip_grad_norm_ multiplies every gradient by a coefficient clamped to 1 on every step)
    grads = [p.grad for p in dense if p.grad is not None]
    total = nn.utils.get_total_norm(grads, foreach=True)
    if float(total) > clip_norm:
        nn.utils.clip_grads_with_norm_(dense, clip_norm, total, foreach=True)
    for o in opts:
        o.step()
    return loss


def dense_parameters(model: BiLM) -> list[nn.Parameter]:
    """Trainable parameters with dense gradients (the LSTMs, the projection): the clipped ones."""
    sparse = {id(p) for p in model.sparse_parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in sparse]


@torch.no_grad()
def perplexity(
    model: BiLM, windows: torch.Tensor, device: torch.device, batch: int = 64
) -> tuple[float, float]:
    """Exact (full-softmax) perplexity of the forward and backward LMs over windows (W, T)."""
    was_training = model.training
    model.eval()
    f_sum = b_sum = 0.0
    n = 0
    for i in range(0, len(windows), batch):
        with autocast(device, "fp32"):  # exact: full softmax in float32
            f, b = model.exact_nll(windows[i : i + batch].to(device))
        f_sum += float(f.double().sum())
        b_sum += float(b.double().sum())
        n += f.numel()
    model.train(was_training)
    return math.exp(f_sum / max(n, 1)), math.exp(b_sum / max(n, 1))


@dataclass
class PretrainResult:
    steps: int
    tokens: int
    seconds: float
    val_perplexity_forward: float
    val_perplexity_backward: float
    # why training ended: "epochs" (every pass run), "max_steps" (the step cap) or "plateau"
    # (a pass lowered the validation perplexity by less than ``min_gain``)
    stop_reason: str = "epochs"
    passes: int = 0  # passes completed (the last, when the cap cut it short, not counted)
    best_pass: int = 0  # the pass whose weights the model holds (``min_gain`` > 0), else passes

    @property
    def val_perplexity(self) -> float:
        return math.sqrt(self.val_perplexity_forward * self.val_perplexity_backward)


def pretrain_bilm(
    model: BiLM,
    train_ids: np.ndarray | TokenWindows,
    val_ids: np.ndarray,
    config: PretrainConfig,
    log_metrics: LogFn = no_log,
    checkpoint: Path | None = None,
    device: torch.device | None = None,
    log_every: int = 50,
    progress: ProgressFn = no_progress,
    dist_ctx: DistContext = SINGLE,
) -> PretrainResult:
    """Train the biLM on a token stream (an id array, or ``TokenWindows`` over memory-mapped
    shards); resumes from ``checkpoint`` if it holds a run in progress.

    Epoch e visits the windows in the order of a generator seeded by (seed, e), and negatives come
    from a generator whose state is checkpointed, so a resumed run repeats an uninterrupted one.

    With ``config.min_gain`` > 0 training stops once a pass lowers the validation perplexity
    by less than that fraction of the best one so far, and the model keeps the best pass's
    weights (a pass that ``max_steps`` cuts short keeps the weights it reached): the number of
    passes fits the amount of text rather than a fixed count.

    Under ``dist_ctx`` (torchrun) every rank runs this with the same arguments: each takes its
    slice of every global batch, gradients are averaged (DDP + the sparse rows' all-gather),
    and only rank 0 logs and writes the checkpoint (which every rank then resumes from; it
    records the world size, and a different one is refused).
    """
    device = device or pick_device()
    ctx = dist_ctx
    check_batch(config.batch_size, ctx)
    torch.manual_seed(config.seed + ctx.rank)  # dropout masks differ per rank, as per window
    model.to(device).train()
    if not ctx.is_main:
        log_metrics, progress, checkpoint_out = no_log, no_progress, None
    else:
        checkpoint_out = checkpoint
    train_w = (
        train_ids
        if isinstance(train_ids, TokenWindows)
        else TokenWindows([np.asarray(train_ids)], config.window)
    )
    val_w = make_windows(val_ids, config.window)
    opts = bilm_optimizers(model, config.lr)
    neg_gen = torch.Generator(device=model.softmax.proposal.device).manual_seed(config.seed + 1)
    epoch, batch_i, step, tokens, seconds = 0, 0, 0, 0, 0.0
    stop_reason, best_ppl, best_pass = "epochs", math.inf, 0
    best_state: dict[str, torch.Tensor] | None = None
    state = try_resume(checkpoint, "bilm-train")
    if state is not None:
        saved_world = int(state.get("world_size", 1))
        if saved_world != ctx.world_size:
            raise ValueError(
                f"{checkpoint} was written by {saved_world} rank(s), this run has "
                f"{ctx.world_size}: resume with the same world size, or delete it to start over"
            )
        model.load_state_dict(state["model"])
        for o, s in zip(opts, state["optimizers"], strict=True):
            o.load_state_dict(s)
        neg_gen.set_state(state["neg_gen"])
        set_rng_state(state["rng_ranks"][ctx.rank] if "rng_ranks" in state else state["rng"])
        epoch, batch_i, step = state["epoch"], state["batch"], state["step"]
        tokens, seconds = state["tokens"], state["seconds"]
        stop_reason = state.get("stop_reason", "epochs")
        best_ppl, best_pass = state.get("best_ppl", math.inf), state.get("best_pass", 0)
        best_state = state.get("best_state")
        log_metrics({"resumed_from_step": step}, step)

    def save() -> None:
        if checkpoint is None:
            return
        rngs = gather_objects(rng_state(), ctx)  # a collective: every rank takes part
        if checkpoint_out is not None:
            atomic_save(
                {
                    "kind": "bilm-train",
                    "model": model.state_dict(),
                    "optimizers": [o.state_dict() for o in opts],
                    "neg_gen": neg_gen.get_state(),
                    "rng": rngs[0],
                    "rng_ranks": rngs,
                    "world_size": ctx.world_size,
                    "epoch": epoch,
                    "batch": batch_i,
                    "step": step,
                    "tokens": tokens,
                    "seconds": seconds,
                    "stop_reason": stop_reason,
                    "best_ppl": best_ppl,
                    "best_pass": best_pass,
                    **({"best_state": best_state} if best_state is not None else {}),
                },
                checkpoint_out,
            )
        barrier(ctx)  # no rank reads on before the checkpoint is complete

    dense = dense_parameters(model)
    loss_fn, after_backward = None, None
    if ctx.active:
        sparse = model.sparse_parameters()
        loss_fn = ddp_loss(model, sparse, ctx)
        after_backward = lambda: all_reduce_sparse_rows(sparse, ctx)  # noqa: E731
    ppl = (float("nan"), float("nan"))
    if stop_reason == "max_steps":  # a longer cap goes on from where the shorter one stopped
        stop_reason = "epochs"
    done = stop_reason == "plateau"  # a resumed run that had plateaued stays stopped
    while epoch < config.epochs and not done:
        n_batches = -(-len(train_w) // config.batch_size)
        batches = epoch_batches(len(train_w), config.batch_size, config.seed, epoch, batch_i)
        t0, run_loss, run_n = time.perf_counter(), 0.0, 0
        t_epoch, tokens_epoch = time.perf_counter(), 0
        while batch_i < n_batches:
            if config.max_steps and step >= config.max_steps:
                # position is kept as is: a longer run resumes from here
                done, stop_reason = True, "max_steps"
                break
            x = shard_batch(train_w.get(next(batches)), ctx).to(device)  # (B / ranks, T)
            loss = bilm_step(
                model,
                opts,
                x,
                neg_gen,
                config.precision,
                dense,
                config.clip_norm,
                loss_fn,
                after_backward,
            )
            batch_i += 1
            step += 1
            tokens += x.numel() * ctx.world_size
            run_loss += float(loss.detach())
            run_n += 1
            tokens_epoch += x.numel() * ctx.world_size
            report_epoch_progress(
                progress, batch_i, n_batches, epoch, config.epochs, tokens_epoch, t_epoch
            )
            if step % log_every == 0:
                dt = time.perf_counter() - t0
                seconds += dt
                log_metrics(
                    {
                        "train_loss": run_loss / run_n,
                        "tokens_per_s": run_n * x.numel() * ctx.world_size / dt,
                        "epoch": epoch,
                    },
                    step,
                )
                t0, run_loss, run_n = time.perf_counter(), 0.0, 0
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save()
        seconds += time.perf_counter() - t0
        if ctx.is_main:  # the others wait at the checkpoint's barrier
            ppl = perplexity(model, val_w, device)
        log_metrics(
            {
                "val_perplexity": math.sqrt(ppl[0] * ppl[1]),
                "val_perplexity_forward": ppl[0],
                "val_perplexity_backward": ppl[1],
            },
            epoch + 1,
        )
        if not done:
            epoch, batch_i = epoch + 1, 0
            if config.min_gain > 0:
                geo = math.sqrt(ppl[0] * ppl[1])
                stop_reason, best_ppl, best_pass, best_state = _plateau(
                    model, geo, epoch, best_ppl, best_pass, best_state, config.min_gain
                )
                done = stop_reason == "plateau"
        save()
    if best_state is not None and best_pass < epoch:  # the last pass made it worse
        model.load_state_dict(best_state)
        ppl = (float("nan"), float("nan"))
    if math.isnan(ppl[0]) and ctx.is_main:  # resumed from a finished run, or best restored
        ppl = perplexity(model, val_w, device)
    model.eval()
    return PretrainResult(
        step, tokens, seconds, ppl[0], ppl[1], stop_reason, epoch, best_pass or epoch
    )


def _plateau(
    model: BiLM,
    ppl: float,
    passes: int,
    best_ppl: float,
    best_pass: int,
    best_state: dict[str, torch.Tensor] | None,
    min_gain: float,
) -> tuple[str, float, int, dict[str, torch.Tensor] | None]:
    """After pass ``passes``: (stop reason, best perplexity, best pass, its weights). A pass
    that lowers the best perplexity becomes the best (its weights copied); training stops
    ("plateau") once a pass gains less than ``min_gain`` of the best."""
    gain = 1.0 - ppl / best_ppl if math.isfinite(best_ppl) else 1.0
    if ppl < best_ppl:
        best_ppl, best_pass = ppl, passes
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ("plateau" if gain < min_gain else "epochs"), best_ppl, best_pass, best_state
