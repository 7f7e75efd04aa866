"""Build the seeded biLM from a vocabulary and pretrain it on an ids stage's shards: what the
pretrain stage runs in its own process, and what every torchrun rank runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from elmo_core.bilm import BiLM
from elmo_core.bilm_config import BiLMConfig
from elmo_core.callbacks import LogFn, ProgressFn, no_progress
from elmo_core.distributed import SINGLE, DistContext
from elmo_core.pretrain_config import PretrainConfig
from elmo_core.pretraining import PretrainResult, pretrain_bilm
from elmo_core.vocab import Vocab
from elmo_core.windows import TokenWindows
from tasks.common import logger
from tasks.ids import id_shards
from tasks.vocab import load_vocab

if TYPE_CHECKING:
    pass


def load_windows(ids: str, window: int, val_tokens: int) -> tuple[TokenWindows, np.ndarray]:
    """The ids stage's shards as memory-mapped training windows, and the validation ids."""
    shards = [np.load(p, mmap_mode="r") for p in id_shards(ids)]
    val = np.load(Path(ids) / "val.npy", mmap_mode="r")[: max(val_tokens, window)]
    return TokenWindows(shards, window), np.ascontiguousarray(val)


@dataclass
class TrainResult(PretrainResult):
    val_tokens: int = 0


def train_bilm(
    ids: str,
    vocab: str,
    out: Path,
    bilm: dict,
    train: PretrainConfig,
    device: torch.device,
    log_metrics: LogFn,
    progress: ProgressFn = no_progress,
    ctx: DistContext = SINGLE,
) -> tuple[BiLM, Vocab, TrainResult]:
    """Build the biLM (seeded) and pretrain it on the ids stage's shards, resuming from
    ``out/train_state.pt``: what the stage does in its own process, and what every torchrun
    rank does (``tasks.ddp_worker``)."""
    v = load_vocab(vocab)
    config = BiLMConfig(vocab_size=len(v), **bilm)
    train_w, val_ids = load_windows(ids, train.window, train.val_tokens)
    torch.manual_seed(train.seed)
    model = BiLM(config)
    model.softmax.set_proposal(torch.from_numpy(v.unigram()))
    model.set_words(v.tokens)  # the char encoder spells the vocabulary's words
    if ctx.is_main:
        logger().info(
            "biLM: %d params, %d train windows (%d tokens) in %d shards, %d val tokens, %d rank(s)",
            sum(p.numel() for p in model.parameters()),
            len(train_w),
            len(train_w) * train.window,
            len(train_w.shards),
            len(val_ids),
            ctx.world_size,
        )
    res = pretrain_bilm(
        model,
        train_w,
        val_ids,
        train,
        log_metrics,
        out / "train_state.pt",
        device,
        progress=progress,
        dist_ctx=ctx,
    )
    return model, v, TrainResult(**asdict(res), val_tokens=len(val_ids))
