"""Pretrain once, reuse everywhere: the ``elmo-news-pretrain`` flow on unlabeled text alone
registers ``elmo-news-bilm``; ``elmo-news`` with ``bilm=`` (registry URI, alias or folder) runs
no vocabulary or pretraining task, uses the biLM's vocabulary and links the version."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from elmo_core.bilm_checkpoint import load_bilm
from elmo_core.classifier_checkpoint import load_classifier
from flows.params import PretrainParams
from tasks.stage import StageContext
from tests.conftest import AG, REUTERS, smoke_params
from tests.test_flow_e2e import _task_states

pytestmark = pytest.mark.e2e
NEWS = REUTERS.parents[1] / "news_corpus" / "news_corpus.parquet"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Real news text as a sharded corpus: two Parquet shards and a gzip text shard."""
    d = tmp_path_factory.mktemp("corpus")
    texts = next(pq.ParquetFile(NEWS).iter_batches(batch_size=240, columns=["text"])).column(0)
    texts = texts.to_pylist()
    pq.write_table(pa.table({"text": texts[:80]}), d / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": texts[80:160]}), d / "train-00001-of-00002.parquet")
    with gzip.open(d / "news.en-00000-of-00001.gz", "wt") as f:
        f.write("\n".join(t.replace("\n", " ") for t in texts[160:]) + "\n")
    return d


def _smoke_pretrain(corpus_dir: Path, home: Path) -> PretrainParams:
    return PretrainParams(
        corpus=[str(corpus_dir)],
        profile="smoke",
        home=str(home),
        overrides={"corpus": {"holdout_fraction": 0.05}},
    )


@pytest.fixture(scope="module")
def pretrained(harness, corpus_dir, tmp_path_factory):
    from flows.pretrain import elmo_news_pretrain

    home = tmp_path_factory.mktemp("pretrain_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    state = elmo_news_pretrain(params=_smoke_pretrain(corpus_dir, home), return_state=True)
    yield home, state.result(), _task_states(state.state_details.flow_run_id)
    mp.undo()


def test_pretrain_flow_registers_a_biLM_from_unlabeled_text(pretrained, corpus_dir):
    from mlflow.tracking import MlflowClient

    home, summary, states = pretrained
    assert set(states) >= {"read-corpus", "build-vocab", "encode-ids", "pretrain-bilm"}
    assert not {"ingest", "extract-layers"} & set(states)  # no labelled data anywhere
    assert summary["registry"]["uri"] == "models:/elmo-news-bilm/1"
    m = summary["metrics"]
    assert m["corpus_docs"] > 200 and m["heldout_tokens"] > 100
    assert 1 < m["val_perplexity_forward"] < 1e5 and 1 < m["val_perplexity_backward"] < 1e5
    client = MlflowClient()
    v = client.get_model_version("elmo-news-bilm", "1")
    assert v.tags["bilm_key"] == Path(summary["bilm"]).name
    assert v.tags["corpus_sha256"] and int(v.tags["corpus_tokens"]) == m["corpus_tokens"]
    assert float(v.tags["val_perplexity_forward"]) == pytest.approx(
        m["val_perplexity_forward"], rel=1e-3
    )
    child = client.get_run(v.run_id)  # the biLM's own run: curves and per-direction figures
    assert child.data.tags["stage"] == "bilm-pretrain"
    steps = [h.step for h in client.get_metric_history(v.run_id, "val_perplexity_forward")]
    assert 1 in steps  # streamed at the end of epoch 1 (and the final figure at step 0)
    assert client.get_metric_history(v.run_id, "train_loss")
    # the registered pyfunc embeds text with the biLM
    import mlflow.pyfunc
    import pandas as pd

    emb = mlflow.pyfunc.load_model("models:/elmo-news-bilm/1").predict(
        pd.DataFrame({"text": ["Stocks fell sharply on Monday.", "The team won the cup."]})
    )
    assert list(emb["n_tokens"]) == [6, 6] and len(emb["embedding"][0]) == 48  # 2H, H = 24


def test_a_second_pretrain_is_served_from_cache_and_keeps_its_version(pretrained, corpus_dir):
    from flows.pretrain import elmo_news_pretrain

    home, first, _ = pretrained
    state = elmo_news_pretrain(params=_smoke_pretrain(corpus_dir, home), return_state=True)
    again = state.result()
    states = _task_states(state.state_details.flow_run_id)
    assert again["bilm"] == first["bilm"] and again["registry"]["version"] == 1
    assert all(s == ["Cached"] for k, s in states.items() if k != "read-corpus"), states


def test_run_with_a_registered_biLM_skips_pretraining(pretrained, ag_slice, tmp_path):
    from mlflow.tracking import MlflowClient

    home, pre, _ = pretrained
    summary, states = _reuse(ag_slice, home, "models:/elmo-news-bilm/1")
    assert "pretrain-bilm" not in states and "build-vocab" not in states
    assert states["fetch-bilm"] == ["Completed"]
    assert Path(summary["bilm"]).name == Path(pre["bilm"]).name  # same key: shared caches
    # the classifier's vocabulary and token embedding are the biLM's
    model, vocab = load_bilm(Path(summary["bilm"]) / "bilm.pt")
    clf, _ = load_classifier(Path(summary["models"]["classifier-wsum"]["dir"]) / "model.pt")
    assert clf.embedding.num_embeddings == len(vocab)
    assert summary["models"]["classifier-wsum"]["test_accuracy"] > 0.3
    parent = MlflowClient().get_run(summary["parent_run_id"])
    assert parent.data.tags["bilm_source"] == "models:/elmo-news-bilm/1"
    model_ids = [m.model_id for m in parent.inputs.model_inputs]
    assert pre["registry"]["model_id"] in model_ids
    # the stage folder itself as the reference: the same keys, every stage from cache
    again, states = _reuse(ag_slice, home, summary["bilm"])
    assert states["train-classifier"] == ["Cached"] * 2 and states["extract-layers"] == ["Cached"]
    assert again["models"]["classifier-wsum"]["dir"] == summary["models"]["classifier-wsum"]["dir"]
    # a copy under a name of the user's: keyed by the checkpoint's content, same results
    mine = tmp_path / "my-bilm"
    shutil.copytree(summary["bilm"], mine)
    copy, states = _reuse(ag_slice, home, str(mine))
    assert Path(copy["bilm"]).name.startswith("dir-") and states["extract-layers"] == ["Completed"]
    assert torch.equal(
        model.embedding.weight, load_bilm(Path(copy["bilm"]) / "bilm.pt")[0].embedding.weight
    )
    assert copy["models"]["classifier-wsum"]["test_accuracy"] == pytest.approx(
        summary["models"]["classifier-wsum"]["test_accuracy"]
    )


def test_finetuning_trains_the_biLM_inside_the_classifier_and_keeps_it(pretrained, ag_slice):
    """classifier.finetune_bilm through the stage (.fn): token ids in, the biLM tuned with the
    head, saved beside it; the frozen stage's biLM is left as it was."""
    import numpy as np

    from elmo_core.classifier_config import ClassifierConfig
    from flows.params import resolve_sections
    from serving.classifier_model import ELMoNewsModel
    from tasks.classify import classify

    home, _, _ = pretrained
    summary, _ = _reuse(ag_slice, home, "models:/elmo-news-bilm/1")  # cached: the stage inputs
    smoke = resolve_sections("smoke", {}, "cpu").classifier
    cfg = ClassifierConfig(**{**smoke.__dict__, "finetune_bilm": True, "unfreeze_every": 1})
    out = Path(
        classify.fn(
            summary["features"],
            summary["bilm"],
            summary["dataset"],
            "wsum",
            cfg,
            StageContext(str(home), "cpu"),
        )
    )
    frozen, _ = load_bilm(Path(summary["bilm"]) / "bilm.pt")
    tuned, _ = load_bilm(out / "bilm.pt")
    top = "forward_lstms.1.weight_hh_l0"  # trained from epoch 2 on (the smoke profile has 2)
    assert not torch.equal(tuned.state_dict()[top], frozen.state_dict()[top])
    assert torch.equal(tuned.embedding.weight, frozen.embedding.weight)  # the word table: frozen
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.3
    # the served model (stored-layer path) reads the tuned biLM and gives the stage's predictions
    served = ELMoNewsModel()
    served.load_context(
        type(
            "Ctx",
            (),
            {"artifacts": {"bilm": str(out / "bilm.pt"), "classifier": str(out / "model.pt")}},
        )
    )
    import polars as pl

    test = pl.read_parquet(Path(summary["dataset"]) / "test.parquet")
    probs = served.predict_tokens(test["tokens"].to_list())
    stage = pl.read_parquet(out / "predictions.parquet")
    assert float(np.mean(probs.argmax(1) == stage["pred"].to_numpy())) > 0.97


def _reuse(ag_slice: Path, home: Path, bilm: str):
    from flows.pipeline import elmo_news

    state = elmo_news(
        params=smoke_params(
            ag_slice,
            home,
            strategies=["wsum"],
            bilm=bilm,
            register_model=False,
        ),
        return_state=True,
    )
    return state.result(), _task_states(state.state_details.flow_run_id)


def test_a_downloaded_biLM_is_the_registered_folder(pretrained, tmp_path):
    from storage.registry import resolve_bilm

    home, pre, _ = pretrained
    got, info = resolve_bilm("models:/elmo-news-bilm/1", tmp_path / "bilm")  # a fresh home
    assert got.name == Path(pre["bilm"]).name and info["bilm_model_id"]
    assert (got / "bilm.pt").read_bytes() == (Path(pre["bilm"]) / "bilm.pt").read_bytes()
    with pytest.raises(ValueError, match="no such model version"):
        resolve_bilm("models:/elmo-news-bilm/9", tmp_path / "bilm")
    with pytest.raises(ValueError, match="not a biLM stage folder"):
        resolve_bilm(str(tmp_path), tmp_path / "bilm")


def test_a_models_uri_is_looked_up_in_the_runs_home_not_mlflows_current_store(
    pretrained, tmp_path, monkeypatch
):
    """A flow called from Python or a deployment (no CLI to export MLFLOW_TRACKING_URI) must
    find ``models:/`` in its home's store, not in whatever store MLflow points at."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from tasks.registry import fetch_bilm

    home, pre, _ = pretrained
    # MLflow's current store is an empty one elsewhere (as set_tracking_uri would leave it,
    # without the environment variable a CLI exports); monkeypatch restores both
    monkeypatch.setattr(tracking_utils, "_tracking_uri", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="other_home"):  # a home without that model says so
        fetch_bilm.fn("models:/elmo-news-bilm/1", str(tmp_path / "other_home"))
    path, info = fetch_bilm.fn("models:/elmo-news-bilm/1", str(home))
    assert Path(path).name == Path(pre["bilm"]).name
    assert info["bilm_source"] == "models:/elmo-news-bilm/1"


def test_adapting_a_reused_biLM_lowers_its_perplexity_on_the_task_text(pretrained, ag_slice):
    from flows.pipeline import elmo_news

    home, pre, _ = pretrained
    state = elmo_news(
        params=smoke_params(
            ag_slice,
            home,
            strategies=["wsum"],
            bilm="models:/elmo-news-bilm/1",
            register_model=False,
            overrides={
                "adapt": {
                    "epochs": 2,
                    "batch_size": 16,
                    "lr": 3e-3,
                    "val_tokens": 500,
                    "new_words_min_count": 2,
                }
            },
        ),
        return_state=True,
    )
    summary = state.result()
    states = _task_states(state.state_details.flow_run_id)
    assert states["adapt-bilm"] == ["Completed"] and "pretrain-bilm" not in states
    adapted = Path(summary["bilm"])
    assert adapted.name != Path(pre["bilm"]).name  # a new folder; the registered one untouched
    m = json.loads((adapted / "metrics.json").read_text())
    assert (m["passes"], m["best_pass"], m["stop_reason"]) == (2, 2, "epochs")
    assert m["val_perplexity_forward"] < m["val_perplexity_forward_before"]
    assert m["val_perplexity_backward"] < m["val_perplexity_backward_before"]
    # the AG words the corpus biLM lacked got ids of their own, after the old ones
    assert m["new_words"] > 0 and m["train_unk_rate_after"] < m["train_unk_rate_before"]
    a, va = load_bilm(adapted / "bilm.pt")
    b, vb = load_bilm(Path(pre["bilm"]) / "bilm.pt")
    assert len(va) == len(vb) + m["new_words"] and va.tokens[: len(vb)] == vb.tokens
    assert a.embedding.weight.shape[0] == len(va) and not torch.equal(
        a.forward_lstms[0].weight_ih_l0, b.forward_lstms[0].weight_ih_l0
    )


def test_adaptation_also_reads_the_unlabeled_corpora_given_with_a_reused_biLM(
    pretrained, ag_slice, tmp_path
):
    """Few labels, much unlabeled text: the reused biLM adapts on both, and learns the words
    only the unlabeled text has; without corpora it is the split alone (another stage)."""
    import polars as pl

    from elmo_core.pretrain_config import AdaptConfig
    from storage.datasets import read_dataset
    from tasks.adapt import adapt
    from tasks.corpus import CorpusConfig, read_pretrain_corpus
    from tasks.ingest import IngestConfig, ingest
    from tasks.registry import fetch_bilm

    home, _, _ = pretrained
    ctx = StageContext(str(tmp_path / "h"))
    dataset = ingest.fn(str(ag_slice), IngestConfig(), ctx)
    # 300 other AG train rows, text only (none of the slice's rows: it takes every 30th)
    rows = (AG / "train.csv").read_text(encoding="utf-8").splitlines()[15 : 300 * 30 : 30]
    texts = pl.read_csv("\n".join(rows).encode(), has_header=False, infer_schema=False)
    unlabeled = tmp_path / "unlabeled.parquet"
    texts.select(pl.concat_str([pl.nth(1), pl.nth(2)], separator=" ").alias("text")).write_parquet(
        unlabeled
    )
    corpus = read_pretrain_corpus.fn(str(unlabeled), CorpusConfig(holdout_fraction=0.0), ctx)
    bilm_dir, _ = fetch_bilm.fn("models:/elmo-news-bilm/1", str(home))
    config = AdaptConfig(epochs=1, batch_size=16, val_tokens=500, new_words_min_count=2)
    alone = Path(adapt.fn(str(bilm_dir), dataset, config, ctx))
    both = Path(adapt.fn(str(bilm_dir), dataset, config, ctx, [corpus]))
    assert alone != both
    m_alone = json.loads((alone / "metrics.json").read_text())
    m_both = json.loads((both / "metrics.json").read_text())
    assert m_alone["unlabeled_docs"] == 0 and m_both["unlabeled_docs"] == 300
    train_tokens = read_dataset(Path(dataset) / "train.parquet")["tokens"].list.len().sum()
    assert m_both["train_tokens"] > m_alone["train_tokens"]  # more windows an epoch
    assert m_both["unlabeled_tokens"] > train_tokens / 2
    _, v_alone = load_bilm(alone / "bilm.pt")
    _, v_both = load_bilm(both / "bilm.pt")
    assert set(v_alone.tokens) < set(v_both.tokens)  # the unlabeled text's own words too
