"""The ``elmo-news`` flow: ingest -> vocab -> biLM -> layers -> one classifier per strategy
(+ TF-IDF baseline) -> summary, with every stage cached by content and tracked in MLflow."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from elmo_core.classifier_training import STOP_REASONS
from elmo_core.mix import ABLATION
from flows.fanout import FanOut, fanout
from flows.params import Resolved, RunParams
from flows.skeleton import parent_run
from storage.charts import comparison_chart
from storage.paths import Home, read_json, split_files
from storage.remote import is_object_store
from storage.tracking import Tracker
from tasks.adapt import ADAPT, adapt
from tasks.baseline import baseline
from tasks.classify import CLASSIFIER, classify
from tasks.corpus import read_pretrain_corpus
from tasks.features import features
from tasks.ids import encode_ids
from tasks.ingest import INGEST, fetch_data, ingest, preflight_data, source_hash
from tasks.pretrain import PRETRAIN, pretrain
from tasks.registry import fetch_bilm, register_best
from tasks.remote import fetch_remote
from tasks.stage import StageContext, in_home
from tasks.vocab import build_vocab

PARALLEL = int(os.environ.get("ELMO_NEWS_PARALLEL_TASKS", "1"))
# tasks at once in the flow process (Prefect types the bare runner as running no futures)
THREADS: Any = ThreadPoolTaskRunner(max_workers=PARALLEL)


def elmo_gains(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``elmo_gain_<strategy>``: each strategy's test accuracy minus the static ablation's (in
    accuracy units; x100 = points), i.e. what the biLM's contextual layers add."""
    acc = {r["name"]: r["metrics"]["test_accuracy"] for r in rows}
    static = acc.get(f"classifier-{ABLATION}")
    if static is None:
        return {}
    return {
        f"elmo_gain_{name.removeprefix('classifier-')}": a - static
        for name, a in acc.items()
        if name.startswith("classifier-") and name != f"classifier-{ABLATION}"
    }


def _steps(metrics: dict[str, Any]) -> str:
    """A classifier's optimizer steps and, in brackets, the kept (best) step, and what chose
    it when that was not validation accuracy."""
    if "steps" not in metrics:
        return ""
    on = ", on val loss" if metrics.get("selected_on") == "loss" else ""
    return f"{metrics['steps']} ({metrics['best_step']}{on})"


def summary_markdown(rows: list[dict[str, Any]], timings: dict[str, float]) -> str:
    gains = elmo_gains(rows)
    lines = [
        "| model | test accuracy | gain over static (pt) | macro F1 | weighted F1 "
        "| best val accuracy | steps (best) | stopped | cached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        g = gains.get(f"elmo_gain_{r['name'].removeprefix('classifier-')}")
        gain = f"{100 * g:+.2f}" if g is not None else ""
        lines.append(
            f"| {r['name']} | {m['test_accuracy']:.4f} | {gain} | {m['test_macro_f1']:.4f} | "
            f"{m['test_weighted_f1']:.4f} | {m.get('best_val_accuracy', float('nan')):.4f} "
            f"| {_steps(m)} | {STOP_REASONS.get(m.get('stop_reason', ''), '')} | {r['cached']} |"
        )
    lines += ["", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    return "\n".join(lines)


# below this many tokens of pretraining text (train split + --pretrain-corpus) the run says its
# in-run biLM is too small and how to reuse one. Measured bracket (bench/datasets.py, docs'
# "What was tried", results page): the AG News 500- and 2,000-document runs' in-run biLMs
# (tens of thousands of tokens) put every contextual strategy under the static ablation and far
# under the reused news biLM; make run's (AG sample + Reuters, millions of tokens) matched
# static within seed noise
SMALL_BILM_CORPUS_TOKENS = 1_000_000


def small_bilm_note(params: RunParams, bilm_dir: str) -> str:
    """A line for the summary when the run pretrained its biLM on too little text."""
    metrics = Path(bilm_dir) / "metrics.json"
    if params.bilm or not metrics.exists():
        return ""
    tokens = int(read_json(metrics).get("corpus_tokens", 0))
    if tokens >= SMALL_BILM_CORPUS_TOKENS:
        return ""
    return (
        f"The biLM was pretrained in this run on {tokens:,} tokens, under the "
        f"{SMALL_BILM_CORPUS_TOKENS:,} below which an in-run biLM's contextual layers did worse "
        "than its own static word vectors in our measurements. Pretrain one once on a news "
        "corpus and reuse it: "
        "`elmo-news pretrain --profile news --corpus NEWS_TEXT`, then `elmo-news run ... "
        "--bilm models:/elmo-news-bilm/N`, with any unlabeled text of your own as "
        "`--pretrain-corpus` beside it (the reused biLM adapts on it)."
    )


def has_lm_head(bilm_dir: str) -> bool:
    """Whether a biLM folder's model has a trained LM softmax (an imported one has none)."""
    config = Path(bilm_dir) / "config.json"
    return not config.exists() or read_json(config).get("bilm", {}).get("lm_head", True)


@dataclass
class Upstream:
    """What the fanned-out stages read: stage folders up to the stored layers."""

    data_hash: str
    dataset: str
    vocab: str | None
    bilm_dir: str
    feats: str
    base_future: Any = None  # the TF-IDF baseline, started beside pretraining


def upstream(
    params: RunParams,
    cfg: Resolved,
    h: Home,
    tracker: Tracker,
    fan: FanOut,
    timings: dict[str, float],
    with_baseline: bool = True,
) -> Upstream:
    """ingest -> (vocab -> ids -> biLM | the reused biLM [-> adaptation]) -> layers: every
    stage cached by content. The baseline (optional) goes to the fan-out as soon as the data
    is in, so it trains beside the pretraining."""
    log = get_run_logger()
    home_s = str(h.root)
    parent = tracker.parent_id()
    t = time.perf_counter()
    if is_object_store(params.data):  # s3://bucket/prefix (pyarrow.fs)
        source = fetch_remote(params.data, home_s)
    else:
        source = fetch_data(params.data, home_s)
    data_hash = source_hash(source)
    # stages that build open their own child runs under the tracker's target
    ctx = StageContext(home_s, params.device, tracker.target())
    if not INGEST.built({"source": source, "config": cfg.ingest, "ctx": ctx}):
        # data ingestion would refuse ends here, in one sentence, before any stage
        preflight_data(source, cfg.ingest, params.data)
    dataset = in_home(ingest, h)(source, cfg.ingest, ctx)
    corpora = [in_home(read_pretrain_corpus, h)(c, cfg.corpus, ctx) for c in params.pretrain_corpus]
    timings["ingest"] = time.perf_counter() - t
    base_future = None
    if with_baseline:
        base_future = fan.submit(in_home(baseline, h), dataset, cfg.baseline, ctx)
    t = time.perf_counter()
    vocab = None
    if params.bilm:  # reuse: no vocabulary, no pretraining; the classifiers get the biLM's vocab
        bilm_path, bilm_info = fetch_bilm(params.bilm, home_s)
        bilm_dir = str(bilm_path)
        for k, v in bilm_info.items():
            tracker.client.set_tag(parent, k, v)
        tracker.link_input_model(parent, bilm_info.get("bilm_model_id"))
        log.info("reusing biLM %s (%s)", bilm_info["bilm_source"], bilm_dir)
        # a few LM passes over the train split's text and the unlabeled corpora first; a
        # biLM without an LM softmax (published ELMo weights) only learns their words
        if cfg.adapt.epochs or not has_lm_head(bilm_dir):
            bilm_dir = in_home(adapt, h)(bilm_dir, dataset, cfg.adapt, ctx, corpora)
    else:
        vocab = in_home(build_vocab, h)(dataset, corpora, cfg.vocab, ctx)
        ids = in_home(encode_ids, h)(dataset, corpora, vocab, cfg.pretrain.seed, ctx)
        timings["vocab"] = time.perf_counter() - t
        t = time.perf_counter()
        shown = {"train": str(Path(dataset) / "train.parquet")}  # the run's dataset input
        bilm = dict(cfg.bilm.__dict__)
        bilm_dir = in_home(pretrain, h)(ids, vocab, bilm, cfg.pretrain, ctx, shown)
    timings["pretrain"] = time.perf_counter() - t
    t = time.perf_counter()
    feats = in_home(features, h)(bilm_dir, dataset, cfg.layers, ctx)
    timings["features"] = time.perf_counter() - t
    return Upstream(data_hash, dataset, vocab, bilm_dir, feats, base_future)


def log_upstream(tracker: Tracker, up: Upstream, params: RunParams, cfg: Resolved) -> dict:
    """The ingest (and pretraining / adaptation) child runs of the parent; returns the
    tags every child run shares, the split files, the ingest's row counts and what the
    ``max_len`` cap cut."""
    common = {"data_sha256": up.data_hash}
    splits = split_files(up.dataset)
    stats = read_json(Path(up.dataset) / "metrics.json")
    tracker.log_metrics(tracker.parent_id(), stats)
    # what max_len cut: documents and tokens per split, and the document lengths
    cut = {
        k: v
        for k, v in read_json(Path(up.feats) / "metrics.json").items()
        if k.startswith(("docs_cut_", "tokens_cut", "doc_tokens_"))
    }
    tracker.log_metrics(tracker.parent_id(), cut)
    stats = {**stats, **cut}
    tracker.log_stage("ingest", Path(up.dataset), common, splits)
    if not params.bilm:
        tracker.log_stage(
            "bilm-pretrain",
            Path(up.bilm_dir),
            {**common, "code_version": PRETRAIN.code_version()},
            {"train": splits["train"]},
        )
    elif cfg.adapt.epochs:
        tracker.log_stage(
            "bilm-adapt",
            Path(up.bilm_dir),
            {**common, "code_version": ADAPT.code_version()},
            {"train": splits["train"]},
        )
    return {"common": common, "splits": splits, "stats": stats}


@flow(name="elmo-news", task_runner=THREADS)
def elmo_news(params: RunParams) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary (metrics per model, stage folders, run ids)."""
    cfg = params.resolve()
    runner, address = params.runner()
    logged_params = {
        "profile": params.profile,
        "data": params.data,
        "pretrain_corpus": params.pretrain_corpus,
        "strategies": params.strategies,
        "bilm": params.bilm,
        "task_runner": runner,
    }
    with parent_run(params.home_dir(), params.profile, logged_params) as run:
        h, tracker, parent, timings, log = run.home, run.tracker, run.run_id, run.timings, run.log
        home_s = str(h.root)
        # the strategies, then the static-word-vector ablation that measures their gain
        trained = [*params.strategies, ABLATION]
        with fanout(runner, address, h.root, len(trained) + 1) as fan:
            up = upstream(params, cfg, h, tracker, fan, timings)
            dataset, bilm_dir, feats, vocab = up.dataset, up.bilm_dir, up.feats, up.vocab
            ctx = StageContext(home_s, params.device, tracker.target())
            with run.timed("classifiers"):
                clf_args = {s: (feats, bilm_dir, dataset, s, cfg.classifier, ctx) for s in trained}
                futures = {s: fan.submit(in_home(classify, h), *a) for s, a in clf_args.items()}
                clf_dirs = {s: f.result() for s, f in futures.items()}
            base_dir = up.base_future.result()

        logged = log_upstream(tracker, up, params, cfg)
        common, splits, stats = logged["common"], logged["splits"], logged["stats"]
        rows = []
        child_ids: dict[str, str] = {}
        for s, d in clf_dirs.items():
            tags = {**common, "strategy": s, "code_version": CLASSIFIER.code_version()}
            child_ids[s], cached = tracker.log_stage(f"classifier-{s}", Path(d), tags, splits)
            rows.append({"name": f"classifier-{s}", "dir": d, "cached": cached})
        _, cached = tracker.log_stage(
            "baseline-tfidf", Path(base_dir), {**common, "strategy": "tfidf"}, splits
        )
        rows.append({"name": "baseline-tfidf", "dir": base_dir, "cached": cached})
        for r in rows:
            r["metrics"] = read_json(Path(r["dir"]) / "metrics.json")
            tracker.log_metrics(
                parent,
                {
                    f"{r['name']}.test_accuracy": r["metrics"]["test_accuracy"],
                    f"{r['name']}.test_macro_f1": r["metrics"]["test_macro_f1"],
                },
            )
        gains = elmo_gains(rows)
        tracker.log_metrics(parent, gains)
        registry = None
        if params.register_model:
            best = max(
                params.strategies,
                key=lambda s: read_json(Path(clf_dirs[s]) / "metrics.json")["best_val_accuracy"],
            )
            with run.timed("register"):
                registry = register_best(
                    h.mlflow_uri(), parent, child_ids[best], clf_dirs[best], bilm_dir, dataset
                )
                registry["strategy"] = best
                tracker.link_model(parent, registry.pop("model_id", None))  # "Logged models"
            log.info("registry: %s (strategy %s)", registry["decision"], best)
        run.log_timings()
        note = small_bilm_note(params, bilm_dir)
        if note:
            log.warning(note)
        md = summary_markdown(rows, timings) + (f"\n\n**Note.** {note}" if note else "")
        chart = h.runs / f"{parent}-comparison.png"
        comparison_chart(rows, chart, f"elmo-news ({params.profile}): test split")
        tracker.log_artifact(parent, chart)
        return run.publish(
            f"elmo-news ({params.profile})",
            md,
            "elmo-news-summary",
            "Per-strategy test metrics, their gain over the static ablation, and the TF-IDF "
            "baseline",
            {
                "dataset": dataset,
                "vocab": vocab,
                "bilm": bilm_dir,
                "features": feats,
                "models": {r["name"]: {"dir": r["dir"], **r["metrics"]} for r in rows},
                "elmo_gains": gains,
                "timings": timings,
                "rows": stats,
                "registry": registry,
                "notes": [note] if note else [],
                "task_runner": runner,
                "dask_workers": fan.workers,  # address -> torch threads per task
            },
            h.runs / f"{parent}.json",
        )
