"""The classifier head: its BiLSTM equals a packed bidirectional LSTM, its dropout is nn.Dropout's."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from elmo_core.classifier import ELMoClassifier, fast_dropout, keep_mask, reverse_each
from elmo_core.classifier_config import ClassifierConfig, MixConfig
from elmo_core.layers_config import LayersConfig
from elmo_core.lstm import reverse_padded
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


@pytest.mark.parametrize("strategy", ["wsum", "function"])
def test_a_document_pools_the_same_alone_and_beside_a_longer_one(strategy):
    """Alone it fills its batch (pooling takes no mask); beside a longer document it is padded
    (pooling masks): both give its logits, and the same gradient to the mix."""
    torch.manual_seed(0)
    cfg = ClassifierConfig(hidden_dim=4, mlp_hidden=(4,), dropout=0.0)
    model = ELMoClassifier(cfg, build_mix(MixConfig(strategy, 2, 6)), 6, 3)
    short, long = torch.randn(2, 1, 3, 6), torch.randn(2, 1, 5, 6)  # (L, B, T, D)
    padded = torch.cat([torch.cat([short, torch.zeros(2, 1, 2, 6)], 2), long], 1)  # (L, 2, 5, D)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    alone = model(short, torch.ones(1, 3, dtype=torch.bool))
    alone[0, 0].backward()
    grads = [p.grad.clone() for p in model.mix.parameters()]
    model.zero_grad()
    beside = model(padded, mask)
    beside[0, 0].backward()
    torch.testing.assert_close(beside[:1], alone, atol=1e-6, rtol=0)
    for g, p in zip(grads, model.mix.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


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


@pytest.mark.parametrize("p", [0.1, 0.4, 0.75])
def test_keep_mask_keeps_each_element_and_each_lane_with_probability_1_minus_p(p):
    torch.manual_seed(0)
    m = keep_mask((101, 203, 9), p, torch.device("cpu"))  # a size not divisible by 4
    assert m.shape == (101, 203, 9) and m.dtype == torch.bool
    flat = m.flatten()[: (m.numel() // 4) * 4].view(-1, 4).float()
    for lane in flat.mean(0).tolist():  # each of the four values a 64-bit draw gives
        assert abs(lane - (1 - p)) < 0.01
    # neighbouring elements are independent: P(both kept) = (1-p)^2
    both = (flat[:, 0] * flat[:, 1]).mean().item()
    assert abs(both - (1 - p) ** 2) < 0.01


def test_reverse_each_flips_full_batches_as_reverse_padded_does():
    h = torch.randn(3, 6, 2)
    full = torch.tensor([6, 6, 6])
    assert torch.equal(reverse_each(h, full, True), reverse_padded(h, full))
    ragged = torch.tensor([6, 2, 4])
    assert torch.equal(reverse_each(h, ragged, False), reverse_padded(h, ragged))


@pytest.mark.parametrize("strategy", ["wsum", "function", "static"])
def test_elmo_at_the_output_adds_its_own_mix_that_learns_and_survives_a_checkpoint(
    strategy, tmp_path
):
    from elmo_core.classifier_checkpoint import load_classifier, save_classifier
    from elmo_core.classifier_optim import classifier_param_groups

    torch.manual_seed(0)
    cfg = ClassifierConfig(hidden_dim=4, mlp_hidden=(4,), dropout=0.0, elmo_output=True)
    mix_config = MixConfig(strategy, 3, 6)
    model = ELMoClassifier(cfg, build_mix(mix_config), 6, 3)
    assert model.output_mix is not None and model.output_mix is not model.mix
    # the same start as the input mix, parameters of its own, the strategy's lr scale
    start, copied = model.mix.state_dict(), model.output_mix.state_dict()
    assert start.keys() == copied.keys()
    assert all(torch.equal(start[k], copied[k]) for k in start)
    assert model.output_mix.lr_scale == model.mix.lr_scale
    assert {id(p) for p in model.output_mix.parameters()}.isdisjoint(
        id(p) for p in model.mix.parameters()
    )
    assert model.mlp[0].in_features == 2 * (2 * 4 + 6)  # mean + max over [states; ELMo]
    layers = torch.randn(3, 2, 5, 6, requires_grad=True)  # (L, B, T, D)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    logits = model(layers, mask)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    trainable = [p for p in model.output_mix.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    if strategy == "static":  # layer 0 only: the ablation has no contextual layers at the output
        assert layers.grad is not None and layers.grad[1:].abs().sum() == 0
    grouped = [p for g in classifier_param_groups(model, 1e-3)[1:] for p in g["params"]]
    assert {id(p) for p in trainable} <= {id(p) for p in grouped}
    save_classifier(tmp_path / "c.pt", model, mix_config, 6, ["a", "b", "c"], LayersConfig())
    loaded, _ = load_classifier(tmp_path / "c.pt")
    model.eval()
    assert torch.allclose(loaded(layers, mask), model(layers, mask), atol=1e-6)


def test_without_elmo_at_the_output_the_head_pools_the_states_alone():
    cfg = ClassifierConfig(hidden_dim=4, mlp_hidden=(4,))
    model = ELMoClassifier(cfg, build_mix(MixConfig("wsum", 3, 6)), 6, 3)
    assert model.output_mix is None and model.mlp[0].in_features == 4 * 4
