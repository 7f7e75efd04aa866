"""The biLM against ELMo's original implementation: its own test model and the outputs it
computes (``../shared/data/elmo_reference/bilm-tf``, see its SOURCE.md), read with the
original test's protocol: 10 batches of 3 sentences, stateful, float32 on the CPU. Then
export -> import, and the one clear error for files that disagree."""

from __future__ import annotations

import importlib.util
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
    exported_config,
    options_from_config,
    published_from_state,
)
from elmo_core.stateful import StatefulReader
from elmo_core.vocab import SPECIALS
from storage.elmo_files import write_elmo
from storage.published_models import load_published
from tests.conftest import SHARED

REF = SHARED / "elmo_reference" / "bilm-tf"


def load(folder: Path, weights: str = "lm_weights.hdf5") -> BiLM:
    return load_published(folder / "options.json", folder / weights)[0]


_spec = importlib.util.spec_from_file_location(
    "elmo_reference", Path(__file__).resolve().parents[1] / "bench" / "elmo_reference.py"
)
elmo_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(elmo_reference)
batch = elmo_reference.batch


def test_the_reference_model_reproduces_the_original_outputs_to_1e6():
    """The original test's protocol (``bench/elmo_reference.py``): every sentence's top layer
    within 1e-6, the lengths, zero padding, and its state checks."""
    res = elmo_reference.run_protocol(REF)
    assert res["batches"] == 10 and res["rows_per_batch"] == 3
    assert res["max_abs_diff"] <= 1e-6, res
    assert res["lengths_ok"] and res["padding_zero"]
    assert res["spare_row_states_zero"] and res["unfilled_row_states_kept"]


def test_the_stateful_reader_carries_only_the_rows_a_batch_fills():
    model = load(REF)
    reader = StatefulReader(model, max_batch=3)
    words = [["The", "cat", "sat", "."], ["Stocks", "fell", "."]]
    first = reader(*batch(model, words)).layers
    again = reader(*batch(model, words)).layers  # the same text again, from carried states
    assert not torch.equal(first, again)
    assert all(
        float(c[2].abs().sum()) == 0
        for layers in reader.states.values()
        for hc in layers
        for c in hc
    )
    reader.reset()
    torch.testing.assert_close(reader(*batch(model, words)).layers, first, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exceeds the reader's 3"):
        reader(*batch(model, words * 2))


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


def test_a_word_bilm_exports_in_bilm_tf_token_input_form_and_re_imports(tmp_path):
    from elmo_core.bilm_checkpoint import save_bilm
    from elmo_core.vocab import Vocab
    from storage.published_models import export_published

    torch.manual_seed(1)
    words = ("the", "cat", "sat", "on", "mat")
    vocab = Vocab((*SPECIALS, *words), (1,) * 9)
    config = BiLMConfig(
        vocab_size=9, embedding_dim=12, hidden_dim=24, projection_dim=8, num_layers=2,
        dropout=0.0, num_samples=0,
    )  # fmt: skip
    ours = BiLM(config).eval()
    save_bilm(tmp_path / "bilm.pt", ours, vocab)
    out = tmp_path / "exported"
    export_published(tmp_path, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "embedding.hdf5", "options.json", "vocab.txt", "weights.hdf5",
    ]  # fmt: skip
    assert (out / "vocab.txt").read_text().split()[:4] == ["<pad>", "<UNK>", "<S>", "</S>"]
    assert "char_cnn" not in json.loads((out / "options.json").read_text())
    with h5py.File(out / "embedding.hdf5", "r") as f:
        assert f["embedding"].shape == (9, 8)  # E -> D folded in
    back, back_vocab = load_published(
        *(out / n for n in ("options.json", "weights.hdf5", "embedding.hdf5", "vocab.txt"))
    )
    assert back_vocab.tokens == vocab.tokens
    tokens = torch.tensor([[4, 5, 6, 7, 8], [5, 6, 1, 0, 0]])
    with torch.no_grad():
        a, b = ours(tokens, tokens != 0).layers, back(tokens, tokens != 0).layers
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
