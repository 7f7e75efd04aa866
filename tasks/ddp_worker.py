"""One torchrun rank of data-parallel biLM pretraining (``python -m torch.distributed.run ...
-m tasks.ddp_worker SPEC.json``; started by the pretrain stage, not by hand).

Every rank builds the same seeded biLM and trains on its slice of every global batch; rank 0
streams metrics into the stage's MLflow run, checkpoints, and writes ``bilm.pt``,
``history.json`` and ``result.json`` into the stage folder for the stage to finish."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from elmo_core.bilm_checkpoint import save_bilm
from elmo_core.callbacks import no_log
from elmo_core.device import pick_device
from elmo_core.distributed import init_from_env, shutdown
from elmo_core.pretrain_config import PretrainConfig
from storage.paths import write_json
from storage.tracking import StageRun
from tasks.bilm_training import train_bilm
from tasks.common import History, set_threads


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    device = pick_device(spec["device"])
    ctx = init_from_env(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        device = torch.device("cuda", ctx.local_rank)
    set_threads()
    out = Path(spec["out"])
    hist = (
        History("biLM", sink=StageRun.attach(spec["tracking"]).log_metrics) if ctx.is_main else None
    )
    model, vocab, res = train_bilm(
        spec["ids"],
        spec["vocab"],
        out,
        spec["bilm"],
        PretrainConfig(**spec["train"]),
        device,
        hist if hist is not None else no_log,
        ctx=ctx,
    )
    if ctx.is_main and hist is not None:
        save_bilm(out / "bilm.pt", model.cpu(), vocab)
        hist.save(out / "history.json")
        write_json(out / "result_config.json", asdict(model.config))
        write_json(out / "result.json", asdict(res))  # last: the stage reads it on success
    shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1])
