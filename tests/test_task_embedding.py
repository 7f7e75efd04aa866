"""The task token embedding trained on its train split's rows: the same training as the whole
table, cheaper."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import elmo_core.classifier_training as training
from elmo_core.classifier import ELMoClassifier
from elmo_core.classifier_config import ClassifierConfig, MixConfig
from elmo_core.classifier_training import train_classifier
from elmo_core.mix import build_mix
from elmo_core.task_embedding import RowSubsetEmbedding, restore_full, restrict_to_rows
from storage.layers import LayerStore
from tests.test_training import _separable_store

CPU = torch.device("cpu")
V, E = 60, 4


def _store(n: int, seed: int, vocab: tuple[int, int]) -> LayerStore:
    """``_separable_store``'s documents with token ids drawn from [lo, hi)."""
    store = _separable_store(n, seed)
    rng = np.random.default_rng(seed)
    return replace(store, tokens=rng.integers(*vocab, size=store.offsets[-1]).astype(np.int32))


def _model(init: torch.Tensor) -> ELMoClassifier:
    cfg = ClassifierConfig(
        hidden_dim=8, mlp_hidden=(8,), token_embedding_dim=E, eval_every=10, patience=3,
        min_steps=0, max_steps=40, batch_size=16, lr=1e-2, dropout=0.1, precision="fp32",
    )  # fmt: skip
    torch.manual_seed(0)
    mix = build_mix(MixConfig("wsum", num_layers=3, dim=6, seed=1))
    return ELMoClassifier(cfg, mix, 6, 3, vocab_size=V, init_embedding=init)


def test_forward_matches_the_full_table_and_restores_it():
    table = torch.randn(V, E)
    emb = nn.Embedding(V, E, padding_idx=0)
    with torch.no_grad():
        emb.weight.copy_(table)
    head = nn.Module()
    head.embedding = emb
    assert restrict_to_rows(head, np.array([5, 3, 3, 0, 7], dtype=np.int32))
    sub = head.embedding
    assert isinstance(sub, RowSubsetEmbedding) and sub.weight.shape == (3, E)  # 3, 5, 7
    tokens = torch.tensor([[0, 3, 9, 7], [5, 5, 59, 0]])  # trained, fixed and padding rows
    assert torch.equal(sub(tokens), table[tokens])
    with torch.no_grad():
        sub.weight.add_(1.0)
    restore_full(head)
    full = head.embedding
    assert isinstance(full, nn.Embedding) and full.padding_idx == 0
    moved = (full.weight != table).any(1).nonzero().squeeze(1).tolist()
    assert moved == [3, 5, 7]


def test_rows_outside_the_table_are_refused():
    with pytest.raises(ValueError, match=r"trained rows must lie in \[0, 60\), got 3..60"):
        RowSubsetEmbedding(torch.zeros(V, E), torch.tensor([3, 60]), 0)


def test_sparse_frozen_or_token_free_tables_stay_whole():
    head = nn.Module()
    head.embedding = nn.Embedding(V, E, sparse=True)
    assert not restrict_to_rows(head, np.array([1, 2]))
    head.embedding = nn.Embedding(V, E)
    assert not restrict_to_rows(head, None)
    head.embedding.weight.requires_grad_(False)
    assert not restrict_to_rows(head, np.array([1, 2]))
    assert isinstance(head.embedding, nn.Embedding)


def test_training_on_train_rows_equals_training_the_whole_table(monkeypatch):
    # train uses ids 1..29; validation also ids 30..59, which training never reaches
    train, val = _store(200, 1, (1, 30)), _store(60, 2, (1, V))
    init = torch.randn(V, 8)
    swapped = []

    def spy(head, tokens):
        swapped.append(restrict_to_rows(head, tokens))
        return swapped[-1]

    monkeypatch.setattr(training, "restrict_to_rows", spy)
    subset = _model(init)
    res_subset = train_classifier(subset, train, val, subset.config, device=CPU)
    monkeypatch.setattr(training, "restrict_to_rows", lambda head, tokens: False)
    whole = _model(init)
    res_whole = train_classifier(whole, train, val, whole.config, device=CPU)

    assert swapped == [True]
    assert isinstance(subset.embedding, nn.Embedding)  # whole again after training
    assert res_subset.best_step == res_whole.best_step
    assert res_subset.best_val_accuracy == pytest.approx(res_whole.best_val_accuracy)
    a, b = subset.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    w = subset.embedding.weight
    assert torch.equal(w[30:], init[30:, :E]) and torch.equal(w[0], init[0, :E])
    assert not torch.equal(w[1:30], init[1:30, :E])  # the train rows did train
