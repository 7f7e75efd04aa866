"""The classifier head: its BiLSTM equals a packed bidirectional LSTM, its dropout is nn.Dropout's."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from elmo_core.classifier import ELMoClassifier, fast_dropout
from elmo_core.config import ClassifierConfig, MixConfig
from elmo_core.mix import build_mix


@pytest.mark.parametrize("num_layers", [1, 2])
def test_bilstm_equals_a_packed_bidirectional_lstm_at_real_positions(num_layers):
    torch.manual_seed(0)
    cfg = ClassifierConfig(hidden_dim=5, num_layers=num_layers, mlp_hidden=(4,), dropout=0.3)
    model = ELMoClassifier(cfg, build_mix(MixConfig("wsum", 2, 6)), 6, 3).eval()
    ref = nn.LSTM(6, 5, num_layers=num_layers, batch_first=True, bidirectional=True).eval()
    # a checkpoint of the old layout (one bidirectional nn.LSTM named rnn) loads, strictly
    legacy = {k: v for k, v in model.state_dict().items() if not k.startswith("rnn_")}
    legacy.update({f"rnn.{k}": v for k, v in ref.state_dict().items()})
    model.load_state_dict(legacy)
    h = torch.randn(3, 7, 6)
    lengths = torch.tensor([7, 4, 1])
    out = model.bilstm(h, lengths)  # (B, T, 2H)
    packed = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
    expected, _ = pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=7)
    for b, n in enumerate(lengths.tolist()):
        assert torch.allclose(out[b, :n], expected[b, :n], atol=1e-6)


def test_classifier_output_ignores_padding():
    torch.manual_seed(0)
    cfg = ClassifierConfig(hidden_dim=4, mlp_hidden=(4,), dropout=0.0)
    model = ELMoClassifier(cfg, build_mix(MixConfig("sum", 2, 6)), 6, 3).eval()
    layers = torch.randn(2, 1, 5, 6)  # (L, B, T, D)
    mask = torch.tensor([[True, True, True, False, False]])
    a = model(layers, mask)
    layers[:, :, 3:] = 100.0  # garbage in the padding
    assert torch.allclose(a, model(layers, mask), atol=1e-6)


def test_fast_dropout_matches_nn_dropout_in_distribution_and_is_identity_in_eval():
    torch.manual_seed(0)
    x = torch.ones(200, 50, 40)
    y = fast_dropout(x, 0.4, True)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.6) < 0.01  # each element kept with probability 1-p
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.6))  # inverted scaling
    assert abs(y.mean().item() - 1.0) < 0.02
    assert fast_dropout(x, 0.4, False) is x
    assert fast_dropout(x, 0.0, True) is x
