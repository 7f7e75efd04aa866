"""The classifier stage's config, and the layer mix it builds per strategy."""

from __future__ import annotations

from dataclasses import dataclass

from elmo_core.device import check_precision


@dataclass(frozen=True)
class ClassifierConfig:
    hidden_dim: int = 128  # BiLSTM state per direction
    num_layers: int = 1  # BiLSTM layers
    mlp_hidden: tuple[int, ...] = (128, 64)  # MLP hidden sizes
    token_embedding_dim: int = 0  # E of a task token embedding concatenated to the mix (0 = none)
    dropout: float = 0.5  # after the mix and inside the MLP
    batch_size: int = 64  # documents per step
    lr: float = 2e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    embedding_lr_scale: float = 1.0  # the task token embedding's lr relative to lr
    # the task token embedding's gradient row-sparse: Adam (LazyAdam), clipping and the weight
    # average touch the batch's rows only — a cheaper step, but a row a batch skips no longer
    # moves with its momentum, and on ag_news_sample the fits needed more epochs (slower to a
    # result). False: dense Adam over the whole table. Weight decay implies dense
    sparse_embedding: bool = False
    # the training budget, in optimizer steps (not epochs: an epoch is 7 steps of a 500-document
    # dataset and 1,700 of AG News). Validation every eval_every steps (several times an epoch
    # on large data, once in several epochs on small data) and at the last step; training stops
    # after `patience` validations without a gain once min_steps are done, or at max_steps, or
    # after max_minutes of training (0 = no time cap; a time cap makes runs machine-dependent)
    eval_every: int = 200
    patience: int = 3  # validations without a gain before stopping
    # what a validation compares to keep the best average: "accuracy" or "loss" (mean NLL: a
    # finer-grained score where a small split moves accuracy in coarse steps)
    select_on: str = "accuracy"
    # what else resets the patience: "" (only a gain in the select_on score) or "macro_f1" (a
    # new best validation macro F1 too: on imbalanced data accuracy, which the frequent classes
    # dominate, levels off while the rare classes are still being learned). The kept average is
    # still the select_on best
    patience_also_on: str = ""
    min_steps: int = 600  # floor: no early stop before this many steps
    max_steps: int = 6000  # cap
    max_minutes: float = 0.0  # wall-clock cap on training (0 = none)
    # validation without a gain: back to the best weights, lr *= this (1 = off)
    lr_decay: float = 1.0
    # the first warmup_steps steps' learning rates rise linearly to lr (0 = off)
    warmup_steps: int = 0
    seed: int = 7  # init, batch order, the `sum` strategy's random weights
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints
    # auto | fp32 | bf16 autocast; auto = bf16 where the device runs it faster than fp32
    # (device.bf16_native), else fp32. Weights, Adam and the weight average stay float32
    precision: str = "auto"
    # ULMFiT-style fine-tuning: the biLM runs inside the classifier on each batch (whole
    # documents up to max_len, no stored layers) and trains with it; off = frozen stored layers
    finetune_bilm: bool = False
    bilm_lr_scale: float = 0.1  # lr of the biLM's top layer relative to lr
    bilm_lr_decay: float = 2.6  # discriminative lrs: each lower biLM layer's lr / this (ULMFiT)
    # gradual unfreezing: the head trains alone for this many epochs, then one more biLM layer
    # (top first, the token encoder last) after each further such span
    unfreeze_every: int = 1
    # ELMo at the task BiLSTM's output too ([h_k; ELMo_k], Peters et al. 2018 §3.3): a second
    # mix of the same strategy (own weights, same start), pooled beside the BiLSTM states
    elmo_output: bool = False

    def __post_init__(self) -> None:
        if self.hidden_dim < 1 or self.num_layers < 1 or self.batch_size < 1:
            raise ValueError(f"bad classifier sizes: {self}")
        if self.token_embedding_dim < 0:
            raise ValueError(f"token_embedding_dim must be >= 0, got {self.token_embedding_dim}")
        if any(h < 1 for h in self.mlp_hidden):
            raise ValueError(f"mlp_hidden sizes must be >= 1, got {self.mlp_hidden}")
        if self.eval_every < 1 or self.patience < 1 or self.max_steps < 1:
            raise ValueError(
                f"classifier eval_every, patience and max_steps must be >= 1, got "
                f"{self.eval_every}, {self.patience}, {self.max_steps}"
            )
        if not 0 <= self.min_steps <= self.max_steps or self.max_minutes < 0.0:
            raise ValueError(
                f"classifier min_steps must be in [0, max_steps = {self.max_steps}] and "
                f"max_minutes >= 0, got {self.min_steps}, {self.max_minutes}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.warmup_steps < 0:
            raise ValueError(f"classifier warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.lr <= 0.0 or self.weight_decay < 0.0:
            raise ValueError(
                f"classifier lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )
        if self.bilm_lr_scale <= 0.0 or self.bilm_lr_decay < 1.0 or self.unfreeze_every < 1:
            raise ValueError(
                f"bilm_lr_scale > 0, bilm_lr_decay >= 1 and unfreeze_every >= 1 required, got "
                f"{self.bilm_lr_scale}, {self.bilm_lr_decay}, {self.unfreeze_every}"
            )
        if self.embedding_lr_scale <= 0.0:
            raise ValueError(f"embedding_lr_scale must be > 0, got {self.embedding_lr_scale}")
        if self.select_on not in ("accuracy", "loss"):
            raise ValueError(
                f"classifier select_on must be accuracy or loss, got {self.select_on!r}"
            )
        if self.patience_also_on not in ("", "macro_f1"):
            raise ValueError(
                f"classifier patience_also_on must be '' or macro_f1, got {self.patience_also_on!r}"
            )
        check_precision(self.precision)


@dataclass(frozen=True)
class MixConfig:
    strategy: str  # key of elmo_core.mix.STRATEGIES: sum | wsum | function | static (ablation)
    num_layers: int  # L: layers returned by the biLM (embedding + LSTM layers)
    dim: int  # D: width of each layer (2H)
    seed: int = 0  # draws the fixed random weights of `sum`
