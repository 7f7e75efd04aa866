import numpy as np
import pytest
import torch

from elmo_core.classifier_config import MixConfig
from elmo_core.mix import MIX_STRATEGIES, STRATEGIES, FunctionMix, ScalarMix, build_mix


def _layers(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(seed))  # (L, B, T, D)


def numpy_scalar_mix(layers: np.ndarray, w: np.ndarray, gamma: float) -> np.ndarray:
    s = np.exp(w - w.max())
    s = s / s.sum()
    return gamma * np.tensordot(s, layers, axes=(0, 0))


@pytest.mark.parametrize("strategy", ["sum", "wsum"])
def test_scalar_mix_matches_numpy_reference(strategy):
    mix = build_mix(MixConfig(strategy, num_layers=3, dim=4, seed=5))
    with torch.no_grad():
        mix.gamma.fill_(1.7)
    x = _layers()
    ref = numpy_scalar_mix(x.numpy(), mix.weights.detach().numpy(), 1.7)
    assert np.allclose(mix(x).detach().numpy(), ref, atol=1e-5)


def test_sum_is_fixed_random_and_seeded():
    a = build_mix(MixConfig("sum", 3, 4, seed=1))
    b = build_mix(MixConfig("sum", 3, 4, seed=1))
    c = build_mix(MixConfig("sum", 3, 4, seed=2))
    assert isinstance(a, ScalarMix)
    assert not any(p.requires_grad for p in a.parameters())
    assert torch.equal(a.layer_weights(), b.layer_weights())
    assert not torch.allclose(a.layer_weights(), c.layer_weights())
    assert not torch.allclose(a.layer_weights(), torch.full((3,), 1 / 3))
    assert torch.isclose(a.layer_weights().sum(), torch.tensor(1.0))


def test_wsum_starts_uniform_and_learns():
    mix = build_mix(MixConfig("wsum", 3, 4))
    assert torch.allclose(mix.layer_weights(), torch.full((3,), 1 / 3))
    mix(_layers()).pow(2).sum().backward()
    assert mix.weights.grad is not None and mix.gamma.grad is not None


def test_function_mix_shape_and_gradients():
    mix = build_mix(MixConfig("function", 3, 4))
    assert isinstance(mix, FunctionMix)
    out = mix(_layers())
    assert out.shape == (2, 5, 4) and out.abs().max() <= 1
    out.sum().backward()
    assert mix.linear.weight.grad.shape == (4, 12)


def test_function_mix_starts_near_tanh_of_the_layer_average():
    layers = _layers()
    mix = FunctionMix(3, 4, seed=0, noise=0.0)
    ref = np.tanh(layers.numpy().mean(axis=0))  # numpy reference: tanh(mean_k h_k)
    assert np.allclose(mix(layers).detach().numpy(), ref, atol=1e-6)
    noisy = build_mix(MixConfig("function", 3, 4, seed=3))
    assert not torch.equal(noisy.linear.weight, mix.linear.weight)
    again = build_mix(MixConfig("function", 3, 4, seed=3))
    assert torch.equal(noisy.linear.weight, again.linear.weight)  # seeded


def test_strategies_are_data():
    assert set(STRATEGIES) == {"sum", "wsum", "function", "static"}
    assert MIX_STRATEGIES == ("sum", "wsum", "function")
    for spec in STRATEGIES.values():
        assert (spec.init_logits is None) != (spec.module is None)


def test_unknown_strategy_is_a_value_error():
    with pytest.raises(ValueError, match="'max'"):
        build_mix(MixConfig("max", 3, 4))


def test_static_ablation_reads_layer_zero_only():
    layers = _layers()
    mix = build_mix(MixConfig("static", 3, 4))
    assert list(mix.parameters()) == []  # nothing to learn: no contextual layers
    out = mix(layers)
    assert torch.equal(out, layers[0])
    changed = layers.clone()
    changed[1:] += 1.0  # the contextual layers do not reach the output
    assert torch.equal(mix(changed), out)
