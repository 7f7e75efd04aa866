"""Stage: pretrain the biLM on token-id shards (the train split + corpora, or corpora alone)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from prefect import task

from elmo_core.bilm import BiLM
from elmo_core.checkpoint import save_bilm
from elmo_core.config import BiLMConfig, PretrainConfig
from elmo_core.training import TokenWindows, pick_device, pretrain_bilm
from storage.hashing import code_version
from storage.paths import Home, build_stage, mark_complete, read_json, write_json
from storage.tracking import stage_run
from tasks.common import STAGE_OPTS, History, Stage, cache_key, logger, set_threads
from tasks.corpus import id_shards, load_vocab
from tasks.data import stage_id
from tasks.evaluate import plot_curves
from tasks.progress import stage_progress

BILM_CODE = [
    "elmo_core.bilm",
    "elmo_core.config",
    "elmo_core.training",
    "elmo_core.optim",
    "elmo_core.checkpoint",
]
PRETRAIN = Stage("bilm", [*BILM_CODE, "elmo_core.vocab", "tasks.pretrain"])


def _pretrain_key(
    ids: str,
    vocab: str,
    home: str,
    bilm: dict,
    train: PretrainConfig,
    device: str = "auto",
    tracking: dict[str, str] | None = None,
    inputs: dict[str, str] | None = None,
) -> str:
    return PRETRAIN.key(
        {"ids": stage_id(ids), "vocab": stage_id(vocab)}, {"bilm": bilm, "train": asdict(train)}
    )


def load_windows(ids: str, window: int, val_tokens: int) -> tuple[TokenWindows, np.ndarray]:
    """The ids stage's shards as memory-mapped training windows, and the validation ids."""
    shards = [np.load(p, mmap_mode="r") for p in id_shards(ids)]
    val = np.load(Path(ids) / "val.npy", mmap_mode="r")[: max(val_tokens, window)]
    return TokenWindows(shards, window), np.ascontiguousarray(val)


@task(name="pretrain-bilm", cache_key_fn=cache_key(_pretrain_key), **STAGE_OPTS)
def pretrain(
    ids: str,
    vocab: str,
    home: str,
    bilm: dict,
    train: PretrainConfig,
    device: str = "auto",
    tracking: dict[str, str] | None = None,
    inputs: dict[str, str] | None = None,
) -> str:
    """Pretrain the biLM on the ids stage's shards; resumable from the stage's train_state.pt.

    ``bilm`` holds BiLMConfig fields except vocab_size (set from the vocabulary); ``tracking``
    and ``inputs`` (Parquet files shown as the run's dataset inputs) are outside the cache key:
    ``tracking`` opens the stage's MLflow child run when it starts."""
    out = Home(home).stage_dir("bilm", _pretrain_key(ids, vocab, home, bilm, train))
    return build_stage(out, lambda d: _build(ids, vocab, d, bilm, train, device, tracking, inputs))


def _build(
    ids: str,
    vocab: str,
    out: Path,
    bilm: dict,
    train: PretrainConfig,
    device: str,
    tracking: dict[str, str] | None,
    inputs: dict[str, str] | None,
) -> None:
    set_threads()
    v = load_vocab(vocab)
    config = BiLMConfig(vocab_size=len(v), **bilm)
    train_w, val_ids = load_windows(ids, train.window, train.val_tokens)
    torch.manual_seed(train.seed)
    model = BiLM(config)
    model.softmax.set_proposal(torch.from_numpy(v.unigram()))
    log = logger()
    log.info(
        "biLM: %d params, %d train windows (%d tokens) in %d shards, %d val tokens",
        sum(p.numel() for p in model.parameters()),
        len(train_w),
        len(train_w) * train.window,
        len(train_w.shards),
        len(val_ids),
    )
    ids_stats = read_json(Path(ids) / "metrics.json")
    tags = {"code_version": code_version(PRETRAIN.modules), "ids_stage": stage_id(ids)}
    with stage_run(tracking, "bilm-pretrain", tags) as run, stage_progress("biLM") as progress:
        hist = History("biLM", sink=run.log_metrics)
        t0 = time.perf_counter()
        res = pretrain_bilm(
            model,
            train_w,
            val_ids,
            train,
            hist,
            out / "train_state.pt",
            pick_device(device),
            progress=progress,
        )
        save_bilm(out / "bilm.pt", model.cpu(), v)
        write_json(
            out / "config.json",
            {"bilm": asdict(config), "train": asdict(train), "ids": stage_id(ids)},
        )
        hist.save(out / "history.json")
        plot_curves(hist.points, ["train_loss", "val_perplexity"], out, "biLM pretraining")
        write_json(
            out / "metrics.json",
            {
                "val_perplexity": res.val_perplexity,
                "val_perplexity_forward": res.val_perplexity_forward,
                "val_perplexity_backward": res.val_perplexity_backward,
                "corpus_tokens": ids_stats["train_tokens"],
                "val_tokens": len(val_ids),
                "train_tokens": res.tokens,
                "train_steps": res.steps,
                "tokens_per_s": res.tokens / max(res.seconds, 1e-9),
                "wall_s": time.perf_counter() - t0,
            },
        )
        (out / "train_state.pt").unlink(missing_ok=True)
        mark_complete(out)
        run.complete(out, {k: Path(p) for k, p in (inputs or {}).items()})
