"""Stage ``adapt-bilm``: a reused biLM trained a few more passes as a language model on a
task's train split and any unlabeled text given with it (its vocabulary kept, or grown by that
text's frequent words)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from elmo_core.bilm import BiLM
from elmo_core.bilm_checkpoint import load_bilm, save_bilm
from elmo_core.device import pick_device
from elmo_core.pretrain_config import AdaptConfig
from elmo_core.pretraining import perplexity, pretrain_bilm
from elmo_core.vocab import Vocab
from elmo_core.windows import TokenWindows, make_windows
from storage.charts import plot_curves
from storage.paths import mark_complete, stage_id, write_json
from storage.tracking import stage_run
from tasks.common import History, logger, set_threads
from tasks.progress import stage_progress
from tasks.stage import StageContext, stage

if TYPE_CHECKING:
    import polars as pl

ADAPT = stage(
    "bilm-adapt",
    __name__,
    inputs=["bilm_dir", "dataset", "corpora"],
    config=["config"],
    folder="bilm",
)


@ADAPT.task(name="adapt-bilm")
def adapt(
    bilm_dir: str,
    dataset: str,
    config: AdaptConfig,
    ctx: StageContext,
    corpora: Sequence[str] = (),
) -> str:
    """A reused biLM trained more passes as a language model (up to ``config.epochs``, fewer
    once a pass stops lowering the val split's perplexity by ``config.min_gain``) on the train
    split's text plus the training documents of ``corpora`` (``read-corpus`` folders: the
    task's unlabeled text, where a few labelled documents come with many unlabeled ones), its
    vocabulary kept or grown by that text's words it lacks (``config.new_words_min_count``):
    a new biLM stage folder, the original untouched. Its validation perplexity on the val
    split is measured before and after."""
    return ADAPT.build(
        locals(),
        lambda d: _build_adapt(
            bilm_dir, dataset, list(corpora), d, config, ctx.device, ctx.tracking
        ),
    )


def _grow_vocabulary(
    model: BiLM, v: Vocab, train: pl.Series, config: AdaptConfig
) -> tuple[BiLM, Vocab, dict[str, float]]:
    """The biLM and vocabulary grown by the frequent words of the adaptation text (``train``:
    the train split's documents, then the unlabeled ones) it lacks. Their counts are put on
    the pretraining corpus's scale (by the ratio of corpus to adaptation-text counts over the
    words both share) so the softmax proposal and the new words' starting share of
    <unk>'s probability are comparable with the old words'."""
    counts = train.explode().drop_nulls().value_counts(name="count")
    known = set(v.tokens)
    old = dict(zip(v.tokens, v.counts, strict=True))
    shared = [(old[t], c) for t, c in counts.iter_rows() if t in known]
    ratio = sum(a for a, _ in shared) / max(1, sum(c for _, c in shared))
    task = dict(counts.iter_rows())
    total = max(1, sum(task.values()))

    def unk_rate(vocab: set[str]) -> float:  # share of the adaptation text read as <unk>
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


def _spell_task_words(
    model: BiLM, v: Vocab, train: pl.Series, config: AdaptConfig, out: Path, bilm_dir: str
) -> None:
    """A biLM imported from published weights has no LM softmax, so no LM pass can adapt it:
    it only learns the adaptation text's words (at least ``new_words_min_count`` times, 1 if
    unset), spelled by its character encoder, so the classifier's task token embedding starts
    from those words' vectors instead of <unk>'s."""
    min_count = max(1, config.new_words_min_count)
    model, v, grown = _grow_vocabulary(
        model, v, train, replace(config, new_words_min_count=min_count)
    )
    logger().info(
        "adapt: the biLM has no LM softmax (published ELMo weights): no LM passes; its "
        "vocabulary learns %d train-split words for the classifier's token embedding",
        grown["new_words"],
    )
    save_bilm(out / "bilm.pt", model.cpu(), v)
    write_json(
        out / "config.json",
        {"bilm": asdict(model.config), "adapt": asdict(config), "from": stage_id(bilm_dir)},
    )
    write_json(out / "metrics.json", {**grown, "train_steps": 0, "lm_passes_skipped": 1})
    mark_complete(out)


def _read_unlabeled(corpora: list[str], seed: int) -> list[pl.Series]:
    """The training documents' tokens of each ``read-corpus`` shard (held-out ones never),
    each shard in a seeded order. Held in memory whole: sized for a task's own unlabeled
    articles; a pretraining corpus goes to ``elmo-news pretrain``, which streams it."""
    import polars as pl

    from tasks.corpus import token_shards
    from tasks.ids import shuffled

    return [
        shuffled(pl.read_parquet(p, columns=["tokens"])["tokens"], seed)
        for c in corpora
        for p in token_shards(c)
    ]


def _build_adapt(
    bilm_dir: str,
    dataset: str,
    corpora: list[str],
    out: Path,
    config: AdaptConfig,
    device: str,
    tracking: dict[str, str] | None,
) -> None:
    import polars as pl

    from storage.datasets import read_dataset
    from tasks.ids import encode_docs, shuffled

    set_threads()
    dev = pick_device(device)
    model, v = load_bilm(Path(bilm_dir) / "bilm.pt")
    tokens = {
        s: shuffled(read_dataset(Path(dataset) / f"{s}.parquet")["tokens"], config.seed)
        for s in ("train", "val")
    }
    unlabeled = _read_unlabeled(corpora, config.seed)
    text = pl.concat([tokens["train"], *unlabeled]) if unlabeled else tokens["train"]
    grown: dict[str, float] = {"new_words": 0}
    if not model.config.lm_head:  # published weights: no softmax to adapt through
        _spell_task_words(model, v, text, config, out, bilm_dir)
        return
    if config.new_words_min_count:
        model, v, grown = _grow_vocabulary(model, v, text, config)
    index = pl.DataFrame({"token": list(v.tokens), "id": np.arange(len(v), dtype=np.int32)})
    split = {s: encode_docs(t, index) for s, t in tokens.items()}
    extra = [encode_docs(t, index) for t in unlabeled]  # one id stream per corpus shard
    more = {
        "unlabeled_docs": sum(len(t) for t in unlabeled),
        "unlabeled_tokens": sum(len(e) for e in extra),
    }
    if unlabeled:
        logger().info(
            "adapt: %d train-split documents + %d unlabeled documents (%d tokens) from %d corpora",
            len(tokens["train"]),
            more["unlabeled_docs"],
            more["unlabeled_tokens"],
            len(corpora),
        )
    train = config.pretrain_config()
    val_ids = split["val"][: max(train.val_tokens, train.window)]
    before = perplexity(model.to(dev), make_windows(val_ids, train.window), dev)
    tags = {"code_version": ADAPT.code_version(), "adapted_from": stage_id(bilm_dir)}
    with stage_run(tracking, "bilm-adapt", tags) as run, stage_progress("biLM adapt") as progress:
        hist = History("biLM adapt", sink=run.log_metrics)
        t0 = time.perf_counter()
        model.train()
        res = pretrain_bilm(
            model,
            TokenWindows([split["train"], *extra], train.window),
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
                "passes": res.passes,
                "best_pass": res.best_pass,
                "stop_reason": res.stop_reason,
                "tokens_per_s": res.tokens / max(res.seconds, 1e-9),
                "wall_s": time.perf_counter() - t0,
                **more,
                **grown,
            },
        )
        (out / "train_state.pt").unlink(missing_ok=True)
        mark_complete(out)
        run.complete(out, {"train": Path(dataset) / "train.parquet"})
