"""The biLM against ELMo's original implementation: its own test model and the outputs it
computes (``../shared/data/elmo_reference/bilm-tf``, see its SOURCE.md), read with the
original test's protocol: 10 batches of 3 sentences, stateful, float32 on the CPU. Then
export -> import, and the one clear error for files that disagree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from elmo_core.bilm import BiLM
from elmo_core.bilm_config import BiLMConfig
from elmo_core.published import (
    PublishedFormatError,
    config_from_options,
    exported_config,
    options_from_config,
    published_from_state,
    state_from_published,
)
from elmo_core.stateful import StatefulReader
from elmo_core.vocab import SPECIALS, Vocab
from storage.elmo_files import read_options, read_weights, write_elmo
from tests.conftest import SHARED

REF = SHARED / "elmo_reference" / "bilm-tf"
VOCAB = Vocab(SPECIALS, (1, 1, 1, 1))


def load(folder: Path, weights: str = "lm_weights.hdf5") -> BiLM:
    config = config_from_options(read_options(folder / "options.json"))
    model = BiLM(config)
    model.set_words(SPECIALS)
    model.load_state_dict(
        state_from_published(read_weights(folder / weights), config, model.state_dict())
    )
    return model.eval()


def batch(
    model: BiLM, sentences: list[list[str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    ids, extra = VOCAB.encode_open(sentences)
    tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)  # (B, T)
    for r, row in enumerate(ids):
        tokens[r, : len(row)] = torch.tensor(row)
    return tokens, tokens != 0, model.extra_chars(extra)


def test_the_reference_model_reproduces_the_original_outputs_to_1e6():
    model = load(REF)
    sentences = json.loads((REF / "lm_embeddings_sentences.json").read_text())
    expected = [h5py.File(REF / f"lm_embeddings_{k}.hdf5", "r") for k in range(3)]
    reader = StatefulReader(model, max_batch=4)
    worst = 0.0
    for i in range(10):  # batch i = sentence i of each of the three texts
        words = [sentences[k][i].strip().split() for k in range(3)]
        tokens, mask, extra = batch(model, words)
        out = reader(tokens, mask, extra)
        assert out.mask.sum(1).tolist() == [len(w) for w in words]  # lengths, marks dropped
        for k in range(3):
            e = expected[k][str(i)][...]  # (2, T, 16): forward, backward
            want = np.concatenate([e[0], e[1]], axis=-1)
            got = out.layers[2, k, : len(words[k])].numpy()  # the top layer
            assert got.shape == want.shape
            worst = max(worst, float(np.abs(got - want).max()))
            assert not out.layers[:, k, len(words[k]) :].any()  # padding reads as zero
    assert worst <= 1e-6, worst

    # the original's state checks: 3-row batches never touch row 4; a 2-row batch keeps row 3
    third = []
    for layers in reader.states.values():
        for h, c in layers:
            for s in (h, c):
                assert float(s[3].abs().sum()) < 1e-7
                assert float(s[2].abs().sum()) > 0
                third.append(s[2].clone())
    tokens, mask, extra = batch(model, [["a", "b", "c"], ["d"]])
    reader(tokens, mask, extra)
    now = [s[2] for layers in reader.states.values() for h, c in layers for s in (h, c)]
    assert all(torch.equal(a, b) for a, b in zip(third, now, strict=True))
    changed = [s[1] for layers in reader.states.values() for h, c in layers for s in (h, c)]
    assert any(not torch.equal(a, b) for a, b in zip(third, changed, strict=True))


def test_stateless_reading_differs_and_does_not_depend_on_the_batch():
    """Today's reading (every row from zero states) is what the pipeline uses: a sentence
    gives the same vectors alone or beside others."""
    model = load(REF)
    words = [["The", "cat", "sat", "."], ["A", "much", "longer", "sentence", "than", "that", "."]]
    tokens, mask, extra = batch(model, words)
    with torch.no_grad():
        both = model(tokens, mask, extra).layers
        alone = model(*batch(model, words[:1])).layers
    torch.testing.assert_close(both[:, :1, :4], alone, atol=1e-6, rtol=0)


def test_an_exported_char_bilm_of_ours_re_imports_to_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    for ids in ("compact", "elmo"):
        config = BiLMConfig(
            vocab_size=4, embedding_dim=24, hidden_dim=32, projection_dim=16, cell_clip=3.0,
            proj_clip=3.0, token_encoder="char", char_filters=(4, 8, 8), char_dim=8,
            char_highway=2, max_chars=12, char_ids=ids, dropout=0.0,
        )  # fmt: skip
        ours = BiLM(config)
        ours.set_words(SPECIALS)
        ours.eval()
        write_elmo(
            tmp_path / ids,
            options_from_config(config),
            published_from_state(ours.state_dict(), config),
        )
        back = load(tmp_path / ids, "weights.hdf5")
        assert back.config == exported_config(config)
        words = [
            ["the", "quick", "brown", "fox", "jumps"],
            ["über", "a-very-long-compound-word", "x"],
        ]
        with torch.no_grad():
            a = ours(*batch(ours, words)).layers
            b = back(*batch(back, words)).layers
        # the LSTM biases are stored summed and the forget bias shifted by 1, the E -> D map
        # folded into the CNN projection: equal up to float32 rounding
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(REF, folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def test_files_that_disagree_fail_with_one_error_naming_the_dataset(tmp_path):
    folder = _copy(tmp_path)
    with h5py.File(folder / "lm_weights.hdf5", "a") as f:
        del f["CNN_high_1/W_carry"]
    with pytest.raises(PublishedFormatError, match=r"missing dataset CNN_high_1/W_carry"):
        load(folder)

    folder = _copy(tmp_path / "2")
    with h5py.File(folder / "lm_weights.hdf5", "a") as f:
        del f["CNN_proj/W_proj"]
        f["CNN_proj/W_proj"] = np.zeros((124, 32), dtype=np.float32)
    with pytest.raises(
        PublishedFormatError,
        match=r"CNN_proj/W_proj has shape \(124, 32\), the options need \(124, 16\)",
    ):
        load(folder)

    folder = _copy(tmp_path / "3")
    raw = (folder / "lm_weights.hdf5").read_bytes()
    (folder / "lm_weights.hdf5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PublishedFormatError, match=r"lm_weights.hdf5: unreadable HDF5 weights"):
        load(folder)

    folder = _copy(tmp_path / "4")
    options = json.loads((folder / "options.json").read_text())
    del options["lstm"]["projection_dim"]
    (folder / "options.json").write_text(json.dumps(options))
    with pytest.raises(PublishedFormatError, match=r"options: missing entry 'projection_dim'"):
        load(folder)
