"""Training loops: they learn, checkpoint atomically and resume to the same result."""

import pickle
from typing import Any

import numpy as np
import pytest
import torch

from elmo_core import device
from elmo_core.bilm import BiLM
from elmo_core.bilm_checkpoint import load_bilm, save_bilm
from elmo_core.bilm_config import BiLMConfig
from elmo_core.checkpoint import CheckpointError, safe_load
from elmo_core.classifier import ELMoClassifier
from elmo_core.classifier_checkpoint import load_classifier, save_classifier
from elmo_core.classifier_config import ClassifierConfig, MixConfig
from elmo_core.classifier_optim import Optimizers, classifier_param_groups
from elmo_core.classifier_training import (
    EMA_DECAY,
    ema_decay,
    macro_f1,
    predict_proba,
    prefetched,
    reader_has_core,
    train_classifier,
    validation_loss,
)
from elmo_core.device import autocast, bf16_native, resolve_precision
from elmo_core.extraction import doc_lengths, extract_layers, window_pieces
from elmo_core.layers_config import LayersConfig
from elmo_core.mix import build_mix
from elmo_core.optim import LazyAdam
from elmo_core.pretrain_config import AdaptConfig, PretrainConfig
from elmo_core.pretraining import perplexity, pretrain_bilm
from elmo_core.vocab import Vocab
from elmo_core.vocab_config import VocabConfig
from elmo_core.windows import make_windows
from serving.inference import layer_store_for
from storage.layers import LayerStore, RowFile

CPU = torch.device("cpu")


def _stream(n: int = 3000, seed: int = 0) -> np.ndarray:
    """A learnable stream: a repeating pattern with noise."""
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(4, 24), n // 20 + 1)[:n]
    noise = rng.random(n) < 0.1
    base[noise] = rng.integers(4, 40, noise.sum())
    return base.astype(np.int32)


def _bilm() -> BiLM:
    torch.manual_seed(0)
    return BiLM(
        BiLMConfig(vocab_size=40, embedding_dim=8, hidden_dim=8, dropout=0.1, num_samples=8)
    )


def test_make_windows_drops_the_tail_and_rejects_short_streams():
    w = make_windows(np.arange(45), 10)
    assert w.shape == (4, 10) and w[1, 0] == 10
    with pytest.raises(ValueError, match="shorter than one window"):
        make_windows(np.arange(5), 10)


def test_pretraining_lowers_perplexity():
    cfg = PretrainConfig(epochs=4, window=10, batch_size=16, lr=2e-2, val_tokens=500)
    points = []
    res = pretrain_bilm(
        _bilm(), _stream(), _stream(500, 1), cfg, lambda m, s: points.append(m), device=CPU
    )
    ppl = [p["val_perplexity"] for p in points if "val_perplexity" in p]
    assert len(ppl) == 4 and ppl[3] < ppl[0] < 40  # 36 words: uniform guessing is ~36
    assert res.val_perplexity_forward < 8 and res.val_perplexity_backward < 8


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pretraining_resume_matches_uninterrupted(tmp_path, precision):
    cfg = PretrainConfig(
        epochs=2,
        window=10,
        batch_size=16,
        lr=1e-2,
        val_tokens=500,
        checkpoint_every=7,
        precision=precision,
    )
    full = _bilm()
    pretrain_bilm(full, _stream(), _stream(500, 1), cfg, device=CPU)
    # a run stopped after 11 steps (its checkpoint is at step 7), then resumed with the full config
    ckpt = tmp_path / "state.pt"
    stopped = PretrainConfig(**{**cfg.__dict__, "max_steps": 11})
    pretrain_bilm(_bilm(), _stream(), _stream(500, 1), stopped, checkpoint=ckpt, device=CPU)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 11 or state["step"] == 7
    resumed = _bilm()
    pretrain_bilm(resumed, _stream(), _stream(500, 1), cfg, checkpoint=ckpt, device=CPU)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _scripted_perplexity(monkeypatch, values: list[float]) -> None:
    """The loop's validation perplexity after each pass read from ``values`` (both LMs)."""
    import elmo_core.pretraining as pt

    left = list(values)
    real = pt.perplexity
    monkeypatch.setattr(
        pt, "perplexity", lambda m, w, d: (left[0], left.pop(0)) if left else real(m, w, d)
    )


def test_min_gain_stops_on_a_plateau_and_keeps_the_best_pass(monkeypatch):
    """A pass that makes the perplexity worse ends training, and the model goes back to the
    weights of the best pass; the result says why and which pass it holds."""
    cfg = PretrainConfig(epochs=6, window=10, batch_size=16, lr=2e-2, val_tokens=500, min_gain=0.05)
    _scripted_perplexity(monkeypatch, [100.0, 80.0, 90.0])  # pass 3 is worse than pass 2
    after: dict[int, dict[str, torch.Tensor]] = {}
    model = _bilm()

    def log(m: dict[str, float], step: int) -> None:
        if "val_perplexity" in m:  # logged once a pass, with the pass number as its step
            after[step] = {k: v.clone() for k, v in model.state_dict().items()}

    res = pretrain_bilm(model, _stream(), _stream(500, 1), cfg, log, device=CPU)
    assert (res.stop_reason, res.passes, res.best_pass) == ("plateau", 3, 2)
    assert any(not torch.equal(v, after[3][k]) for k, v in after[2].items())  # pass 3 moved
    for k, v in model.state_dict().items():
        assert torch.equal(v, after[2][k]), k
    # the perplexity reported is the restored weights' own, measured again
    val = make_windows(_stream(500, 1), 10)
    assert (res.val_perplexity_forward, res.val_perplexity_backward) == perplexity(model, val, CPU)


def test_min_gain_goes_on_while_passes_gain_enough_and_a_small_gain_keeps_the_last(monkeypatch):
    cfg = PretrainConfig(epochs=6, window=10, batch_size=16, lr=2e-2, val_tokens=500, min_gain=0.05)
    # gains 20 %, 10 %, then 2 %: the fourth pass is still the best, and the last one run
    _scripted_perplexity(monkeypatch, [100.0, 80.0, 72.0, 70.56])
    res = pretrain_bilm(_bilm(), _stream(), _stream(500, 1), cfg, device=CPU)
    assert (res.stop_reason, res.passes, res.best_pass) == ("plateau", 4, 4)
    # without min_gain every pass runs
    _scripted_perplexity(monkeypatch, [100.0, 80.0, 72.0, 70.56])
    every = PretrainConfig(**{**cfg.__dict__, "min_gain": 0.0, "epochs": 5})
    res = pretrain_bilm(_bilm(), _stream(), _stream(500, 1), every, device=CPU)
    assert (res.stop_reason, res.passes, res.best_pass) == ("epochs", 5, 5)


def test_a_run_stopped_on_a_plateau_resumes_as_stopped(tmp_path, monkeypatch):
    cfg = PretrainConfig(epochs=6, window=10, batch_size=16, lr=2e-2, val_tokens=500, min_gain=0.05)
    ckpt = tmp_path / "state.pt"
    _scripted_perplexity(monkeypatch, [100.0, 80.0, 90.0])
    first = _bilm()
    pretrain_bilm(first, _stream(), _stream(500, 1), cfg, checkpoint=ckpt, device=CPU)
    again = _bilm()
    res = pretrain_bilm(again, _stream(), _stream(500, 1), cfg, checkpoint=ckpt, device=CPU)
    assert (res.stop_reason, res.passes, res.best_pass) == ("plateau", 3, 2)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"min_gain": 1.0}, "min_gain"),
        ({"min_gain": -0.1}, "min_gain"),
        ({"max_steps": -1}, "max_steps"),
        ({"min_gain": 0.01, "world_size": 2, "batch_size": 16}, "world_size 1"),
    ],
)
def test_stopping_settings_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        PretrainConfig(**kw)
    if "world_size" not in kw:
        with pytest.raises(ValueError, match=f"adapt: .*{match}"):
            AdaptConfig(epochs=2, **kw)


def test_precision_resolves_per_machine_and_bad_names_raise():
    assert resolve_precision("auto", CPU) == ("bf16" if bf16_native(CPU) else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="fp16"):
        PretrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="fp16"):
        ClassifierConfig(precision="fp16")
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "speedup", "native"),
    [
        (True, True, 0.5, True),  # AMX: no timing needed
        (False, True, 1.8, True),  # AVX512-BF16 that pays (AMD Zen 5)
        (False, True, 0.6, False),  # AVX512-BF16 slower than float32 (Intel, AMX hidden)
        (False, False, 9.0, False),  # no native bf16: emulated
    ],
)
def test_auto_precision_picks_bf16_only_where_it_is_faster(
    monkeypatch, amx, avx512_bf16, speedup, native
):
    timed = []
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: timed.append(1) or speedup)
    assert bf16_native(CPU) is native
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert resolve_precision("bf16", CPU) == "bf16"  # a precision set by hand is kept
    assert bool(timed) == (avx512_bf16 and not amx)


def test_timing_bf16_leaves_the_seeded_generator_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    speedup = device.cpu_bf16_speedup.__wrapped__(64, 2)
    assert speedup > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_bf16_pretraining_learns_like_fp32():
    """Autocast keeps float32 weights and optimizer state: bf16 training reaches the same place."""
    ppl = {}
    for precision in ("fp32", "bf16"):
        cfg = PretrainConfig(
            epochs=3, window=10, batch_size=16, lr=2e-2, val_tokens=500, precision=precision
        )
        model = _bilm()
        res = pretrain_bilm(model, _stream(), _stream(500, 1), cfg, device=CPU)
        ppl[precision] = res.val_perplexity
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert ppl["bf16"] < 10 and abs(ppl["bf16"] - ppl["fp32"]) / ppl["fp32"] < 0.1, ppl


def test_ema_decay_warms_up_then_caps():
    d = [ema_decay(n) for n in range(0, 2000, 50)]
    assert ema_decay(0) == pytest.approx(0.1)
    assert all(x <= y for x, y in zip(d, d[1:], strict=False)) and d[-1] == EMA_DECAY


def _separable_store(n: int, seed: int) -> LayerStore:
    """Documents whose class is written in the mean of one feature: a head must learn it."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, n)
    labels = rng.integers(0, 3, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    feats = rng.normal(size=(offsets[-1], 3, 6)).astype(np.float16)
    for i in range(n):
        feats[offsets[i] : offsets[i + 1], :, labels[i]] += 2.0
    return LayerStore(feats, offsets, labels)


def _classifier(strategy: str = "wsum") -> tuple[ELMoClassifier, MixConfig, ClassifierConfig]:
    cfg = ClassifierConfig(
        hidden_dim=8, mlp_hidden=(8,), eval_every=19, patience=6, min_steps=0, max_steps=114,
        batch_size=16, lr=1e-2, dropout=0.1,
    )  # fmt: skip
    mix_cfg = MixConfig(strategy, num_layers=3, dim=6, seed=1)
    torch.manual_seed(0)
    return ELMoClassifier(cfg, build_mix(mix_cfg), 6, 3), mix_cfg, cfg


def test_layer_store_batches_cover_every_document_once():
    store = _separable_store(50, 0)
    seen = np.concatenate(list(store.batches(8, torch.Generator().manual_seed(0))))
    assert sorted(seen.tolist()) == list(range(50))
    layers, mask, tokens, labels = store.batch(np.array([0, 1, 2]))
    assert layers.shape[:2] == (3, 3) and layers.dtype == torch.float32  # (L, B, T, D)
    assert mask.sum(1).tolist() == np.diff(store.offsets)[:3].tolist()
    assert tokens.shape == mask.shape and labels.tolist() == store.labels[:3].tolist()


def test_a_batch_keeps_the_stored_values_exactly_and_pads_with_zeros():
    """Rows are gathered in the stored dtype before widening: float32 layers must not pass
    through float16 on the way."""
    store = _separable_store(6, 1)
    store.features = store.features.astype(np.float32) + np.float32(1e-4)  # not float16 values
    idx = np.array([4, 1])
    layers, mask, _, _ = store.batch(idx)
    for r, i in enumerate(idx):
        lo, hi = store.offsets[i], store.offsets[i + 1]
        assert torch.equal(
            layers[:, r, : hi - lo], torch.from_numpy(store.features[lo:hi]).permute(1, 0, 2)
        )
    assert not layers.permute(1, 2, 0, 3)[~mask].any()  # padding is zero


def test_batches_read_in_background_or_in_line_are_the_same_from_any_start(monkeypatch):
    store = _separable_store(40, 0)
    order = list(store.batches(8, torch.Generator().manual_seed(0)))
    for start in (0, 2, len(order)):
        ahead = list(prefetched(store, order, start, background=True))
        inline = list(prefetched(store, order, start, background=False))
        assert len(ahead) == len(inline) == len(order) - start
        for a, b in zip(ahead, inline, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # the reader thread only where it gets a core the compute threads leave free
    monkeypatch.setattr("os.cpu_count", lambda: torch.get_num_threads())
    assert not reader_has_core(torch.device("cpu"))
    assert reader_has_core(torch.device("cuda"))
    monkeypatch.setattr("os.cpu_count", lambda: torch.get_num_threads() + 1)
    assert reader_has_core(torch.device("cpu"))


@pytest.mark.parametrize("strategy", ["sum", "wsum", "function"])
def test_classifier_learns_and_keeps_best(strategy):
    model, _, cfg = _classifier(strategy)
    train, val = _separable_store(300, 1), _separable_store(100, 2)
    before = float((predict_proba(model, val, CPU).argmax(1) == val.labels).mean())
    hist = []
    res = train_classifier(model, train, val, cfg, lambda m, s: hist.append(m), device=CPU)
    after = float((predict_proba(model, val, CPU).argmax(1) == val.labels).mean())
    assert after == pytest.approx(res.best_val_accuracy)
    assert after > 0.9 > before
    assert res.best_val_accuracy == max(h["val_accuracy"] for h in hist)


def test_lr_decay_returns_to_the_best_weights_with_a_smaller_lr():
    model, _, cfg = _classifier("wsum")
    cfg = ClassifierConfig(**{**cfg.__dict__, "lr_decay": 0.5})
    train = _separable_store(200, 1)
    val = _separable_store(60, 2)
    val.labels[:] = np.random.default_rng(0).integers(0, 3, len(val.labels))  # val acc wanders
    hist: list[dict[str, float]] = []
    res = train_classifier(model, train, val, cfg, lambda m, s: hist.append(m), device=CPU)
    best = -1.0
    decays = 0
    for prev, nxt in zip(hist, hist[1:], strict=False):
        improved = prev["val_accuracy"] > best
        best = max(best, prev["val_accuracy"])
        assert nxt["lr"] == pytest.approx(prev["lr"] * (1.0 if improved else 0.5))
        decays += not improved
    assert decays >= 1 and hist[0]["lr"] == cfg.lr
    after = float((predict_proba(model, val, CPU).argmax(1) == val.labels).mean())
    assert after == pytest.approx(res.best_val_accuracy)


def test_warm_up_raises_the_lr_linearly_then_holds_it_and_lr_decay_scales_its_target():
    model, _, _ = _classifier("wsum")
    cfg = _budget(eval_every=1, patience=50, min_steps=0, max_steps=8, warmup_steps=4)
    hist: list[dict[str, float]] = []
    train_classifier(
        model, _separable_store(200, 1), _noise_val(), cfg, lambda m, s: hist.append(m), device=CPU
    )
    # validated after each step: the lr that step trained with
    assert [h["lr"] for h in hist] == pytest.approx(
        [cfg.lr * k / 4 for k in (1, 2, 3, 4, 4, 4, 4, 4)]
    )
    opt = Optimizers([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1}], 0.1, 0.0)
    opt.warm_up(0, 10)
    opt.scale_lr(0.5)  # a validation without a gain during warm-up: the target halves too
    opt.warm_up(9, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        _budget(warmup_steps=-1)


def test_selecting_on_loss_keeps_the_average_with_the_lowest_validation_loss():
    model, _, _ = _classifier("wsum")
    cfg = _budget(eval_every=1, patience=50, min_steps=0, max_steps=40, select_on="loss")
    hist: list[tuple[int, dict[str, float]]] = []
    res = train_classifier(
        model,
        _separable_store(200, 1),
        _noise_val(),
        cfg,
        lambda m, s: hist.append((s, m)),
        device=CPU,
    )
    losses = [m["val_loss"] for _, m in hist]
    best = int(np.argmin(losses))
    accs = [m["val_accuracy"] for _, m in hist]
    assert accs[best] < max(accs)  # noise labels: the two criteria keep different steps
    assert res.best_step == hist[best][0]
    assert res.best_val_accuracy == hist[best][1]["val_accuracy"]
    after = predict_proba(model, _noise_val(), CPU)  # the model holds the kept average
    assert validation_loss(after, _noise_val().labels) == pytest.approx(losses[best], rel=1e-5)


def test_validation_loss_is_the_mean_nll_and_select_on_is_checked():
    probs = np.array([[0.5, 0.5], [0.1, 0.9], [1.0, 0.0]])
    labels = np.array([0, 1, 1])  # the last one is certain and wrong: clipped, not infinite
    expected = -(np.log(0.5) + np.log(0.9) + np.log(1e-12)) / 3
    assert validation_loss(probs, labels) == pytest.approx(expected)
    with pytest.raises(ValueError, match="select_on must be accuracy or loss, got 'f1'"):
        _budget(select_on="f1")
    with pytest.raises(ValueError, match="patience_also_on must be '' or macro_f1, got 'f1'"):
        _budget(patience_also_on="f1")


def _budget(**kw: Any) -> ClassifierConfig:
    _, _, cfg = _classifier("wsum")
    return ClassifierConfig(**{**cfg.__dict__, **kw})


def _noise_val() -> LayerStore:
    """A validation split whose labels are noise: accuracy wanders, gains stop coming."""
    val = _separable_store(60, 2)
    val.labels[:] = np.random.default_rng(0).integers(0, 3, len(val.labels))
    return val


def test_the_budget_stops_on_patience_after_the_floor_and_says_why():
    model, _, _ = _classifier("wsum")
    cfg = _budget(eval_every=4, patience=1, min_steps=40, max_steps=400)
    steps: list[int] = []
    res = train_classifier(
        model, _separable_store(200, 1), _noise_val(), cfg, lambda m, s: steps.append(s), device=CPU
    )
    assert res.stop_reason == "patience" and 40 <= res.steps < 400
    assert steps == list(range(4, res.steps + 1, 4))  # validated on the cadence, in steps
    assert res.best_step in steps and res.epochs_run == pytest.approx(res.steps / 13)
    # no floor: the first validation without a gain ends it
    early = train_classifier(
        _classifier("wsum")[0], _separable_store(200, 1), _noise_val(),
        _budget(eval_every=4, patience=1, min_steps=0, max_steps=400), device=CPU,
    )  # fmt: skip
    assert early.steps < res.steps


def test_the_budget_caps_steps_and_minutes_with_a_last_validation():
    train, val = _separable_store(200, 1), _separable_store(60, 2)
    steps: list[int] = []
    res = train_classifier(
        _classifier("wsum")[0], train, val,
        _budget(eval_every=10, patience=50, min_steps=0, max_steps=25),
        lambda m, s: steps.append(s), device=CPU,
    )  # fmt: skip
    assert (res.stop_reason, res.steps, steps) == ("max_steps", 25, [10, 20, 25])
    timed = train_classifier(
        _classifier("wsum")[0], train, val,
        _budget(eval_every=10, patience=50, min_steps=0, max_steps=400, max_minutes=1e-9),
        device=CPU,
    )  # fmt: skip
    assert (timed.stop_reason, timed.steps) == ("max_minutes", 1)


def test_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 4, 300)
    p[:50] = y[:50]
    assert macro_f1(y, p, 6) == pytest.approx(f1_score(y, p, average="macro"))
    assert macro_f1(np.array([1, 1]), np.array([1, 1]), 3) == 1.0


def test_budget_settings_are_checked():
    with pytest.raises(ValueError, match="min_steps"):
        ClassifierConfig(min_steps=10, max_steps=5)
    with pytest.raises(ValueError, match="eval_every"):
        ClassifierConfig(eval_every=0)


def test_param_groups_scale_the_mix_and_the_token_embedding():
    cfg = ClassifierConfig(hidden_dim=4, mlp_hidden=(4,), token_embedding_dim=3)
    model = ELMoClassifier(cfg, build_mix(MixConfig("function", 3, 6)), 6, 3, vocab_size=20)
    groups = classifier_param_groups(model, 0.01, embedding_lr_scale=0.5)
    by_lr = {round(g["lr"], 6): g["params"] for g in groups}
    assert set(by_lr) == {0.01, 0.001, 0.005}  # rest, function mix (0.1x), embedding (0.5x)
    assert by_lr[0.005] == [model.embedding.weight]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_classifier_resume_matches_uninterrupted(tmp_path):
    train, val = _separable_store(200, 1), _separable_store(60, 2)
    model, _, cfg = _classifier()
    # 13 steps an epoch; the interrupted run stops at a validation step of the whole one
    cfg = ClassifierConfig(
        **{**cfg.__dict__, "eval_every": 10, "max_steps": 39, "checkpoint_every": 5}
    )
    train_classifier(model, train, val, cfg, device=CPU)
    ckpt = tmp_path / "c.pt"
    part, _, _ = _classifier()
    short = ClassifierConfig(**{**cfg.__dict__, "max_steps": 20})
    train_classifier(part, train, val, short, checkpoint=ckpt, device=CPU)
    resumed, _, _ = _classifier()
    train_classifier(resumed, train, val, cfg, checkpoint=ckpt, device=CPU)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_extract_layers_writes_each_document_in_place():
    m = _bilm().eval()
    docs = [[5, 6, 7], [8], [], [9, 10, 11, 12, 13]]
    lengths = doc_lengths(docs, max_len=4)
    assert lengths.tolist() == [3, 1, 1, 4]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out = np.zeros((offsets[-1], 3, 16), dtype=np.float16)
    extract_layers(m, docs, out, offsets, batch_size=2, device=CPU)
    alone = m(torch.tensor([[9, 10, 11, 12]]), torch.ones(1, 4, dtype=torch.bool)).layers
    got = torch.from_numpy(out[offsets[3] : offsets[4]].astype(np.float32)).permute(1, 0, 2)
    assert torch.allclose(got, alone[:, 0], atol=2e-3)


def test_a_store_keeps_layer_0_once_per_distinct_token_and_batches_every_layer():
    """layer_store_for (as the features stage) writes layers 1..L per token and layer 0 once per
    distinct token; its batches hold exactly the full extraction's L+1 layers."""
    m = _bilm().eval()
    docs = [[5, 6, 7, 5], [8], [], [9, 5, 6, 12, 13, 7]]
    store = layer_store_for(m, docs, LayersConfig(max_len=5, window=0, context=0))
    n_tok = int(store.offsets[-1])
    assert store.features.shape == (n_tok, 2, 16)  # contextual layers only
    assert store.static.shape == (8, 16)  # ids 1 (the empty doc), 5, 6, 7, 8, 9, 12, 13
    assert store.layer_shape == (3, 16)
    full = np.zeros((n_tok, 3, 16), dtype=np.float16)
    extract_layers(m, docs, full, store.offsets, device=CPU)
    np.testing.assert_array_equal(store.rows(0, n_tok), full)
    layers, mask, ids, _ = store.batch(np.array([3, 0, 2]))
    assert layers.shape == (3, 3, 5, 16) and ids[1, :4].tolist() == [5, 6, 7, 5]
    for r, i in enumerate([3, 0, 2]):
        lo, hi = store.offsets[i], store.offsets[i + 1]
        np.testing.assert_array_equal(
            layers[:, r, : hi - lo].permute(1, 0, 2).numpy(), full[lo:hi].astype(np.float32)
        )
        assert not mask[r, hi - lo :].any()


@pytest.mark.parametrize("length,window,context", [(1, 8, 2), (8, 8, 2), (9, 8, 2), (50, 12, 3)])
def test_window_pieces_keep_every_token_once_with_its_context(length, window, context):
    pieces = window_pieces(length, window, context)
    kept = [t for _, _, lo, hi in pieces for t in range(lo, hi)]
    assert kept == list(range(length))  # every token once, in order
    for start, stop, lo, hi in pieces:
        assert stop - start <= window and start <= lo < hi <= stop
        assert lo - start == min(context, lo)  # left context, fewer only at the start
        assert stop - hi == min(context, length - hi)  # right context, fewer only at the end
    if length <= window:
        assert pieces == [(0, length, 0, length)]


def test_window_pieces_refuse_a_window_without_room_for_its_context():
    with pytest.raises(ValueError, match="window 8 must exceed"):
        window_pieces(20, 8, 4)
    with pytest.raises(ValueError, match="window must be 0 or > 2 \\* context"):
        LayersConfig(window=8, context=4)


def test_windowed_extraction_places_each_piece_and_keeps_its_context(tmp_path):
    """A long document read in pieces: layer 0 (context-free) equals the whole-document run at
    every token, so each kept row lands in place; a contextual layer equals a run over the
    piece the token's window read, i.e. it had its left and right context."""
    m = _bilm().eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 40, 37).tolist(), [5, 6], rng.integers(4, 40, 20).tolist()]
    offsets = np.concatenate([[0], np.cumsum(doc_lengths(docs, max_len=64))])
    out = RowFile(tmp_path / "layers.npy", (int(offsets[-1]), 3, 16))
    extract_layers(m, docs, out, offsets, batch_size=2, device=CPU, window=12, context=3)
    out.close()
    got = RowFile(tmp_path / "layers.npy")
    assert got.shape == (offsets[-1], 3, 16) and len(got) == offsets[-1]
    doc = torch.tensor([docs[0]])
    whole = m(doc, torch.ones_like(doc, dtype=torch.bool)).layers[:, 0]  # (L+1, T, 2H)
    rows = torch.from_numpy(got[0:37].astype(np.float32)).permute(1, 0, 2)  # (L+1, T, 2H)
    assert torch.allclose(rows[0], whole[0], atol=2e-3)
    for start, stop, lo, hi in window_pieces(37, 12, 3):
        piece = doc[:, start:stop]
        ref = m(piece, torch.ones_like(piece, dtype=torch.bool)).layers[:, 0]
        assert torch.allclose(rows[:, lo:hi], ref[:, lo - start : hi - start], atol=2e-3)
    assert not torch.allclose(rows[1], whole[1], atol=2e-3)  # pieces, not the whole document
    assert np.array_equal(np.load(tmp_path / "layers.npy"), got[0 : len(got)])  # a real .npy


def test_row_file_reads_and_writes_row_ranges_only(tmp_path):
    f = RowFile(tmp_path / "x.npy", (5, 2, 3))
    f[1:3] = np.ones((2, 2, 3))
    with pytest.raises(ValueError, match="rows 0:2 take shape"):
        f[0:2] = np.ones((3, 2, 3))
    with pytest.raises(TypeError, match="contiguous row slices"):
        f[[0, 2]]
    assert f[0:5].sum() == 12 and f[1:2].shape == (1, 2, 3)


def test_checkpoints_round_trip(tmp_path):
    m = _bilm()
    v = Vocab.build([["a", "b", "a"]], VocabConfig(min_count=1))
    save_bilm(tmp_path / "b.pt", m, v)
    m2, v2 = load_bilm(tmp_path / "b.pt")
    assert v2 == v and m2.config == m.config
    assert all(
        torch.equal(a, b)
        for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True)
    )
    clf, mix_cfg, _ = _classifier("sum")
    save_classifier(tmp_path / "c.pt", clf, mix_cfg, 6, ["x", "y", "z"], LayersConfig())
    clf2, labels = load_classifier(tmp_path / "c.pt")
    assert labels == ["x", "y", "z"]
    x = _separable_store(4, 0).batch(np.arange(4))
    assert torch.equal(clf.eval()(x[0], x[1]), clf2(x[0], x[1]))


def test_token_embedding_is_concatenated_and_initialised_from_the_bilm(tmp_path):
    store = _separable_store(40, 3)
    store.tokens = np.random.default_rng(0).integers(1, 30, store.offsets[-1]).astype(np.int32)
    init = torch.randn(30, 12)
    cfg = ClassifierConfig(hidden_dim=8, mlp_hidden=(8,), token_embedding_dim=5, dropout=0.0)
    mix_cfg = MixConfig("function", 3, 6)
    clf = ELMoClassifier(cfg, build_mix(mix_cfg), 6, 3, vocab_size=30, init_embedding=init)
    assert torch.equal(clf.embedding.weight, init[:, :5])
    assert clf.rnn_forward[0].input_size == clf.rnn_backward[0].input_size == 6 + 5
    layers, mask, tokens, _ = store.batch(np.arange(4))
    out = clf(layers, mask, tokens)
    assert out.shape == (4, 3)
    out.sum().backward()
    assert clf.embedding.weight.grad is not None
    with pytest.raises(ValueError, match="pass tokens"):
        clf(layers, mask)
    save_classifier(tmp_path / "e.pt", clf, mix_cfg, 6, ["a", "b", "c"], LayersConfig())
    clf2, _ = load_classifier(tmp_path / "e.pt")
    assert torch.equal(clf.eval()(layers, mask, tokens), clf2(layers, mask, tokens))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_or_truncated_checkpoints_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"kind": "bilm", "x": _Evil()}))
    with pytest.raises(CheckpointError, match="unreadable or unsafe"):
        load_bilm(evil)
    good = tmp_path / "good.pt"
    save_bilm(good, _bilm(), Vocab.build([["a"]], VocabConfig(min_count=1)))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError):
        safe_load(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_load(tmp_path / "missing.pt")


def test_lazy_adam_is_adam_on_the_rows_a_step_touches():
    torch.manual_seed(0)
    a = torch.nn.Embedding(30, 6, sparse=True)
    b = torch.nn.Embedding(30, 6, sparse=True)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = (
        LazyAdam(a.parameters(), lr=0.05),
        torch.optim.SparseAdam(b.parameters(), lr=0.05),
    )
    start = a.weight.detach().clone()
    touched = torch.zeros(30, dtype=torch.bool)
    for step in range(5):
        ids = torch.randint(0, 20, (4, 3), generator=torch.Generator().manual_seed(step))
        touched[ids.unique()] = True
        for emb, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            emb(ids).pow(2).sum().backward()
            opt.step()
    # SparseAdam adds eps to the raw root, Adam (and LazyAdam) to the bias-corrected one
    assert torch.allclose(a.weight, b.weight, atol=1e-4)
    assert torch.equal(a.weight[~touched], start[~touched])  # rows never seen never move
    assert not torch.allclose(a.weight[touched], start[touched])
    # every row touched at every step: exactly torch's Adam
    c = torch.nn.Parameter(start.clone())
    d = torch.nn.Parameter(start.clone())
    opt_c, opt_d = LazyAdam([c], lr=0.05), torch.optim.Adam([d], lr=0.05)
    for _ in range(4):
        for p, opt in ((c, opt_c), (d, opt_d)):
            opt.zero_grad()
            torch.nn.functional.embedding(torch.arange(30), p, sparse=p is c).pow(
                3
            ).sum().backward()
            opt.step()
    assert torch.allclose(c, d, atol=1e-7)
    with pytest.raises(ValueError, match="sparse gradients"):
        dense = torch.nn.Parameter(torch.ones(3))
        dense.grad = torch.ones(3)
        LazyAdam([dense]).step()


def _token_store(n: int, seed: int) -> LayerStore:
    """Token-only documents (no stored layers) whose class is the word they repeat most."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 9, n)
    labels = rng.integers(0, 3, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(8, 40, offsets[-1]).astype(np.int32)
    for i in range(n):
        tokens[offsets[i] : offsets[i] + 3] = 4 + labels[i]
    return LayerStore(None, offsets, labels, tokens)


def _finetuned(**overrides):
    from elmo_core.classifier import FineTunedClassifier

    cfg = ClassifierConfig(
        hidden_dim=8, mlp_hidden=(8,), eval_every=15, patience=3, min_steps=0, max_steps=45,
        batch_size=16, lr=1e-2, dropout=0.0, finetune_bilm=True, bilm_lr_scale=0.5, bilm_lr_decay=2.0, **overrides,
    )  # fmt: skip
    bilm = _bilm().eval()
    torch.manual_seed(0)
    head = ELMoClassifier(cfg, build_mix(MixConfig("wsum", 3, 16)), 16, 3)
    return FineTunedClassifier(bilm, head), cfg


def test_finetuning_groups_lrs_by_biLM_layer_and_keeps_the_sparse_tables_frozen():
    model, cfg = _finetuned()
    groups = classifier_param_groups(model, 0.01)
    # LSTM layer 2, then layer 1 (E = D: no projection, so no token-encoder group)
    assert len(model.bilm_groups()) == 2
    assert [g["lr"] for g in groups[-2:]] == pytest.approx([0.005, 0.0025])
    grouped = {id(p) for g in groups for p in g["params"]}
    frozen = [model.bilm.embedding.weight, model.bilm.softmax.weight, model.bilm.softmax.bias]
    assert not grouped & {id(p) for p in frozen}
    model.unfreeze(1)
    top = {id(p) for p in model.bilm_groups()[0]}
    assert all(p.requires_grad == (id(p) in top) for p in model.bilm.parameters())


def test_finetuning_unfreezes_the_biLM_gradually_and_learns():
    model, cfg = _finetuned(unfreeze_every=1)
    start = {k: v.clone() for k, v in model.bilm.state_dict().items()}
    train, val = _token_store(240, 1), _token_store(80, 2)
    seen: list[dict[str, bool]] = []

    def log(m: dict, step: int) -> None:
        now = model.bilm.state_dict()
        seen.append({k: not torch.equal(now[k], start[k]) for k in start})

    res = train_classifier(model, train, val, cfg, log, device=CPU)
    # epoch 1: the head alone; epoch 2: + the top LSTM layer; epoch 3: + the layer below
    assert not any(seen[0].values())
    assert seen[1]["forward_lstms.1.weight_hh_l0"] and not seen[1]["forward_lstms.0.weight_hh_l0"]
    assert seen[2]["forward_lstms.0.weight_hh_l0"] and not seen[2]["embedding.weight"]
    assert res.best_val_accuracy > 0.5  # 3 classes: chance is 1/3
