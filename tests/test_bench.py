"""The benches' helpers (their figures come from real runs; these pin that a learning-curve
subset is a stratified, seeded choice of whole documents, that the dataset builders keep their
splits, and that an lr-schedule setting is a typed classifier field)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from storage.layers import LayerStore

_spec = importlib.util.spec_from_file_location(
    "learning_curve", Path(__file__).resolve().parents[1] / "bench" / "learning_curve.py"
)
learning_curve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning_curve)


def _store(n_docs: int, rng: np.random.Generator) -> LayerStore:
    lens = rng.integers(1, 6, size=n_docs)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    n_tok = int(offsets[-1])
    return LayerStore(
        features=rng.standard_normal((n_tok, 2, 4)).astype(np.float16),
        offsets=offsets,
        labels=np.arange(n_docs) % 4,
        tokens=rng.integers(2, 50, size=n_tok).astype(np.int32),
        static=rng.standard_normal((9, 4)).astype(np.float16),  # layer 0 per distinct token
        static_rows=rng.integers(0, 9, size=n_tok).astype(np.int32),
    )


def test_subset_is_stratified_seeded_and_whole_documents():
    store = _store(400, np.random.default_rng(0))
    idx = learning_curve.stratified_subset(store.labels, 0.25, seed=3)
    assert np.array_equal(idx, learning_curve.stratified_subset(store.labels, 0.25, seed=3))
    assert not np.array_equal(idx, learning_curve.stratified_subset(store.labels, 0.25, seed=4))
    assert np.bincount(store.labels[idx]).tolist() == [25, 25, 25, 25]
    sub = learning_curve.subset_store(store, idx)
    assert len(sub) == len(idx)
    for j, i in enumerate(idx):
        rows = slice(store.offsets[i], store.offsets[i + 1])
        mine = slice(sub.offsets[j], sub.offsets[j + 1])
        assert np.array_equal(sub.rows(mine.start, mine.stop), store.rows(rows.start, rows.stop))
        assert np.array_equal(sub.tokens[mine], store.tokens[rows])
    assert np.array_equal(sub.labels, store.labels[idx])


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_subset_fraction_out_of_range_is_refused(fraction):
    with pytest.raises(ValueError, match=str(fraction)):
        learning_curve.stratified_subset(np.arange(8) % 2, fraction, seed=0)


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_r8_is_the_modapte_single_topic_split_and_pretraining_never_sees_test(tmp_path):
    import polars as pl

    from tests.conftest import REUTERS

    datasets = _bench("datasets")
    counts = datasets.build_reuters(REUTERS, tmp_path, "r8")
    # the literature's 5,485 / 2,189, less the articles without any text
    assert counts["classes"] == 8
    assert 5400 <= counts["train_docs"] <= 5485 and 2150 <= counts["test_docs"] <= 2189
    train = pl.read_csv(tmp_path / "train.csv")
    test = pl.read_csv(tmp_path / "test.csv")
    assert set(train["topic"]) == set(test["topic"]) == {
        "earn", "acq", "crude", "trade", "money-fx", "interest", "ship", "grain"
    }  # fmt: skip
    corpus = set(pl.read_parquet(tmp_path / "pretrain.parquet")["text"])
    titles, bodies = test["title"].fill_null(""), test["body"].fill_null("")
    test_texts = {f"{t}\n{b}".strip() for t, b in zip(titles, bodies, strict=True)}
    assert corpus and not corpus & test_texts  # no TEST article in the pretraining text
    some_train = f"{train['title'][0]}\n{train['body'][0]}".strip()
    assert some_train in corpus


def test_r52_keeps_every_single_topic_class_with_a_train_and_a_test_document(tmp_path):
    import polars as pl

    from tests.conftest import REUTERS

    counts = _bench("datasets").build_reuters(REUTERS, tmp_path, "r52")
    # the literature's 6,532 / 2,568, less the articles without any text
    assert counts["classes"] == 52
    assert 6400 <= counts["train_docs"] <= 6532 and 2500 <= counts["test_docs"] <= 2568
    train = pl.read_csv(tmp_path / "train.csv")["topic"].value_counts()
    test = pl.read_csv(tmp_path / "test.csv")["topic"]
    assert set(train["topic"]) == set(test) and train.height == 52
    assert train["count"].max() > 1000 * train["count"].min()  # earn beside one-document classes


def test_ag_subsets_are_stratified_and_keep_the_whole_test_split(tmp_path):
    import polars as pl

    from tests.conftest import AG

    out = tmp_path / "ag500"
    counts = _bench("datasets").build_ag_subset(AG, out, 500)
    full_rows = pl.read_csv(AG / "train.csv", has_header=False, infer_schema=False)
    rest = full_rows.height - 500
    assert counts == {"train_docs": 500, "test_docs": 7600, "classes": 4, "unlabeled_docs": rest}
    drawn = pl.read_csv(out / "train.csv", has_header=False, infer_schema=False)
    # the undrawn documents, text only: title and description of every row not drawn
    unlabeled = pl.read_parquet(tmp_path / "ag500-unlabeled.parquet")
    assert unlabeled.columns == ["text"] and unlabeled.height == rest

    def texts(df: pl.DataFrame) -> list[str]:
        return df.select(pl.concat_str([pl.nth(1), pl.nth(2)], separator=" "))[:, 0].to_list()

    assert sorted(unlabeled["text"].to_list() + texts(drawn)) == sorted(texts(full_rows))
    sub = pl.read_csv(out / "train.csv", has_header=False)[:, 0].value_counts()
    full = pl.read_csv(AG / "train.csv", has_header=False)[:, 0].value_counts()
    share = dict(zip(full[:, 0], full["count"] / full["count"].sum(), strict=True))
    for label, n in zip(sub[:, 0], sub["count"], strict=True):
        assert abs(n - 500 * share[label]) <= 1


def test_full_memory_sampler_records_a_peak_and_stops(tmp_path):
    import time

    full_memory = _bench("full_memory")
    sampler = full_memory.RssSampler(every=0.02)
    sampler.start()
    block = bytearray(64 << 20)  # 64 MiB held while it samples
    time.sleep(0.2)
    sampler.stop()
    assert not sampler.is_alive() and sampler.samples
    assert sampler.peak[0] >= len(block) and 0 < sampler.peak[1] < 5
    counts = full_memory.replicate(full_memory.LARGE, tmp_path / "x", 60_000)
    assert counts == {"train_rows": 60_000, "distinct_train_rows": 49_163, "test_rows": 7_600}


def test_lr_schedule_settings_are_typed_classifier_fields_and_bad_ones_raise():
    spec = importlib.util.spec_from_file_location(
        "lr_schedule", Path(__file__).resolve().parents[1] / "bench" / "lr_schedule.py"
    )
    lr_schedule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lr_schedule)
    from elmo_core.classifier_config import ClassifierConfig

    config = ClassifierConfig()
    got = lr_schedule.parse_setting("warmup_steps=100, lr_decay=0.5", config)
    assert got == {"warmup_steps": 100, "lr_decay": 0.5}
    assert isinstance(got["warmup_steps"], int) and lr_schedule.parse_setting("", config) == {}
    with pytest.raises(ValueError, match="'warmup=100'"):
        lr_schedule.parse_setting("warmup=100", config)
    with pytest.raises(ValueError, match="'precision=fp32': only numeric"):
        lr_schedule.parse_setting("precision=fp32", config)


def test_selection_replay_with_patience_on_two_scores_trains_on_while_either_improves():
    """Accuracy levels off while macro F1 still climbs: counting patience on both scores goes
    on past accuracy's patience stop, yet keeps the validation with the best accuracy."""
    selection = _bench("selection")
    acc = [0.80, 0.90, 0.90, 0.89, 0.90, 0.91, 0.90, 0.90, 0.90]
    f1 = [0.30, 0.40, 0.45, 0.50, 0.49, 0.48, 0.47, 0.46, 0.45]
    trace = [{"step": 100 * (i + 1), "small": {"accuracy": a, "macro_f1": f}}
             for i, (a, f) in enumerate(zip(acc, f1, strict=True))]  # fmt: skip
    key = selection.RULES["accuracy"]
    alone = selection.replay(trace, key, 2, 0)
    assert (alone["kept"], alone["stopped"]) == (1, 3)  # two validations without a gain
    also = selection.RULES[selection.PATIENCE_ON_TWO["accuracy, patience also on macro F1"][1]]
    both = selection.replay(trace, key, 2, 0, also)
    assert (both["kept"], both["stopped"], both["truncated"]) == (5, 7, False)


@pytest.mark.parametrize(
    ("select_on", "also_on"), [("accuracy", ""), ("loss", ""), ("accuracy", "macro_f1")]
)
def test_selection_replay_keeps_and_stops_where_the_training_loop_does(select_on, also_on):
    """The bench replays selection rules on recorded validations: on the loop's own record it
    must keep the step the loop kept and stop where the loop stopped."""
    import torch

    from elmo_core.classifier_config import ClassifierConfig
    from elmo_core.classifier_training import train_classifier
    from tests.test_training import _classifier, _noise_val, _separable_store

    selection = _bench("selection")
    model, _, cfg = _classifier("wsum")
    budget = {"eval_every": 1, "patience": 4, "min_steps": 4, "max_steps": 200}
    cfg = ClassifierConfig(
        **{**cfg.__dict__, **budget, "select_on": select_on, "patience_also_on": also_on}
    )
    hist: list[dict] = []
    res = train_classifier(
        model,
        _separable_store(200, 1),
        _noise_val(),
        cfg,
        lambda m, s: hist.append({"step": s, "small": m}),
        device=torch.device("cpu"),
    )
    assert res.stop_reason == "patience"
    trace = [{"step": h["step"], "small": {**h["small"], "accuracy": h["small"]["val_accuracy"],
              "loss": h["small"]["val_loss"], "macro_f1": h["small"]["val_macro_f1"]}}
             for h in hist]  # fmt: skip
    two = selection.PATIENCE_ON_TWO["accuracy, patience also on macro F1"]
    also = selection.RULES[two[1]] if also_on else None
    got = selection.replay(trace, selection.RULES[select_on], cfg.patience, cfg.min_steps, also)
    assert not got["truncated"]
    if select_on == "accuracy" and not also_on:  # a tie with the best keeps the earlier average
        assert any(t["small"]["accuracy"] == trace[got["kept"]]["small"]["accuracy"]
                   for t in trace[got["kept"] + 1 :])  # fmt: skip
    if also_on:  # the macro F1 gains kept it training past accuracy's own patience stop
        alone = selection.replay(trace, selection.RULES[select_on], cfg.patience, cfg.min_steps)
        assert alone["stopped"] < got["stopped"]
    assert trace[got["kept"]]["step"] == res.best_step
    assert trace[got["stopped"]]["step"] == res.steps
