"""The ``elmo-news-pretrain`` flow: unlabeled corpora → vocabulary → id shards → biLM →
registered as ``elmo-news-bilm``, for any number of later ``elmo-news run --bilm`` runs.

No labelled dataset: the vocabulary and the biLM see the corpora alone, and the held-out
perplexity is measured on a fixed, seeded slice of their documents (``corpus.holdout_fraction``)
that neither the vocabulary nor the training ever saw, so it compares across runs and corpora.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from flows.params import PretrainParams, Profile
from flows.runtime import tune_allocator
from storage.hashing import hash_json
from storage.paths import Home, read_json, stage_id, write_json
from storage.registry import register_bilm
from storage.tracking import Tracker, runs_path
from tasks.corpus import read_pretrain_corpus
from tasks.ids import encode_ids
from tasks.pretrain import PRETRAIN, pretrain
from tasks.registry import registry_slot
from tasks.stage import in_home
from tasks.vocab import build_vocab


@flow(name="elmo-news-pretrain")
def elmo_news_pretrain(
    corpus: list[str],
    profile: Profile = "smoke",
    home: str | None = None,
    device: str = "auto",
    overrides: dict[str, dict[str, Any]] | None = None,
    register_model: bool = True,  # register the biLM as elmo-news-bilm
    torchrun_args: list[str] | None = None,  # multi-node launch flags (pretrain.world_size > 1)
) -> dict[str, Any]:
    """Pretrain a standalone biLM; returns its stage folder, metrics and registered version."""
    params = PretrainParams(
        corpus=corpus, profile=profile, home=home, device=device, overrides=overrides or {}
    )
    cfg = params.resolve()
    h = Home(params.home_dir())
    home_s = str(h.root)
    log = get_run_logger()
    log.info("allocator tuned for training: %s", tune_allocator())
    tracker = Tracker(h.mlflow_uri())
    flow_run = get_run_context().flow_run
    parent = tracker.start_parent(
        run_name=f"pretrain-{flow_run.name}",
        params={"profile": profile, "corpus": params.corpus},
        tags={"prefect_flow_run_id": str(flow_run.id), "profile": profile, "kind": "pretrain"},
    )
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        t = time.perf_counter()
        corpora = [in_home(read_pretrain_corpus, h)(c, home_s, cfg.corpus) for c in params.corpus]
        timings["corpus"] = time.perf_counter() - t
        t = time.perf_counter()
        vocab = in_home(build_vocab, h)(None, corpora, home_s, cfg.vocab)
        ids = in_home(encode_ids, h)(None, corpora, vocab, home_s, cfg.pretrain.seed)
        timings["vocab_ids"] = time.perf_counter() - t
        t = time.perf_counter()
        target = tracker.target()
        bilm_dir = in_home(pretrain, h)(
            ids,
            vocab,
            home_s,
            dict(cfg.bilm.__dict__),
            cfg.pretrain,
            device,
            target,
            None,
            torchrun_args,
        )
        timings["pretrain"] = time.perf_counter() - t
        corpus_stats = [read_json(Path(c) / "metrics.json") for c in corpora]
        corpus_hash = hash_json([stage_id(c) for c in corpora])[:16]
        common = {"corpus_sha256": corpus_hash, "code_version": PRETRAIN.code_version()}
        for c in corpora:
            tracker.log_stage("corpus", Path(c), {**common, "corpus_key": stage_id(c)})
        child, _ = tracker.log_stage("bilm-pretrain", Path(bilm_dir), common)
        metrics = read_json(Path(bilm_dir) / "metrics.json")
        summary_metrics = {
            "corpus_words": sum(s["corpus_words"] for s in corpus_stats),
            "corpus_docs": sum(s["corpus_docs"] for s in corpus_stats),
            "corpus_tokens": metrics["corpus_tokens"],
            "heldout_tokens": metrics["val_tokens"],
            "val_perplexity_forward": metrics["val_perplexity_forward"],
            "val_perplexity_backward": metrics["val_perplexity_backward"],
            "train_tokens": metrics["train_tokens"],
            "tokens_per_s": metrics["tokens_per_s"],
        }
        tracker.log_metrics(parent, summary_metrics)
        registry = None
        if register_model:
            t = time.perf_counter()
            with registry_slot():  # against a server: the Prefect server's registry slot
                registry = register_bilm(
                    h.mlflow_uri(),
                    child,
                    Path(bilm_dir),
                    {
                        "corpus_sha256": corpus_hash,
                        "corpus_tokens": str(metrics["corpus_tokens"]),
                        "val_perplexity_forward": f"{metrics['val_perplexity_forward']:.2f}",
                        "val_perplexity_backward": f"{metrics['val_perplexity_backward']:.2f}",
                        "profile": profile,
                    },
                )
            tracker.link_model(parent, registry.get("model_id"))
            tracker.client.set_tag(parent, "bilm_model", registry["uri"])
            timings["register"] = time.perf_counter() - t
            log.info("registered %s", registry["uri"])
        timings["total"] = time.perf_counter() - t_all
        tracker.log_metrics(parent, {f"wall_s.{k}": v for k, v in timings.items()})
        md = "\n".join(
            [
                "| figure | value |",
                "|---|---|",
                *[
                    f"| {k} | {v:,} |" if float(v).is_integer() else f"| {k} | {v:,.2f} |"
                    for k, v in summary_metrics.items()
                ],
                *[f"| wall s: {k} | {v:.1f} |" for k, v in timings.items()],
                f"| registered | {registry['uri'] if registry else '-'} |",
            ]
        )
        tracker.log_text(parent, md, "summary.md")
        create_markdown_artifact(
            markdown=f"# elmo-news-pretrain ({profile})\n\n{md}",
            key="elmo-news-pretrain-summary",
            description="Corpus, held-out perplexity per direction, registered biLM",
        )
        log.info("summary\n%s", md)
        log.info("MLflow UI: http://127.0.0.1:5000/#%s", runs_path(tracker.experiment_id, parent))
        summary = {
            "parent_run_id": parent,
            "home": home_s,
            "corpora": corpora,
            "vocab": vocab,
            "ids": ids,
            "bilm": bilm_dir,
            "metrics": summary_metrics,
            "timings": timings,
            "registry": registry,
        }
        write_json(h.runs / f"{parent}.json", summary)
        tracker.finish(parent)
        return summary
    except BaseException:
        tracker.finish(parent, "FAILED")
        raise
