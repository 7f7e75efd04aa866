"""The classifier's training step of other checkouts of this project beside this one, on the
same batches, alternating: what a change did to the step, in one session on one machine.

Each tree (this checkout first, then every ``--tree PATH``: a checkout whose
``elmo_core.classifier_training`` has ``train_step``) runs in a process of its own, importing its
own code: its ``LayerStore`` reads the same batches of a finished run's stored layers
(``--home``, as ``bench/classifier_step.py`` takes them: the profile's batch size, the first
``--batches`` of a seeded order), read in line as the loop reads them on a CPU without a spare
core, and its loop step trains on them, float32, the allocator tuned as the pipeline tunes it.
The trees take turns for ``--rounds`` rounds, so a machine whose speed drifts slows them alike.

    .venv/bin/python bench/step_trees.py --home H --tree ../checkout-before [--rounds 3] [--out bench/results/step_trees.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def time_tree(home: str, profile: str, strategy: str, n_batches: int, passes: int) -> dict:
    """In the child process (its tree first on ``sys.path``): tokens/s of the loop's step.

    The model and optimizer are set up here, not through ``bench/classifier_step.py``: only
    what older trees have too may be called."""
    import torch

    import elmo_core
    from bench.classifier_step import latest_run
    from elmo_core.classifier_optim import (
        Optimizers,
        classifier_param_groups,
        mark_sparse_parameters,
    )
    from elmo_core.classifier_training import ema_decay, train_step
    from elmo_core.ema import WeightAverage
    from elmo_core.task_embedding import restrict_to_rows
    from flows.params import RunParams
    from flows.runtime import tune_allocator
    from storage.paths import read_json
    from tasks.classify import new_classifier
    from tasks.features import layer_store

    tune_allocator()
    cpu = torch.device("cpu")
    run = latest_run(Path(home))
    config = RunParams.model_validate({"profile": profile}).resolve().classifier
    train = layer_store(run["features"], "train")
    n_layers, dim = train.layer_shape
    classes = len(read_json(Path(run["dataset"]) / "labels.json"))
    order = list(train.batches(config.batch_size, torch.Generator().manual_seed(0)))[:n_batches]
    torch.manual_seed(0)
    model, _ = new_classifier(run["bilm"], strategy, config, n_layers, dim, classes)
    model.train()
    restrict_to_rows(model, train.tokens)
    mark_sparse_parameters(model)
    groups = classifier_param_groups(model, config.lr, config.embedding_lr_scale)
    params = [p for g in groups for p in g["params"]]
    opt = Optimizers(groups, config.lr, 0.0)
    ema = WeightAverage(model, ema_decay)
    warmup, tokens, t0 = 3, 0, 0.0
    for i, idx in enumerate(order * passes):
        if i == warmup:
            t0 = time.perf_counter()
        batch = train.batch(idx)  # read in line, as the loop does here
        if i >= warmup:
            tokens += int(batch[1].sum())
        train_step(model, opt, ema, params, batch, cpu, "fp32")
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": tokens / seconds, "code": str(Path(elmo_core.__file__).parent.parent)}


def commit_of(tree: Path) -> str:
    """The tree's short commit, ``+changes`` when tracked files differ from it; ``?`` if none."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "?"
    status = [*git, "status", "--porcelain", "--untracked-files=no"]
    dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=".elmo-news")
    ap.add_argument("--tree", action="append", default=[], help="another checkout (repeatable)")
    ap.add_argument("--profile", default="sample")
    ap.add_argument("--strategy", default="wsum")
    ap.add_argument("--batches", type=int, default=33)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # the tree this process times
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_trees.json"))
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, args.child)
        result = time_tree(args.home, args.profile, args.strategy, args.batches, args.passes)
        print(json.dumps(result))
        return
    sys.path.insert(0, str(ROOT))
    from bench.machine import machine, write_report

    trees = [ROOT, *(Path(t).resolve() for t in args.tree)]
    rates: dict[str, list[float]] = {str(t): [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            cmd = [sys.executable, __file__, "--child", str(tree), "--home", args.home]
            cmd += ["--profile", args.profile, "--strategy", args.strategy]
            cmd += ["--batches", str(args.batches), "--passes", str(args.passes)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tree)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if Path(result["code"]).resolve() != tree:  # an installed copy shadowed the tree
                raise SystemExit(f"{tree}: timed the code of {result['code']} instead")
            rates[str(tree)].append(result["tokens_per_s"])
    here = statistics.mean(rates[str(ROOT)])
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "batches": args.batches,
        "passes": args.passes,
        "strategy": args.strategy,
        "trees": [
            {
                "tree": "this checkout" if t == ROOT else str(t),
                "commit": commit_of(t),
                "tokens_per_s": [round(r) for r in rates[str(t)]],
                "mean": round(statistics.mean(rates[str(t)])),
                "this_checkout_vs_it": round(here / statistics.mean(rates[str(t)]), 3),
            }
            for t in trees
        ],
    }
    ratios = ", ".join(f"{t['commit']}={t['this_checkout_vs_it']}" for t in report["trees"][1:])
    write_report(args.out, report, f"step_vs_trees: {ratios}")


if __name__ == "__main__":
    main()
