"""TF-IDF (word 1-2 grams) + logistic regression on the same splits: the bar ELMo must clear."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from storage.datasets import read_dataset
from storage.paths import (
    mark_complete,
    read_json,
    split_files,
    write_json,
)
from storage.tracking import stage_run
from tasks.common import logger, runtime_tags, task_threads
from tasks.evaluate import evaluate
from tasks.stage import StageContext, stage


@dataclass(frozen=True)
class BaselineConfig:
    ngram_max: int = 2  # word n-grams 1..ngram_max
    min_df: int = 2  # drop n-grams in fewer documents
    sublinear_tf: bool = True  # 1 + log(tf)
    C: float = 10.0  # inverse regularisation of the logistic regression
    max_iter: int = 1000


BASELINE = stage("baseline", __name__, inputs=["dataset"], config=["config"])


def fit_baseline(
    texts: list[str], labels: np.ndarray, config: BaselineConfig
) -> tuple[TfidfVectorizer, LogisticRegression]:
    """The fitted vectorizer and logistic regression (the stage and bench/learning_curve.py)."""
    vec = TfidfVectorizer(
        ngram_range=(1, config.ngram_max),
        min_df=config.min_df,
        sublinear_tf=config.sublinear_tf,
        lowercase=True,
    )
    clf = LogisticRegression(C=config.C, max_iter=config.max_iter)
    clf.fit(vec.fit_transform(texts), labels)
    return vec, clf


@BASELINE.task(name="baseline-tfidf")
def baseline(dataset: str, config: BaselineConfig, ctx: StageContext) -> str:
    """TF-IDF + logistic regression on the same splits; ``ctx.tracking`` opens its MLflow
    child run when it starts."""
    return BASELINE.build(locals(), lambda d: _build_tracked(d, dataset, config, ctx.tracking))


def _build_tracked(
    out: Path, dataset: str, config: BaselineConfig, tracking: dict[str, str] | None
) -> None:
    from threadpoolctl import threadpool_limits

    threads, why = task_threads()  # BLAS threads: the task's share of the cores, as torch's
    logger().info("BLAS threads: %d (%s)", threads, why)
    tags = {"strategy": "tfidf", **runtime_tags(threads)}
    with stage_run(tracking, "baseline-tfidf", tags) as run, threadpool_limits(threads):
        _build(out, dataset, config)
        run.complete(out, split_files(dataset))


def _build(out: Path, dataset: str, config: BaselineConfig) -> None:
    """Fit, evaluate and write the stage folder (complete, with its manifest)."""
    t0 = time.perf_counter()
    train, val, test = (
        read_dataset(Path(dataset) / f"{s}.parquet") for s in ("train", "val", "test")
    )
    vec, clf = fit_baseline(train["text"].to_list(), train["label"].to_numpy(), config)
    val_acc = float(
        (clf.predict(vec.transform(val["text"].to_list())) == val["label"].to_numpy()).mean()
    )
    pred = clf.predict(vec.transform(test["text"].to_list()))
    metrics = evaluate(
        test["label"].to_numpy(),
        pred,
        read_json(Path(dataset) / "labels.json"),
        out,
        "TF-IDF + LR",
    )
    metrics.update(
        {
            "best_val_accuracy": val_acc,
            "wall_s": time.perf_counter() - t0,
            "n_features": len(vec.vocabulary_),
        }
    )
    write_json(out / "metrics.json", metrics)
    write_json(out / "config.json", asdict(config))
    mark_complete(out)
