"""One frozen dataclass per stage config. Tasks hash ``asdict(config)`` into cache keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# autocast choices of the training loops; ``auto`` = bf16 where the device runs it natively
PRECISIONS = ("auto", "fp32", "bf16")
TOKEN_ENCODERS = ("word", "char")  # BiLMConfig.token_encoder


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


@dataclass(frozen=True)
class VocabConfig:
    min_count: int = 2  # tokens seen fewer times in the pretraining text map to <unk>
    max_size: int = 50_000  # cap on the vocabulary, special tokens included

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.max_size < 5:  # the four special tokens plus at least one word
            raise ValueError(f"max_size must be >= 5, got {self.max_size}")


@dataclass(frozen=True)
class BiLMConfig:
    vocab_size: int  # V: rows of the token embedding and of the shared output softmax
    embedding_dim: int = 256  # E: token embedding width (projected to H when E != H)
    hidden_dim: int = 256  # H: LSTM state per direction; every returned layer is 2H wide
    num_layers: int = 2  # LSTM layers per direction (forward and backward stacks are separate)
    dropout: float = 0.1  # dropout on the embedding and between LSTM layers
    num_samples: int = 512  # shared negatives of the sampled softmax (0 = full softmax)
    # P: each LSTM's output projected to P (ELMo: 4096 cells, 512 projections); 0 = none.
    # With it every returned layer is 2P wide and the softmax works in P
    projection_dim: int = 0
    cell_clip: float = 0.0  # clip cell states to [-c, c] at every step (ELMo: 3; 0 = off)
    proj_clip: float = 0.0  # clip each step's (projected) output to [-c, c] (ELMo: 3; 0 = off)
    # word: a V x E embedding table (unseen words read as <unk>); char: ELMo's character CNN
    # (UTF-8 bytes -> filters of widths 1..K -> max-pool -> highway -> projection to E), so
    # every word, seen or not, gets its own vector. The output softmax stays word-level
    token_encoder: str = "word"
    char_dim: int = 16  # character embedding width (ELMo: 16)
    # filters per width, width k = index + 1. ELMo: (32, 32, 64, 128, 256, 512, 1024); this
    # default is ~4x cheaper for CPUs (the CNN runs once per distinct word of a batch)
    char_filters: tuple[int, ...] = (32, 32, 64, 128, 128, 128, 128)
    char_highway: int = 2  # highway layers over the pooled filters (ELMo: 2)
    max_chars: int = 50  # bytes per word read by the CNN, word boundaries included (ELMo: 50)

    def __post_init__(self) -> None:
        if self.token_encoder not in TOKEN_ENCODERS:
            raise ValueError(
                f"token_encoder must be one of {TOKEN_ENCODERS}, got {self.token_encoder!r}"
            )
        if self.char_dim < 1 or not self.char_filters or min(self.char_filters) < 1:
            raise ValueError(
                f"char_dim and every char_filters count must be >= 1, got {self.char_dim}, "
                f"{self.char_filters}"
            )
        if self.char_highway < 0 or self.max_chars < 3:
            raise ValueError(
                f"char_highway >= 0 and max_chars >= 3 required, got {self.char_highway}, "
                f"{self.max_chars}"
            )
        for name in ("vocab_size", "embedding_dim", "hidden_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.projection_dim < self.hidden_dim:
            raise ValueError(
                f"projection_dim must be 0 or in [1, hidden_dim={self.hidden_dim}), "
                f"got {self.projection_dim}"
            )
        if self.cell_clip < 0 or self.proj_clip < 0:
            raise ValueError(
                f"cell_clip and proj_clip must be >= 0, got {self.cell_clip}, {self.proj_clip}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 2  # passes over the pretraining token stream
    window: int = 20  # T: tokens per training window (ELMo used 20)
    batch_size: int = 128  # B: windows per step
    lr: float = 2e-3  # Adam learning rate
    clip_norm: float = 5.0  # gradient-norm clip
    val_tokens: int = 50_000  # tokens held out for the exact (full-softmax) perplexity
    max_steps: int = 0  # stop after this many steps (0 = no cap); for smoke runs
    checkpoint_every: int = 500  # steps between mid-epoch checkpoints
    seed: int = 13  # drives init, window order and negative sampling
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; auto = bf16 where native)
    # data-parallel ranks (torchrun); batch_size is the global batch, split evenly among them
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.batch_size % self.world_size:
            raise ValueError(
                f"world_size must be >= 1 and divide batch_size {self.batch_size}, "
                f"got {self.world_size}"
            )
        if self.epochs < 1 or self.window < 2 or self.batch_size < 1:
            raise ValueError(
                f"epochs >= 1, window >= 2, batch_size >= 1 required; got "
                f"{self.epochs}, {self.window}, {self.batch_size}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_precision(self.precision)


@dataclass(frozen=True)
class AdaptConfig:
    """Domain adaptation of a reused biLM: more LM training on the task's train split before
    its layers are extracted (ELMo §5: fine-tuning the biLM on task text lowers its perplexity
    there and helps the task). Used with ``run --bilm`` only; the biLM's vocabulary is kept
    unless ``new_words_min_count`` adds the task's own frequent words to it."""

    epochs: int = 0  # passes over the train split's text (0 = reuse the biLM as it is)
    window: int = 20  # T: tokens per window
    batch_size: int = 128  # B: windows per step
    lr: float = 1e-3  # Adam learning rate (fresh optimizer state)
    clip_norm: float = 5.0
    val_tokens: int = 20_000  # of the val split, for the before / after perplexity
    seed: int = 13
    precision: str = "auto"  # auto | fp32 | bf16
    # train-split words the biLM's vocabulary lacks, seen this often, get ids of their own
    # (embedding + softmax rows, started from <unk>'s) before adapting; 0 = vocabulary kept
    new_words_min_count: int = 0
    new_words_max: int = 30_000  # at most this many new words, most frequent first

    def __post_init__(self) -> None:
        if self.new_words_min_count < 0 or self.new_words_max < 0:
            raise ValueError(
                f"adapt: new_words_min_count >= 0 and new_words_max >= 0 required; got "
                f"{self.new_words_min_count}, {self.new_words_max}"
            )
        if self.epochs < 0 or self.window < 2 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(
                f"adapt: epochs >= 0, window >= 2, batch_size >= 1, lr > 0 required; got "
                f"{self.epochs}, {self.window}, {self.batch_size}, {self.lr}"
            )
        check_precision(self.precision)

    def pretrain_config(self) -> PretrainConfig:
        return PretrainConfig(
            epochs=max(1, self.epochs),
            window=self.window,
            batch_size=self.batch_size,
            lr=self.lr,
            clip_norm=self.clip_norm,
            val_tokens=self.val_tokens,
            seed=self.seed,
            precision=self.precision,
            checkpoint_every=500,
        )


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
    lr_decay: float = 1.0  # epoch without val gain: back to the best weights, lr *= this (1 = off)
    epochs: int = 8  # upper bound; early stopping usually ends sooner
    patience: int = 2  # epochs without val-accuracy gain before stopping
    # T cap: tokens per document read (the rest is cut, and the run counts what was cut);
    # generous, so whole news articles are read, not their first paragraph
    max_len: int = 1024
    # the biLM reads documents longer than this in overlapping pieces of at most this many
    # tokens (0 = whole); each kept token has `context` tokens of context on both sides
    window: int = 256
    context: int = 32
    seed: int = 7  # init, batch order, the `sum` strategy's random weights
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints
    # auto | fp32 | bf16 autocast. fp32 by default: bf16 saves only ~7 % of a CPU classifier
    # step here, and the classifier is what the test accuracy rests on
    precision: str = "fp32"
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
        if self.epochs < 1 or self.patience < 1 or self.max_len < 1:
            raise ValueError(f"epochs, patience, max_len must be >= 1: {self}")
        if self.context < 0 or (self.window and self.window <= 2 * self.context):
            raise ValueError(
                f"window must be 0 or > 2 * context, got window {self.window}, "
                f"context {self.context}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
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
        check_precision(self.precision)


@dataclass(frozen=True)
class MixConfig:
    strategy: str  # key of elmo_core.mix.STRATEGIES: sum | wsum | function | static (ablation)
    num_layers: int  # L: layers returned by the biLM (embedding + LSTM layers)
    dim: int  # D: width of each layer (2H)
    seed: int = 0  # draws the fixed random weights of `sum`


def config_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
