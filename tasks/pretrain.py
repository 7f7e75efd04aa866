"""Stage: pretrain the biLM on the train split plus extra corpora."""

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
from elmo_core.training import pick_device, pretrain_bilm
from storage.datasets import read_dataset
from storage.hashing import code_version
from storage.paths import Home, clear_incomplete, is_complete, mark_complete, stage_lock, write_json
from storage.tracking import stage_run
from tasks.common import STAGE_OPTS, History, Stage, cache_key, logger, set_threads
from tasks.data import load_vocab, pretraining_documents, stage_id
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


def encode_stream(docs: list[list[str]], vocab, seed: int) -> np.ndarray:
    """Documents -> one id stream ``<s> doc </s> <s> doc </s> ...`` in a seeded shuffled order."""
    order = np.random.default_rng(seed).permutation(len(docs))
    parts = []
    for i in order:
        parts.append(
            np.asarray([vocab.bos_id, *vocab.encode(docs[i]), vocab.eos_id], dtype=np.int32)
        )
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _pretrain_key(
    dataset: str,
    corpora: list[str],
    vocab: str,
    home: str,
    bilm: dict,
    train: PretrainConfig,
    device: str = "auto",
    tracking: dict[str, str] | None = None,
) -> str:
    inputs = {
        "dataset": stage_id(dataset),
        "corpora": ",".join(map(stage_id, corpora)),
        "vocab": stage_id(vocab),
    }
    return PRETRAIN.key(inputs, {"bilm": bilm, "train": asdict(train)})


@task(name="pretrain-bilm", cache_key_fn=cache_key(_pretrain_key), **STAGE_OPTS)
def pretrain(
    dataset: str,
    corpora: list[str],
    vocab: str,
    home: str,
    bilm: dict,
    train: PretrainConfig,
    device: str = "auto",
    tracking: dict[str, str] | None = None,
) -> str:
    """Pretrain the biLM on train split + corpora; resumable from the stage's train_state.pt.

    ``bilm`` holds BiLMConfig fields except vocab_size (set from the vocabulary); ``tracking``
    (outside the cache key) opens the stage's MLflow child run when it starts."""
    out = Home(home).stage_dir("bilm", _pretrain_key(dataset, corpora, vocab, home, bilm, train))
    with stage_lock(out):
        if is_complete(out):
            return str(out)
        clear_incomplete(out)
        set_threads()
        v = load_vocab(vocab)
        config = BiLMConfig(vocab_size=len(v), **bilm)
        train_ids = encode_stream(pretraining_documents(dataset, corpora), v, train.seed)
        val_docs = read_dataset(Path(dataset) / "val.parquet")["tokens"].to_list()
        val_ids = encode_stream(val_docs, v, train.seed)[: max(train.val_tokens, train.window)]
        torch.manual_seed(train.seed)
        model = BiLM(config)
        model.softmax.set_proposal(torch.from_numpy(v.unigram()))
        log = logger()
        log.info(
            "biLM: %d params, %d train tokens, %d val tokens",
            sum(p.numel() for p in model.parameters()),
            len(train_ids),
            len(val_ids),
        )
        tags = {"code_version": code_version(PRETRAIN.modules)}
        with stage_run(tracking, "bilm-pretrain", tags) as run, stage_progress("biLM") as progress:
            hist = History("biLM", sink=run.log_metrics)
            t0 = time.perf_counter()
            res = pretrain_bilm(
                model,
                train_ids,
                val_ids,
                train,
                hist,
                out / "train_state.pt",
                pick_device(device),
                progress=progress,
            )
            save_bilm(out / "bilm.pt", model.cpu(), v)
            write_json(out / "config.json", {"bilm": asdict(config), "train": asdict(train)})
            hist.save(out / "history.json")
            plot_curves(hist.points, ["train_loss", "val_perplexity"], out, "biLM pretraining")
            write_json(
                out / "metrics.json",
                {
                    "val_perplexity": res.val_perplexity,
                    "val_perplexity_forward": res.val_perplexity_forward,
                    "val_perplexity_backward": res.val_perplexity_backward,
                    "train_tokens": res.tokens,
                    "train_steps": res.steps,
                    "tokens_per_s": res.tokens / max(res.seconds, 1e-9),
                    "wall_s": time.perf_counter() - t0,
                },
            )
            (out / "train_state.pt").unlink(missing_ok=True)
            mark_complete(out)
            run.complete(out, {"train": Path(dataset) / "train.parquet"})
        return str(out)
