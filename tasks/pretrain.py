"""Stage: pretrain the biLM on token-id shards (the train split + corpora, or corpora alone)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from prefect import task

from elmo_core.bilm import BiLM
from elmo_core.checkpoint import load_bilm, save_bilm
from elmo_core.config import AdaptConfig, BiLMConfig, PretrainConfig
from elmo_core.distributed import SINGLE, DistContext
from elmo_core.training import (
    LogFn,
    PretrainResult,
    ProgressFn,
    TokenWindows,
    make_windows,
    no_progress,
    perplexity,
    pick_device,
    pretrain_bilm,
)
from elmo_core.vocab import Vocab
from storage.hashing import ROOT, code_version
from storage.paths import Home, build_stage, mark_complete, read_json, write_json
from storage.tracking import stage_run
from tasks.common import STAGE_OPTS, History, Stage, cache_key, logger, set_threads
from tasks.corpus import id_shards, load_vocab
from tasks.data import stage_id
from tasks.evaluate import plot_curves
from tasks.progress import stage_progress

if TYPE_CHECKING:
    import polars as pl

BILM_CODE = [
    "elmo_core.bilm",
    "elmo_core.config",
    "elmo_core.training",
    "elmo_core.optim",
    "elmo_core.checkpoint",
    "elmo_core.distributed",
]
PRETRAIN = Stage("bilm", [*BILM_CODE, "elmo_core.vocab", "tasks.pretrain", "tasks.ddp_worker"])


def _pretrain_key(
    ids: str,
    vocab: str,
    home: str,
    bilm: dict,
    train: PretrainConfig,
    device: str = "auto",
    tracking: dict[str, str] | None = None,
    inputs: dict[str, str] | None = None,
    torchrun_args: list[str] | None = None,
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
    torchrun_args: list[str] | None = None,
) -> str:
    """Pretrain the biLM on the ids stage's shards; resumable from the stage's train_state.pt.
    With ``train.world_size`` > 1 the ranks run data-parallel under torchrun (a subprocess
    this task waits for; ``torchrun_args`` replace the single-node launch flags).

    ``bilm`` holds BiLMConfig fields except vocab_size (set from the vocabulary); ``tracking``,
    ``inputs`` (Parquet files shown as the run's dataset inputs) and ``torchrun_args`` are
    outside the cache key: ``tracking`` opens the stage's MLflow child run when it starts."""
    out = Home(home).stage_dir("bilm", _pretrain_key(ids, vocab, home, bilm, train))
    return build_stage(
        out,
        lambda d: _build(ids, vocab, d, bilm, train, device, tracking, inputs, torchrun_args),
    )


def _build(
    ids: str,
    vocab: str,
    out: Path,
    bilm: dict,
    train: PretrainConfig,
    device: str,
    tracking: dict[str, str] | None,
    inputs: dict[str, str] | None,
    torchrun_args: list[str] | None = None,
) -> None:
    ids_stats = read_json(Path(ids) / "metrics.json")
    tags = {"code_version": code_version(PRETRAIN.modules), "ids_stage": stage_id(ids)}
    with stage_run(tracking, "bilm-pretrain", tags) as run, stage_progress("biLM") as progress:
        t0 = time.perf_counter()
        if train.world_size > 1:
            res, points, config = _train_distributed(
                ids, vocab, out, bilm, train, device, run, torchrun_args
            )
        else:
            set_threads()
            hist = History("biLM", sink=run.log_metrics)
            model, v, res = train_bilm(
                ids, vocab, out, bilm, train, pick_device(device), hist, progress
            )
            save_bilm(out / "bilm.pt", model.cpu(), v)
            points, config = hist.points, model.config
            hist.save(out / "history.json")
        write_json(
            out / "config.json",
            {"bilm": asdict(config), "train": asdict(train), "ids": stage_id(ids)},
        )
        plot_curves(points, ["train_loss", "val_perplexity"], out, "biLM pretraining")
        write_json(
            out / "metrics.json",
            {
                "val_perplexity": res.val_perplexity,
                "val_perplexity_forward": res.val_perplexity_forward,
                "val_perplexity_backward": res.val_perplexity_backward,
                "corpus_tokens": ids_stats["train_tokens"],
                "val_tokens": res.val_tokens,
                "train_tokens": res.tokens,
                "train_steps": res.steps,
                "tokens_per_s": res.tokens / max(res.seconds, 1e-9),
                "world_size": train.world_size,
                "wall_s": time.perf_counter() - t0,
            },
        )
        (out / "train_state.pt").unlink(missing_ok=True)
        (out / "result.json").unlink(missing_ok=True)
        mark_complete(out)
        run.complete(out, {k: Path(p) for k, p in (inputs or {}).items()})


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


def torchrun_command(spec: Path, world_size: int, torchrun_args: list[str] | None) -> list[str]:
    """``torchrun`` for the ranks: one node with ``world_size`` processes, or the caller's own
    rendezvous flags (``--nnodes``, ``--rdzv-endpoint``, ``--nproc-per-node``...) for many."""
    launch = list(
        torchrun_args or ["--standalone", "--nnodes", "1", "--nproc-per-node", str(world_size)]
    )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch,
        "-m",
        "tasks.ddp_worker",
        str(spec),
    ]


def _train_distributed(
    ids: str,
    vocab: str,
    out: Path,
    bilm: dict,
    train: PretrainConfig,
    device: str,
    run: Any,
    torchrun_args: list[str] | None,
) -> tuple[TrainResult, list[dict[str, Any]], BiLMConfig]:
    """Run the ranks under torchrun and wait; rank 0 writes bilm.pt, history.json and
    result.json into the stage folder. A rank that dies fails the stage; the checkpoint it
    leaves is where a re-run resumes."""
    spec = out / ".ddp_spec.json"
    write_json(
        spec,
        {
            "ids": ids,
            "vocab": vocab,
            "out": str(out),
            "bilm": bilm,
            "train": asdict(train),
            "device": device,
            "tracking": run.target() if run is not None else None,
        },
    )
    env = dict(os.environ)
    # each rank gets its share of the cores: 2 ranks x 2 threads on 2 cores ran ~35x slower
    env.setdefault("ELMO_NEWS_THREADS", str(max(1, (os.cpu_count() or 1) // train.world_size)))
    env.setdefault("OMP_NUM_THREADS", env["ELMO_NEWS_THREADS"])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = torchrun_command(spec, train.world_size, torchrun_args)
    logger().info("biLM: %d ranks: %s", train.world_size, " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    if proc.returncode != 0:
        ckpt = out / "train_state.pt"
        where = (
            f"its last checkpoint {ckpt} is kept: a re-run resumes from it"
            if ckpt.exists()
            else "no checkpoint was written yet"
        )
        raise RuntimeError(
            f"distributed biLM pretraining failed: torchrun exited with {proc.returncode} "
            f"(a rank died or raised; see its output above); {where}"
        )
    result = read_json(out / "result.json")
    points = read_json(out / "history.json")
    config = BiLMConfig(**read_json(out / "result_config.json"))
    (out / "result_config.json").unlink()
    spec.unlink(missing_ok=True)
    return TrainResult(**result), points, config


# --------------------------------------------------------------------- adapting a reused biLM

ADAPT = Stage("bilm-adapt", [*BILM_CODE, "elmo_core.vocab", "tasks.pretrain", "tasks.corpus"])


def _adapt_key(
    bilm_dir: str,
    dataset: str,
    home: str,
    config: AdaptConfig,
    device: str = "auto",
    tracking: dict[str, str] | None = None,
) -> str:
    return ADAPT.key({"bilm": stage_id(bilm_dir), "dataset": stage_id(dataset)}, asdict(config))


@task(name="adapt-bilm", cache_key_fn=cache_key(_adapt_key), **STAGE_OPTS)
def adapt(
    bilm_dir: str,
    dataset: str,
    home: str,
    config: AdaptConfig,
    device: str = "auto",
    tracking: dict[str, str] | None = None,
) -> str:
    """A reused biLM trained ``config.epochs`` more passes as a language model on the train
    split's text (its vocabulary kept, or grown by the split's words it lacks with
    ``config.new_words_min_count``): a new biLM stage folder, the original untouched. Its
    validation perplexity on the val split is measured before and after."""
    out = Home(home).stage_dir("bilm", _adapt_key(bilm_dir, dataset, home, config))
    return build_stage(out, lambda d: _build_adapt(bilm_dir, dataset, d, config, device, tracking))


def _grow_vocabulary(
    model: BiLM, v: Vocab, train: pl.Series, config: AdaptConfig
) -> tuple[BiLM, Vocab, dict[str, float]]:
    """The biLM and vocabulary grown by the train split's frequent words it lacks. Their
    counts are put on the pretraining corpus's scale (by the ratio of corpus to train counts
    over the words both share) so the softmax proposal and the new words' starting share of
    <unk>'s probability are comparable with the old words'."""
    counts = train.explode().drop_nulls().value_counts(name="count")
    known = set(v.tokens)
    old = dict(zip(v.tokens, v.counts, strict=True))
    shared = [(old[t], c) for t, c in counts.iter_rows() if t in known]
    ratio = sum(a for a, _ in shared) / max(1, sum(c for _, c in shared))
    task = dict(counts.iter_rows())
    total = max(1, sum(task.values()))

    def unk_rate(vocab: set[str]) -> float:  # share of the train split's tokens read as <unk>
        return sum(c for t, c in task.items() if t not in vocab) / total

    grown = v.extend(task, config.new_words_min_count, config.new_words_max)
    words = grown.tokens[len(v) :]
    scaled = [max(1, round(task[t] * ratio)) for t in words]
    grown = Vocab(v.tokens + words, v.counts + tuple(scaled))
    unk_mass = max(v.counts[v.unk_id], sum(scaled))
    share = torch.log(torch.tensor(scaled, dtype=torch.float64) / unk_mass).float()
    model = model.with_new_words(words, share)
    model.softmax.set_proposal(torch.from_numpy(grown.unigram()))
    return (
        model,
        grown,
        {
            "new_words": len(words),
            "train_unk_rate_before": unk_rate(known),
            "train_unk_rate_after": unk_rate(set(grown.tokens)),
            "new_words_count_scale": ratio,
        },
    )


def _build_adapt(
    bilm_dir: str,
    dataset: str,
    out: Path,
    config: AdaptConfig,
    device: str,
    tracking: dict[str, str] | None,
) -> None:
    import polars as pl

    from storage.datasets import read_dataset
    from tasks.corpus import encode_docs, shuffled

    set_threads()
    dev = pick_device(device)
    model, v = load_bilm(Path(bilm_dir) / "bilm.pt")
    tokens = {
        s: shuffled(read_dataset(Path(dataset) / f"{s}.parquet")["tokens"], config.seed)
        for s in ("train", "val")
    }
    grown = {"new_words": 0}
    if config.new_words_min_count:
        model, v, grown = _grow_vocabulary(model, v, tokens["train"], config)
    index = pl.DataFrame({"token": list(v.tokens), "id": np.arange(len(v), dtype=np.int32)})
    split = {s: encode_docs(t, index) for s, t in tokens.items()}
    train = config.pretrain_config()
    val_ids = split["val"][: max(train.val_tokens, train.window)]
    before = perplexity(model.to(dev), make_windows(val_ids, train.window), dev)
    tags = {"code_version": code_version(ADAPT.modules), "adapted_from": stage_id(bilm_dir)}
    with stage_run(tracking, "bilm-adapt", tags) as run, stage_progress("biLM adapt") as progress:
        hist = History("biLM adapt", sink=run.log_metrics)
        t0 = time.perf_counter()
        model.train()
        res = pretrain_bilm(
            model,
            TokenWindows([split["train"]], train.window),
            val_ids,
            train,
            hist,
            out / "train_state.pt",
            dev,
            progress=progress,
        )
        save_bilm(out / "bilm.pt", model.cpu(), v)
        hist.save(out / "history.json")
        plot_curves(hist.points, ["train_loss", "val_perplexity"], out, "biLM adaptation")
        write_json(
            out / "config.json",
            {"bilm": asdict(model.config), "adapt": asdict(config), "from": stage_id(bilm_dir)},
        )
        write_json(
            out / "metrics.json",
            {
                "val_perplexity_forward_before": before[0],
                "val_perplexity_backward_before": before[1],
                "val_perplexity_forward": res.val_perplexity_forward,
                "val_perplexity_backward": res.val_perplexity_backward,
                "val_perplexity": res.val_perplexity,
                "train_tokens": res.tokens,
                "train_steps": res.steps,
                "tokens_per_s": res.tokens / max(res.seconds, 1e-9),
                "wall_s": time.perf_counter() - t0,
                **grown,
            },
        )
        (out / "train_state.pt").unlink(missing_ok=True)
        mark_complete(out)
        run.complete(out, {"train": Path(dataset) / "train.parquet"})
