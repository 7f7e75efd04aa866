"""How the biLM is pretrained, and how a reused one is adapted to a task's text."""

from __future__ import annotations

from dataclasses import dataclass

from elmo_core.device import check_precision


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 2  # passes over the pretraining token stream
    window: int = 20  # T: tokens per training window (ELMo used 20)
    batch_size: int = 128  # B: windows per step
    lr: float = 2e-3  # Adam learning rate
    clip_norm: float = 5.0  # gradient-norm clip
    val_tokens: int = 50_000  # tokens held out for the exact (full-softmax) perplexity
    max_steps: int = 0  # stop after this many steps (0 = no cap)
    # stop once a pass lowers the validation perplexity by less than this fraction of the
    # best so far, keeping the best pass's weights (0 = run every epoch)
    min_gain: float = 0.0
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
        if self.min_gain and self.world_size > 1:
            # only rank 0 measures the perplexity the stop depends on
            raise ValueError(f"min_gain needs world_size 1, got {self.world_size}")
        if not 0 <= self.min_gain < 1 or self.max_steps < 0:
            raise ValueError(
                f"0 <= min_gain < 1 and max_steps >= 0 required; got {self.min_gain}, "
                f"{self.max_steps}"
            )
        check_precision(self.precision)


@dataclass(frozen=True)
class AdaptConfig:
    """Domain adaptation of a reused biLM: more LM training on the task's train split before
    its layers are extracted (ELMo §5: fine-tuning the biLM on task text lowers its perplexity
    there and helps the task). Used with ``run --bilm`` only; the biLM's vocabulary is kept
    unless ``new_words_min_count`` adds the task's own frequent words to it."""

    # at most this many passes over the adaptation text (0 = reuse the biLM as it is)
    epochs: int = 0
    # stop once a pass lowers the val split's perplexity by less than this fraction of the
    # best so far, keeping the best pass (0 = every pass): the passes follow the text's size
    min_gain: float = 0.0
    max_steps: int = 0  # at most this many steps over all passes (0 = no cap)
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
        if not 0 <= self.min_gain < 1 or self.max_steps < 0:
            raise ValueError(
                f"adapt: 0 <= min_gain < 1 and max_steps >= 0 required; got {self.min_gain}, "
                f"{self.max_steps}"
            )
        check_precision(self.precision)

    def pretrain_config(self) -> PretrainConfig:
        return PretrainConfig(
            epochs=max(1, self.epochs),
            min_gain=self.min_gain,
            max_steps=self.max_steps,
            window=self.window,
            batch_size=self.batch_size,
            lr=self.lr,
            clip_norm=self.clip_norm,
            val_tokens=self.val_tokens,
            seed=self.seed,
            precision=self.precision,
            checkpoint_every=500,
        )
