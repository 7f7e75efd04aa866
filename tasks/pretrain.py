"""Stage: pretrain the biLM on token-id shards (the train split + corpora, or corpora alone)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elmo_core.bilm_checkpoint import save_bilm
from elmo_core.bilm_config import BiLMConfig
from elmo_core.device import pick_device
from elmo_core.pretrain_config import PretrainConfig
from storage.charts import plot_curves
from storage.hashing import ROOT
from storage.paths import mark_complete, read_json, stage_id, write_json
from storage.tracking import stage_run
from tasks import ddp_worker
from tasks.common import History, logger, set_threads
from tasks.progress import stage_progress
from tasks.stage import StageContext, stage

if TYPE_CHECKING:
    pass
from tasks.bilm_training import TrainResult, train_bilm

PRETRAIN = stage("bilm", __name__, inputs=["ids", "vocab"], config=["bilm", "train"])


@PRETRAIN.task(name="pretrain-bilm")
def pretrain(
    ids: str,
    vocab: str,
    bilm: dict,
    train: PretrainConfig,
    ctx: StageContext,
    inputs: dict[str, str] | None = None,
    torchrun_args: list[str] | None = None,
) -> str:
    """Pretrain the biLM on the ids stage's shards; resumable from the stage's train_state.pt.
    With ``train.world_size`` > 1 the ranks run data-parallel under torchrun (a subprocess
    this task waits for; ``torchrun_args`` replace the single-node launch flags).

    ``bilm`` holds BiLMConfig fields except vocab_size (set from the vocabulary); ``inputs``
    (Parquet files shown as the run's dataset inputs) and ``torchrun_args`` are outside the
    cache key; ``ctx.tracking`` opens the stage's MLflow child run when it starts."""
    return PRETRAIN.build(
        locals(),
        lambda d: _build(
            ids, vocab, d, bilm, train, ctx.device, ctx.tracking, inputs, torchrun_args
        ),
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
    tags = {"code_version": PRETRAIN.code_version(), "ids_stage": stage_id(ids)}
    with stage_run(tracking, "bilm-pretrain", tags) as run, stage_progress("biLM") as progress:
        t0 = time.perf_counter()
        if train.world_size > 1:
            rank_spec = {
                "ids": ids,
                "vocab": vocab,
                "out": str(out),
                "bilm": bilm,
                "train": asdict(train),
                "device": device,
                "tracking": run.target(),
            }
            res, points, config = _train_distributed(
                out, rank_spec, train.world_size, torchrun_args
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
        ddp_worker.__name__,
        str(spec),
    ]


def _train_distributed(
    out: Path, rank_spec: dict[str, Any], world_size: int, torchrun_args: list[str] | None
) -> tuple[TrainResult, list[dict[str, Any]], BiLMConfig]:
    """Run ``world_size`` ranks under torchrun (each reads ``rank_spec``: the stage's inputs,
    configs and tracking target) and wait; rank 0 writes bilm.pt, history.json and
    result.json into the stage folder. A rank that dies fails the stage; the checkpoint it
    leaves is where a re-run resumes."""
    spec = out / ".ddp_spec.json"
    write_json(spec, rank_spec)
    env = dict(os.environ)
    # each rank gets its share of the cores: 2 ranks x 2 threads on 2 cores ran ~35x slower
    env.setdefault("ELMO_NEWS_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    env.setdefault("OMP_NUM_THREADS", env["ELMO_NEWS_THREADS"])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = torchrun_command(spec, world_size, torchrun_args)
    logger().info("biLM: %d ranks: %s", world_size, " ".join(cmd))
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
