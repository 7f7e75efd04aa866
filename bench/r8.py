"""R8 (Reuters-21578, ModApte): the labelled long-document benchmark, through the generic CSV
ingestion, the biLM pretrained on Reuters text without the TEST documents.

R8: ModApte split (``lewissplit`` TRAIN / TEST), documents with exactly one topic among the 10
most frequent topics, the 8 most frequent of those classes (earn, acq, crude, trade, money-fx,
interest, ship, grain); train 5,485 / test 2,189 in the literature. The pretraining text is the
title + body of every article whose split is not TEST (TRAIN and NOT-USED), less the verbatim
copies of TEST articles that Reuters holds, so the biLM never reads a test document. Then
``elmo-news run`` on it (every strategy, the static ablation, the TF-IDF baseline), in this
process; the report has the summary, how many documents ``max_len`` cut, the stored layers'
size on disk, wall time and peak RSS.

    .venv/bin/python bench/r8.py --home /tmp/r8-home [--profile sample] [--set classifier.x=...]

With ``--bilm URI`` the run reuses a biLM pretrained once (no vocabulary or pretraining task;
the sample profile adapts it to the R8 train split). That biLM must not have read a TEST
article: pretrain it on ``<home>/r8/pretrain.parquet`` (written by ``--build-only``) plus
unrelated text, e.g.

    .venv/bin/python bench/r8.py --home H --build-only
    elmo-news pretrain --profile news --home H --corpus ../shared/data/news_corpus/news_corpus.parquet \
        --corpus H/r8/pretrain.parquet
    .venv/bin/python bench/r8.py --home H --bilm models:/elmo-news-bilm/1

The classifier trains up to 14 epochs with patience 2 here (``R8_SETS``; a ``--set`` of the
same field wins): R8's 4.9k training documents make 77 steps an epoch, against the 227 of
``ag_news_sample`` the profile's 6 epochs / patience 1 were sized for, and every model was still
gaining at its 6th epoch (measured: README "Long documents: R8").

Last line: ``r8_min_strategy_minus_tfidf=<points>``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from flows.params import RunParams

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402

REUTERS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "reuters21578" / "reuters21578.csv"
)
RESULTS = Path(__file__).parent / "results" / "r8.json"


def build_r8(reuters: Path, out: Path) -> dict[str, int]:
    """``out``/train.csv, test.csv (title, body, topic) and pretrain.parquet (text, non-TEST
    articles); returns the row counts."""
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
    top10 = (
        modapte.explode("t").drop_nulls("t").group_by("t").len().sort(["len", "t"], descending=True)
    )["t"].to_list()[:10]
    single = modapte.filter(pl.col("t").list.len() == 1).with_columns(
        pl.col("t").list.first().alias("topic")
    )
    single = single.filter(
        pl.col("topic").is_in(top10) & ((pl.col("title") + pl.col("body")).str.strip_chars() != "")
    )
    classes = (single.group_by("topic").len().sort(["len", "topic"], descending=True))[
        "topic"
    ].to_list()[:8]
    r8 = single.filter(pl.col("topic").is_in(classes))
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        part = r8.filter(pl.col("lewissplit") == split.upper()).select("title", "body", "topic")
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


# R8's classifier budget (see the docstring); before the user's --set, which wins
R8_SETS = ["classifier.epochs=14", "classifier.patience=2"]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", required=True, help="the run's home (stages, MLflow store)")
    ap.add_argument("--profile", default="sample")
    ap.add_argument("--reuters", default=str(REUTERS))
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        help=f"section.field=value (after this benchmark's own: {' '.join(R8_SETS)})",
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--bilm",
        default="",
        help="reuse this pretrained biLM (models:/elmo-news-bilm/N in the home's registry); it "
        "must not have read Reuters TEST articles (pretrain it on <home>/r8/pretrain.parquet)",
    )
    ap.add_argument(
        "--build-only", action="store_true", help="write <home>/r8 (train, test, pretrain) and stop"
    )
    args = ap.parse_args()

    from bench.machine import machine
    from elmo_core.mix import MIX_STRATEGIES
    from flows.cli_args import parse_overrides
    from flows.server import prefect_defaults

    prefect_defaults()  # as the CLI: no telemetry calls from the embedded server (offline)
    from flows.pipeline import elmo_news

    home = Path(args.home)
    data = home / "r8"
    counts = build_r8(Path(args.reuters), data)
    print(json.dumps(counts), flush=True)
    if args.build_only:
        return
    sets = [*R8_SETS, *args.sets]
    t0 = time.perf_counter()
    summary = elmo_news(
        params=RunParams(
            profile=args.profile,
            data=str(data),
            pretrain_corpus=[] if args.bilm else [str(data / "pretrain.parquet")],
            bilm=args.bilm,
            home=str(home),
            text_columns=["title", "body"],
            label_column="topic",
            overrides=parse_overrides(sets),
            register_model=False,
        )
    )
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    models = {k: v["test_accuracy"] for k, v in summary["models"].items()}
    tfidf = models["baseline-tfidf"]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "profile": args.profile,
        "bilm": args.bilm or "in-run (R8 pretrain.parquet)",
        "overrides": sets,
        "counts": counts,
        "test_accuracy": models,
        "test_macro_f1": {k: v["test_macro_f1"] for k, v in summary["models"].items()},
        "elmo_gains": summary["elmo_gains"],
        "truncation": {
            k: v
            for k, v in summary["rows"].items()
            if k.startswith(("docs_cut", "tokens_cut", "doc_tokens"))
        },
        "layers_disk_bytes": _dir_bytes(Path(summary["features"])),
        "timings_s": summary["timings"],
        "wall_s": wall,
        "peak_rss_bytes": peak,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    gap = min(100 * (models[f"classifier-{s}"] - tfidf) for s in MIX_STRATEGIES)
    print(f"r8_min_strategy_minus_tfidf={gap:.2f}")


if __name__ == "__main__":
    main()
