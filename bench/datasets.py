"""Datasets other than the one the defaults grew on, on the default profile with no classifier
``--set``: R8 and R52 (Reuters-21578, ModApte, long documents, R52 with 52 heavily imbalanced
classes) and AG News with only 500 or 2,000 labelled documents. Each run is ``elmo-news run``
in this process (every strategy, the static ablation, the TF-IDF baseline), with the biLM
pretrained in the run or reused (``--bilm``), and its row lands in one report,
``bench/results/datasets.json`` (dataset, documents, classes, mean length, each model's test
accuracy and macro F1, why each classifier stopped, time per epoch, wall time).

    .venv/bin/python bench/datasets.py --dataset r8 --home /tmp/h [--bilm models:/elmo-news-bilm/1]

- ``r8`` / ``r52``: ModApte (``lewissplit`` TRAIN / TEST) documents with exactly one topic; R8
  keeps the 8 most frequent of the 10 most frequent topics (5,485 / 2,189 in the literature),
  R52 every topic with a train and a test document (6,532 / 2,568). The in-run biLM reads the
  title + body of every non-TEST article, less verbatim copies of TEST articles, so it never
  reads a test document.
- ``ag500`` / ``ag2000``: that many train documents drawn stratified (seed 0) from
  ``ag_news_sample``'s train split; its whole test split. The in-run biLM reads the train
  split alone: the small-data case. With ``--unlabeled``, the rest of that train split's
  documents, text only (no label), go in as ``--pretrain-corpus``: a few labels beside much
  unlabeled text of the task, which the in-run biLM pretrains on and a reused biLM adapts on.

A reused biLM must not have read a test document: ``elmo-news pretrain --profile news --corpus
../shared/data/news_corpus/news_corpus.parquet`` (no AG News and no Reuters-21578 text) once
into the same home, then ``--bilm models:/elmo-news-bilm/1``.

Last line: ``<dataset>_min_strategy_minus_tfidf=<points>``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REUTERS = SHARED / "reuters21578" / "reuters21578.csv"
AG_SAMPLE = SHARED / "ag_news_sample"
RESULTS = Path(__file__).parent / "results" / "datasets.json"
DATASETS = {"r8": 8, "r52": 52, "ag500": 500, "ag2000": 2000}


def build_reuters(reuters: Path, out: Path, name: str) -> dict[str, int]:
    """``out``/train.csv, test.csv (title, body, topic) of R8 or R52, and pretrain.parquet
    (text of the non-TEST articles); returns the row counts."""
    df = pl.read_csv(reuters, infer_schema=False).with_columns(
        pl.col("title").fill_null(""),
        pl.col("body").fill_null(""),
        pl.col("topics")
        .fill_null("")
        .str.split(";")
        .list.eval(pl.element().filter(pl.element() != ""))
        .alias("t"),
    )
    modapte = df.filter(pl.col("lewissplit").is_in(["TRAIN", "TEST"]))
    single = modapte.filter(pl.col("t").list.len() == 1).with_columns(
        pl.col("t").list.first().alias("topic")
    )
    single = single.filter((pl.col("title") + pl.col("body")).str.strip_chars() != "")
    if name == "r8":
        top10 = (
            modapte.explode("t")
            .drop_nulls("t")
            .group_by("t")
            .len()
            .sort(["len", "t"], descending=True)
        )["t"].to_list()[:10]
        single = single.filter(pl.col("topic").is_in(top10))
        classes = (single.group_by("topic").len().sort(["len", "topic"], descending=True))[
            "topic"
        ].to_list()[:8]
    else:  # r52: every single-topic class with a train and a test document
        per = single.group_by("topic").agg(
            (pl.col("lewissplit") == "TRAIN").sum().alias("train"),
            (pl.col("lewissplit") == "TEST").sum().alias("test"),
        )
        classes = per.filter((pl.col("train") > 0) & (pl.col("test") > 0))["topic"].to_list()
    data = single.filter(pl.col("topic").is_in(classes))
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        part = data.filter(pl.col("lewissplit") == split.upper()).select("title", "body", "topic")
        part.write_csv(out / f"{split}.csv", quote_style="always")
        counts[f"{split}_docs"] = part.height
    text = (pl.col("title") + "\n" + pl.col("body")).str.strip_chars().alias("text")
    test_text = df.filter(pl.col("lewissplit") == "TEST").select(text)
    corpus = df.filter(pl.col("lewissplit") != "TEST").select(text)
    # Reuters repeats some articles verbatim across splits: those copies of TEST text go too
    corpus = corpus.filter(pl.col("text") != "").join(test_text, on="text", how="anti")
    corpus.write_parquet(out / "pretrain.parquet")
    counts["pretrain_docs"] = corpus.height
    counts["classes"] = len(classes)
    return counts


def build_ag_subset(ag: Path, out: Path, n: int, seed: int = 0) -> dict[str, int]:
    """``out``/train.csv: ``n`` documents of ``ag``'s train.csv, stratified by class (each
    class's share kept, seeded); test.csv: a link to its whole test split; and beside
    ``out``, ``<out name>-unlabeled.parquet``: the text (title and description) of the train
    documents not drawn, without labels (outside ``out``, so ingestion never reads it)."""
    train = pl.read_csv(ag / "train.csv", has_header=False, infer_schema=False)
    labels = train[:, 0].to_numpy()
    idx, rest = train_test_split(
        np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed
    )
    idx = np.sort(idx)
    out.mkdir(parents=True, exist_ok=True)
    train[idx].write_csv(out / "train.csv", include_header=False, quote_style="always")
    text = train.select(pl.concat_str([pl.nth(1), pl.nth(2)], separator=" ").alias("text"))
    text[np.sort(rest)].write_parquet(out.parent / f"{out.name}-unlabeled.parquet")
    test = out / "test.csv"
    test.unlink(missing_ok=True)
    test.symlink_to((ag / "test.csv").resolve())
    n_test = pl.read_csv(test, has_header=False, infer_schema=False).height
    return {
        "train_docs": len(idx),
        "test_docs": n_test,
        "classes": len(np.unique(labels)),
        "unlabeled_docs": len(rest),
    }


def build(
    name: str, home: Path, unlabeled: bool = False
) -> tuple[Path, dict[str, int], dict[str, Any]]:
    """The dataset's folder under ``home``, its counts, and how ``elmo_news`` reads it (with
    ``unlabeled``, an AG subset's undrawn train documents as unlabeled text)."""
    data = home / name
    if name in ("r8", "r52"):
        if unlabeled:
            raise SystemExit("--unlabeled: only for the AG News subsets")
        counts = build_reuters(REUTERS, data, name)
        read = {"text_columns": ["title", "body"], "label_column": "topic"}
        return data, counts, {**read, "pretrain_corpus": [str(data / "pretrain.parquet")]}
    counts = build_ag_subset(AG_SAMPLE, data, DATASETS[name])
    corpus = [str(home / f"{name}-unlabeled.parquet")] if unlabeled else []
    if not unlabeled:
        counts.pop("unlabeled_docs")
    return data, counts, {"pretrain_corpus": corpus}


def _per_epoch_s(metrics: dict[str, Any]) -> float | None:
    if not metrics.get("epochs_run"):
        return None
    return metrics["train_s"] / metrics["epochs_run"]


def row(name: str, bilm: str, counts: dict[str, int], summary: dict[str, Any], wall: float):
    """The report's row of one run: what the docs' table shows."""
    models = summary["models"]
    acc = {k.removeprefix("classifier-"): v["test_accuracy"] for k, v in models.items()}
    f1 = {k.removeprefix("classifier-"): v["test_macro_f1"] for k, v in models.items()}
    tfidf = acc.pop("baseline-tfidf")
    clfs = {k: v for k, v in models.items() if k.startswith("classifier-")}
    rows = summary["rows"]
    out: dict[str, Any] = {
        "dataset": name,
        "biLM": bilm or "in-run",
        "train docs": counts["train_docs"],
        "test docs": counts["test_docs"],
        "classes": counts["classes"],
        "unlabeled docs": counts.get("unlabeled_docs", 0),
        "mean tokens": rows.get("doc_tokens_mean_train"),
    }
    out.update({f"acc {k}": v for k, v in acc.items()})
    out["acc tfidf"] = tfidf
    strategies = [k for k in acc if k != "static"]
    out["min strategy - tfidf (pt)"] = 100 * min(acc[s] - tfidf for s in strategies)
    out.update({f"F1 {k}": v for k, v in f1.items() if k != "baseline-tfidf"})
    out["F1 tfidf"] = f1["baseline-tfidf"]
    out["steps (best)"] = ", ".join(
        f"{k.removeprefix('classifier-')} {m['steps']} ({m['best_step']})" for k, m in clfs.items()
    )
    out["stopped"] = ", ".join(sorted({m["stop_reason"] for m in clfs.values()}))
    per_epoch = [_per_epoch_s(m) for m in clfs.values()]
    out["s per classifier epoch"] = float(np.mean([p for p in per_epoch if p is not None]))
    adapted = Path(summary["bilm"]) / "metrics.json"
    m = json.loads(adapted.read_text()) if bilm and adapted.exists() else {}
    if "passes" in m:  # the reused biLM's LM adaptation: how far it went, why it stopped
        out["adapt passes"] = m.get("passes")
        out["adapt stopped"] = m.get("stop_reason")
        before = (m["val_perplexity_forward_before"] * m["val_perplexity_backward_before"]) ** 0.5
        out["adapt val ppl before, after"] = [before, m["val_perplexity"]]
    out["wall s"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ap.add_argument("--home", required=True, help="the run's home (stages, MLflow store)")
    ap.add_argument("--profile", default="sample")
    ap.add_argument("--bilm", default="", help="reuse this pretrained biLM (see the docstring)")
    ap.add_argument(
        "--unlabeled",
        action="store_true",
        help="AG subsets: the undrawn train documents, text only, as --pretrain-corpus",
    )
    ap.add_argument("--build-only", action="store_true", help="write the data and stop")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    from bench.machine import machine
    from flows.params import RunParams
    from flows.server import prefect_defaults

    prefect_defaults()  # as the CLI: no telemetry calls from the embedded server (offline)
    from flows.pipeline import elmo_news

    home = Path(args.home)
    data, counts, read = build(args.dataset, home, args.unlabeled)
    print(json.dumps(counts), flush=True)
    if args.build_only:
        return
    if args.bilm and not args.unlabeled:  # Reuters' non-test text is the in-run biLM's
        read["pretrain_corpus"] = []
    t0 = time.perf_counter()
    summary = elmo_news(
        params=RunParams(
            profile=args.profile,
            data=str(data),
            bilm=args.bilm,
            home=str(home),
            register_model=False,
            **read,
        )
    )
    wall = time.perf_counter() - t0
    new = row(args.dataset, args.bilm, counts, summary, wall)
    new["peak RSS GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    new["machine"] = f"{machine()['cpu']} ({machine()['bf16']}, {machine()['cpus']} cpus)"
    command = " ".join([Path(sys.executable).name, *sys.argv])
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {"command": [], "runs": []}

    def key(r: dict[str, Any]) -> tuple[str, str, int]:
        return r["dataset"], r["biLM"], r.get("unlabeled docs", 0)

    report["runs"] = [r for r in report["runs"] if key(r) != key(new)] + [new]
    report["runs"].sort(key=lambda r: (list(DATASETS).index(r["dataset"]), *key(r)[1:]))
    report["command"] = sorted({*report["command"], command})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(new, indent=2))
    print(f"{args.dataset}_min_strategy_minus_tfidf={new['min strategy - tfidf (pt)']:.2f}")


if __name__ == "__main__":
    main()
