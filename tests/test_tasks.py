"""Task bodies via .fn(): paths in, paths out, keys from content/config/code."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from elmo_core.vocab_config import VocabConfig
from flows.params import RunParams
from storage.datasets import DATASET_SCHEMA
from storage.paths import Home, safe_name, write_json
from tasks.baseline import BaselineConfig, baseline
from tasks.ingest import IngestConfig, ingest
from tasks.stage import StageContext
from tasks.vocab import build_vocab, load_vocab


@pytest.fixture(scope="module")
def dataset(ag_slice, tmp_path_factory) -> tuple[str, str]:
    home = str(tmp_path_factory.mktemp("home"))
    return ingest.fn(str(ag_slice), IngestConfig(val_fraction=0.2), StageContext(home)), home


def test_ingest_writes_schema_splits_and_accounting(dataset, ag_slice):
    d, _ = dataset
    stats = __import__("json").loads((Path(d) / "metrics.json").read_text())
    for split in ("train", "test"):
        assert (
            stats[f"rows_in_{split}"]
            == stats[f"rows_accepted_{split}"] + stats[f"rows_quarantined_{split}"]
        )
    assert stats["rows_in_train"] == 480 and stats["rows_in_test"] == 160
    assert stats["rows_train"] + stats["rows_val"] == stats["rows_accepted_train"]
    for split in ("train", "val", "test"):
        assert pq.read_schema(Path(d) / f"{split}.parquet").equals(
            DATASET_SCHEMA, check_metadata=False
        )
    val = pq.read_table(Path(d) / "val.parquet").to_pydict()
    assert set(val["label"]) == {0, 1, 2, 3}  # stratified
    assert set(val["split"]) == {"val"}


def test_ingest_is_keyed_by_content(dataset, ag_slice, tmp_path):
    d, home = dataset
    assert ingest.fn(str(ag_slice), IngestConfig(val_fraction=0.2), StageContext(home)) == d
    copy = tmp_path / "copy"
    shutil.copytree(ag_slice, copy)
    assert (
        ingest.fn(str(copy), IngestConfig(val_fraction=0.2), StageContext(home)) == d
    )  # same bytes, same key
    with open(copy / "train.csv", "a") as f:
        f.write('"1","New row","Added later."\n')
    assert ingest.fn(str(copy), IngestConfig(val_fraction=0.2), StageContext(home)) != d


def test_vocab_and_baseline_tasks(dataset):
    d, home = dataset
    v_dir = build_vocab.fn(d, [], VocabConfig(min_count=1, max_size=2000), StageContext(home))
    vocab = load_vocab(v_dir)
    assert len(vocab) <= 2000 and vocab.tokens[:2] == ("<pad>", "<unk>")
    b_dir = baseline.fn(d, BaselineConfig(max_iter=200), StageContext(home))
    metrics = __import__("json").loads((Path(b_dir) / "metrics.json").read_text())
    assert 0.3 < metrics["test_accuracy"] <= 1.0
    assert (Path(b_dir) / "confusion_matrix.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", "", "x" * 200, "a\x00b"])
def test_names_cannot_escape_the_home(name, tmp_path):
    with pytest.raises(ValueError, match="unsafe name"):
        safe_name(name)
    with pytest.raises(ValueError):
        Home(tmp_path).stage_dir("ingest", name)


def test_latest_run_is_the_newest_summary(tmp_path):
    home = Home(tmp_path)
    with pytest.raises(ValueError, match="no finished run"):
        home.latest_run()
    for i, name in enumerate(["b", "a"]):  # "a" written last: newest by time, not by name
        write_json(home.runs / f"{name}.json", {"run": name})
        os.utime(home.runs / f"{name}.json", (1_000_000 + i, 1_000_000 + i))
    assert home.latest_run() == {"run": "a"}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"profile": "huge"}, "profile"),
        ({"strategies": ["max"]}, "strategies"),
        ({"overrides": {"classifier": {"max_steps": 0}}}, "max_steps"),
        ({"overrides": {"classifier": {"min_steps": 900, "max_steps": 800}}}, "min_steps"),
        ({"overrides": {"classifier": {"epochz": 3}}}, "epochz"),
        ({"overrides": {"bilm": {"hidden_dim": -1}}}, "hidden_dim"),
        ({"overrides": {"optimizer": {}}}, "optimizer"),
        ({"strategies": []}, "at least one"),
        # every profile: the task token embedding is initialised from the biLM's, so it cannot
        # be wider (found before pretraining, not after it)
        *(
            ({"profile": p, "overrides": {"classifier": {"token_embedding_dim": 513}}}, "513")
            for p in ("smoke", "sample", "full", "seed", "news", "elmo-original")
        ),
        ({"overrides": {"adapt": {"epochs": -1}}}, "adapt"),
        # unlabeled text beside a reused biLM is adaptation text: no passes would drop it
        ({"bilm": "models:/b/1", "pretrain_corpus": ["u.txt"]}, "adapt.epochs must be > 0"),
        ({"overrides": {"pretrain": {"world_size": 3}}}, "world_size"),
        ({"overrides": {"bilm": {"projection_dim": 300, "hidden_dim": 256}}}, "projection_dim"),
    ],
)
def test_bad_run_parameters_fail_before_a_run(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        RunParams(**kwargs)


def test_a_reused_biLM_with_unlabeled_text_and_adaptation_passes_is_accepted():
    p = RunParams(
        profile="sample", bilm="models:/b/1", pretrain_corpus=["u.txt"]
    )  # the sample profile adapts until a pass gains less than adapt.min_gain
    adapt = p.resolve().adapt
    assert adapt.epochs > 1 and adapt.min_gain > 0 and p.pretrain_corpus == ["u.txt"]


def test_the_summary_says_when_the_in_run_biLM_read_too_little_text(tmp_path):
    from flows.pipeline import SMALL_BILM_CORPUS_TOKENS, small_bilm_note

    bilm_dir = tmp_path / "bilm"
    bilm_dir.mkdir()
    assert small_bilm_note(RunParams(), str(bilm_dir)) == ""  # no metrics: nothing to say
    write_json(bilm_dir / "metrics.json", {"corpus_tokens": SMALL_BILM_CORPUS_TOKENS - 1})
    note = small_bilm_note(RunParams(), str(bilm_dir))
    assert f"{SMALL_BILM_CORPUS_TOKENS - 1:,} tokens" in note and "--bilm models:/" in note
    # a reused biLM was not pretrained on the run's text, whatever its metrics say
    assert small_bilm_note(RunParams(bilm="models:/b/1"), str(bilm_dir)) == ""
    write_json(bilm_dir / "metrics.json", {"corpus_tokens": SMALL_BILM_CORPUS_TOKENS})
    assert small_bilm_note(RunParams(), str(bilm_dir)) == ""


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"corpus": []}, "corpus"),
        ({"corpus": ["x"], "overrides": {"corpus": {"holdout_fraction": 0}}}, "holdout_fraction"),
        ({"corpus": ["x"], "overrides": {"bilm": {"nope": 1}}}, "unknown bilm settings"),
        ({"corpus": ["x"], "profile": "tiny"}, "profile"),
    ],
)
def test_bad_pretrain_parameters_fail_before_a_run(kwargs, needle):
    from flows.params import PretrainParams

    with pytest.raises(ValueError, match=needle):
        PretrainParams(**kwargs)


def test_elmo_original_profile_has_the_published_shapes():
    from flows.params import PretrainParams

    r = PretrainParams(corpus=["x"], profile="elmo-original").resolve()
    assert (r.bilm.hidden_dim, r.bilm.projection_dim, r.bilm.num_layers) == (4096, 512, 2)
    assert (r.bilm.cell_clip, r.bilm.proj_clip, r.bilm.num_samples) == (3.0, 3.0, 8192)
    assert r.bilm.token_encoder == "char" and r.bilm.char_filters == (
        32,
        32,
        64,
        128,
        256,
        512,
        1024,
    )


def test_profiles_resolve_to_stage_configs():
    r = RunParams(profile="seed").resolve()
    assert r.bilm.embedding_dim == 512 and r.classifier.hidden_dim == 256
    assert r.classifier.mlp_hidden == (128, 64) and r.classifier.batch_size == 32
    assert r.classifier.lr == 1e-3 and r.classifier.num_layers == 2
