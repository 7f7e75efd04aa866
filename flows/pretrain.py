"""The ``elmo-news-pretrain`` flow: unlabeled corpora → vocabulary → id shards → biLM →
registered as ``elmo-news-bilm``, for any number of later ``elmo-news run --bilm`` runs.

No labelled dataset: the vocabulary and the biLM see the corpora alone, and the held-out
perplexity is measured on a fixed, seeded slice of their documents (``corpus.holdout_fraction``)
that neither the vocabulary nor the training ever saw, so it compares across runs and corpora.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.params import PretrainParams
from flows.skeleton import parent_run
from storage.hashing import hash_json
from storage.paths import read_json, stage_id
from storage.registry import register_bilm
from tasks.corpus import read_pretrain_corpus
from tasks.ids import encode_ids
from tasks.pretrain import PRETRAIN, pretrain
from tasks.registry import registry_slot
from tasks.stage import StageContext, in_home
from tasks.vocab import build_vocab


@flow(name="elmo-news-pretrain")
def elmo_news_pretrain(params: PretrainParams) -> dict[str, Any]:
    """Pretrain a standalone biLM; returns its stage folder, metrics and registered version."""
    cfg = params.resolve()
    profile = params.profile
    logged_params = {"profile": profile, "corpus": params.corpus}
    with parent_run(
        params.home_dir(), profile, logged_params, kind="pretrain", name_prefix="pretrain-"
    ) as run:
        h, tracker, parent, log = run.home, run.tracker, run.run_id, run.log
        ctx = StageContext(str(h.root), params.device, tracker.target())
        with run.timed("corpus"):
            corpora = [in_home(read_pretrain_corpus, h)(c, cfg.corpus, ctx) for c in params.corpus]
        with run.timed("vocab_ids"):
            vocab = in_home(build_vocab, h)(None, corpora, cfg.vocab, ctx)
            ids = in_home(encode_ids, h)(None, corpora, vocab, cfg.pretrain.seed, ctx)
        with run.timed("pretrain"):
            bilm = dict(cfg.bilm.__dict__)
            bilm_dir = in_home(pretrain, h)(
                ids, vocab, bilm, cfg.pretrain, ctx, None, params.torchrun_args
            )
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
        if params.register_model:
            with run.timed("register"), registry_slot():  # against a server: its registry slot
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
            log.info("registered %s", registry["uri"])
        run.log_timings()
        md = "\n".join(
            [
                "| figure | value |",
                "|---|---|",
                *[
                    f"| {k} | {v:,} |" if float(v).is_integer() else f"| {k} | {v:,.2f} |"
                    for k, v in summary_metrics.items()
                ],
                *[f"| wall s: {k} | {v:.1f} |" for k, v in run.timings.items()],
                f"| registered | {registry['uri'] if registry else '-'} |",
            ]
        )
        return run.publish(
            f"elmo-news-pretrain ({profile})",
            md,
            "elmo-news-pretrain-summary",
            "Corpus, held-out perplexity per direction, registered biLM",
            {
                "corpora": corpora,
                "vocab": vocab,
                "ids": ids,
                "bilm": bilm_dir,
                "metrics": summary_metrics,
                "timings": run.timings,
                "registry": registry,
            },
            h.runs / f"{parent}.json",
        )
