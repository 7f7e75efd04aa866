import numpy as np
import pytest
import torch

from elmo_core.bilm import BiLM
from elmo_core.bilm_checkpoint import load_bilm, save_bilm
from elmo_core.bilm_config import BiLMConfig
from elmo_core.char_encoder import CHAR_BOW, CHAR_EOW, char_ids
from elmo_core.dropout import locked_dropout
from elmo_core.extraction import encode_for
from elmo_core.layers_config import LayersConfig
from elmo_core.lstm import clipped_lstm, reverse_padded
from elmo_core.sampled_softmax import SampledNLL, SampledSoftmax
from elmo_core.vocab import Vocab
from serving.inference import layer_store_for

CFG = BiLMConfig(
    vocab_size=50, embedding_dim=6, hidden_dim=8, num_layers=2, dropout=0.0, num_samples=10
)


WHOLE16 = LayersConfig(max_len=16, window=0, context=0)  # documents read whole


def _model(cfg: BiLMConfig = CFG) -> BiLM:
    torch.manual_seed(0)
    return BiLM(cfg).eval()


def test_forward_returns_all_layers_and_mask():
    m = _model()
    tokens = torch.randint(4, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    tokens[~mask] = 0
    out = m(tokens, mask)
    assert out.layers.shape == (3, 3, 7, 16)  # (L+1, B, T, 2H)
    assert torch.equal(out.mask, mask)
    assert torch.all(out.layers[:, 1, 5:] == 0)  # padding zeroed in every layer
    x = out.layers[0]
    assert torch.allclose(x[..., :8], x[..., 8:])  # layer 0 = [x; x]


def test_padding_does_not_change_real_positions():
    m = _model()
    seq = torch.randint(4, 50, (1, 5))
    alone = m(seq, torch.ones(1, 5, dtype=torch.bool)).layers
    padded = torch.cat([seq, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    batched = m(padded, mask).layers[:, :, :5]
    assert torch.allclose(alone, batched, atol=1e-6)


def test_directions_see_only_their_side():
    m = _model()
    a = torch.randint(4, 50, (1, 6))
    b = a.clone()
    b[0, 5] = (a[0, 5] + 1 - 4) % 46 + 4  # change the last token only
    mask = torch.ones(1, 6, dtype=torch.bool)
    la, lb = m(a, mask).layers, m(b, mask).layers
    # forward halves at t < 5 cannot see token 5; backward halves at t < 5 can
    assert torch.allclose(la[1:, 0, :5, :8], lb[1:, 0, :5, :8])
    assert not torch.allclose(la[2, 0, :5, 8:], lb[2, 0, :5, 8:])


def test_reverse_padded_is_an_involution():
    x = torch.arange(12.0).view(2, 6, 1)
    lengths = torch.tensor([6, 4])
    r = reverse_padded(x, lengths)
    assert r[1, :, 0].tolist() == [9.0, 8.0, 7.0, 6.0, 10.0, 11.0]
    assert torch.equal(reverse_padded(r, lengths), x)


def test_reverse_padded_backward_is_the_same_permutation():
    x = torch.randn(3, 5, 2, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])
    weights = torch.randn(3, 5, 2)
    (reverse_padded(x, lengths) * weights).sum().backward()
    assert x.grad is not None
    # each position's gradient is the weight of the position it moved to: the same reversal
    assert torch.equal(x.grad, reverse_padded(weights, lengths))
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])  # (B, T) without a feature dimension
    assert reverse_padded(ids, torch.tensor([3, 4])).tolist() == [[3, 2, 1, 0], [7, 6, 5, 4]]


def test_exact_nll_matches_log_softmax_reference():
    sm = SampledSoftmax(20, 4, num_samples=0).eval()
    h = torch.randn(7, 4)
    y = torch.randint(1, 20, (7,))
    ref = -torch.log_softmax(h @ sm.weight.t() + sm.bias.squeeze(-1), -1)[torch.arange(7), y]
    assert torch.allclose(sm.nll(h, y, chunk=3), ref, atol=1e-6)


def test_sampled_loss_trains_lstms_and_touches_only_sampled_rows():
    m = _model(BiLMConfig(vocab_size=500, embedding_dim=8, hidden_dim=8, num_samples=16))
    m.train()
    tokens = torch.randint(4, 500, (4, 10))
    loss = m.lm_loss(tokens, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert m.forward_lstms[0].weight_hh_l0.grad.abs().sum() > 0
    assert m.backward_lstms[1].weight_hh_l0.grad.abs().sum() > 0
    g = m.softmax.weight.grad
    assert g.is_sparse
    touched = set(g.coalesce().indices()[0].tolist())
    assert set(tokens.flatten().tolist()) <= touched and len(touched) < 500
    samples, _ = m.softmax.draw(torch.Generator().manual_seed(0))  # the step's negatives
    assert touched == set(tokens.flatten().tolist()) | set(samples.tolist())
    assert m.embedding.weight.grad.is_sparse


def _naive_sampled_loss(sm: SampledSoftmax, h, targets, generator):
    """The sampled softmax written the plain way: [true; negatives] logits, hits masked, CE."""
    samples, tries = sm.draw(generator)

    def log_q(ids):
        return torch.log1p(-torch.pow(1 - sm.proposal[ids].double(), tries)).float()

    w, b = sm.weight, sm.bias.squeeze(-1)
    true = (h * w[targets]).sum(-1) + b[targets] - log_q(targets)  # (N,)
    neg = h @ w[samples].t() + b[samples] - log_q(samples)  # (N, S)
    neg = neg.masked_fill(targets[:, None] == samples[None, :], -1e4)
    logits = torch.cat([true[:, None], neg], 1)
    return torch.nn.functional.cross_entropy(logits, torch.zeros_like(targets))


def test_draw_gives_exactly_num_samples_distinct_ids_and_counts_the_draws():
    sm = SampledSoftmax(300, 4, num_samples=50)
    sm.set_proposal(torch.from_numpy(np.r_[0.0, 1.0 / np.arange(1, 300)]))  # Zipf: repeats
    ids, tries = sm.draw(torch.Generator().manual_seed(0))
    assert len(ids) == 50 and len(torch.unique(ids)) == 50 and bool((ids > 0).all())
    assert torch.equal(ids, ids.sort().values) and tries > 50  # Zipf draws repeat
    again, tries2 = sm.draw(torch.Generator().manual_seed(0))
    assert torch.equal(ids, again) and tries == tries2  # seeded
    # the kept ids are the first 50 distinct ones of the same generator's draws
    first = torch.multinomial(sm.proposal, 100, True, generator=torch.Generator().manual_seed(0))
    seen: list[int] = []
    for i in first[:tries].tolist():
        if i not in seen:
            seen.append(i)
    assert sorted(seen) == ids.tolist() and first[tries - 1].item() not in seen[:-1]
    small = SampledSoftmax(6, 4, num_samples=50)  # only 5 drawable ids (not <pad>)
    assert len(small.draw(torch.Generator().manual_seed(1))[0]) == 5


def test_sampled_loss_and_gradients_match_a_naive_reference():
    torch.manual_seed(0)
    sm = SampledSoftmax(40, 5, num_samples=25)
    sm.set_proposal(torch.rand(40))
    h = torch.randn(30, 5, requires_grad=True)
    targets = torch.randint(1, 40, (30,))  # 40 words, 25 draws: accidental hits are certain
    loss = sm(h, targets, torch.Generator().manual_seed(4))
    (gh,) = torch.autograd.grad(loss, h, retain_graph=True)
    loss.backward()
    gw, gb = sm.weight.grad.to_dense(), sm.bias.grad.to_dense()
    sm.zero_grad()
    h2 = h.detach().requires_grad_()
    w2, b2 = sm.weight.detach().clone().requires_grad_(), sm.bias.detach().clone().requires_grad_()
    ref_sm = SampledSoftmax(40, 5, num_samples=25)
    ref_sm.proposal.copy_(sm.proposal)
    ref_sm.weight, ref_sm.bias = torch.nn.Parameter(w2), torch.nn.Parameter(b2)
    ref = _naive_sampled_loss(ref_sm, h2, targets, torch.Generator().manual_seed(4))
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(gh, h2.grad, atol=1e-6)
    assert torch.allclose(gw, ref_sm.weight.grad, atol=1e-6)
    assert torch.allclose(gb, ref_sm.bias.grad, atol=1e-6)


def test_sampled_loss_under_bf16_autocast_stays_close_to_the_float32_reference():
    """bf16 matmuls and products, float32 loss: loss and gradients within bf16 rounding."""
    torch.manual_seed(0)
    sm = SampledSoftmax(200, 16, num_samples=60)
    sm.set_proposal(torch.rand(200))
    h = torch.randn(64, 16)
    targets = torch.randint(1, 200, (64,))
    hb = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sm(hb.bfloat16(), targets, torch.Generator().manual_seed(1))
    loss.backward()
    assert loss.dtype == torch.float32 and sm.weight.grad.dtype == torch.float32
    gw = sm.weight.grad.to_dense()
    sm.zero_grad()
    h32 = h.clone().requires_grad_()
    ref = _naive_sampled_loss(sm, h32, targets, torch.Generator().manual_seed(1))
    ref.backward()
    assert abs(float(loss) - float(ref)) < 0.02 * float(ref)
    assert torch.allclose(hb.grad, h32.grad, atol=2e-3, rtol=0.05)
    assert torch.allclose(gw, sm.weight.grad.to_dense(), atol=2e-3, rtol=0.05)


def test_sampled_nll_is_stable_for_huge_logits_and_scales_its_gradient():
    """h = I makes the sampled logits w_s^T + c_s and the true ones c_t: +-1000 stays finite,
    also where a sampled logit exceeds the true one by 1000 (exp overflows: the row-max shift)."""
    true = torch.tensor([1000.0, -1000.0, -1000.0])
    sampled = torch.tensor([[0.0, 999.0, 3.0], [-999.0, -1000.0, 2.0], [0.0, 1.0, -5.0]])

    def inputs():
        h = torch.eye(3, requires_grad=True)
        w_t = torch.zeros(3, 3, requires_grad=True)
        c_t = true.clone().requires_grad_()
        w_s = sampled.t().clone().requires_grad_()  # (S, D): h @ w_s.t() == sampled
        c_s = torch.zeros(3, requires_grad=True)
        return h, w_t, c_t, w_s, c_s

    got = inputs()
    no_hits = torch.zeros(0, dtype=torch.long)
    loss = SampledNLL.apply(*got, no_hits, no_hits)
    ref_in = inputs()
    h, w_t, c_t, w_s, c_s = ref_in
    logits = torch.cat([((h * w_t).sum(-1) + c_t)[:, None], h @ w_s.t() + c_s], 1)
    ref = torch.nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(loss) and torch.allclose(loss, ref, atol=1e-4)  # fp32 ulp at 1000
    grads = torch.autograd.grad(3.0 * loss, got)
    for g, r in zip(grads, torch.autograd.grad(3.0 * ref, ref_in), strict=True):
        assert torch.allclose(g, r, atol=1e-5)


def test_sampled_nll_masks_accidental_hits():
    """A sampled column listed as a hit gets no probability mass and no gradient."""
    h, w_t, c_t = torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1)
    w_s = torch.tensor([[1.0], [5.0]], requires_grad=True)  # column 1 would dominate
    c_s = torch.zeros(2)
    one = torch.tensor([0])
    masked = SampledNLL.apply(h, w_t, c_t, w_s, c_s, one, torch.tensor([1]))
    (gw,) = torch.autograd.grad(masked, w_s)
    assert torch.allclose(masked, torch.log1p(torch.tensor(1.0)) - 0.0)  # log(e + e) - 1
    assert gw[1, 0] == 0.0 and gw[0, 0] != 0.0


def test_lm_loss_equals_the_loss_of_both_directions_in_original_order():
    """lm_loss keeps the backward LM in reversed time; the loss is that of the states() view."""
    m = _model(
        BiLMConfig(
            vocab_size=60,
            embedding_dim=6,
            hidden_dim=6,
            dropout=0.0,
            num_samples=20,
        )
    )
    m.train()
    tokens = torch.randint(4, 60, (3, 8))
    loss = m.lm_loss(tokens, torch.Generator().manual_seed(2))
    _, fwd, bwd = m.states(tokens)
    f, b = fwd[-1][:, :-1].reshape(-1, 6), bwd[-1][:, 1:].reshape(-1, 6)  # (N, H) each
    targets = torch.cat([tokens[:, 1:].reshape(-1), tokens[:, :-1].reshape(-1)])
    ref = m.softmax(torch.cat([f, b]), targets, torch.Generator().manual_seed(2))
    assert torch.allclose(loss, ref, atol=1e-6)


def test_sampled_loss_approaches_full_softmax_ordering():
    """A word the model prefers has lower sampled loss than one it does not, as in the full loss."""
    sm = SampledSoftmax(100, 4, num_samples=50)
    sm.set_proposal(torch.from_numpy(np.r_[0.0, np.ones(99) / 99]))
    h = torch.zeros(1, 4)
    h[0, 0] = 5.0
    with torch.no_grad():
        sm.weight.zero_()
        sm.weight[7, 0] = 1.0
    g = torch.Generator().manual_seed(1)
    good = sm(h, torch.tensor([7]), g)
    bad = sm(h, torch.tensor([8]), torch.Generator().manual_seed(1))
    assert good < bad


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("hidden_dim", 0),
        ("dropout", 1.0),
        ("num_samples", -1),
        ("projection_dim", 256),  # must be narrower than hidden_dim (256)
        ("cell_clip", -1.0),
    ],
)
def test_bilm_config_rejects_bad_values(field, value):
    kwargs = {"vocab_size": 10, field: value}
    with pytest.raises(ValueError, match=field):
        BiLMConfig(**kwargs)


def test_locked_dropout_shares_one_mask_over_time_and_is_identity_in_eval():
    torch.manual_seed(0)
    x = torch.ones(4, 9, 32)
    y = locked_dropout(x, 0.5, training=True)
    assert torch.equal(y, y[:, :1].expand_as(y))  # (B, 1, D) mask broadcast over T
    assert set(y.unique().tolist()) <= {0.0, 2.0}  # kept units rescaled by 1 / (1 - p)
    assert 0 < (y == 0).float().mean() < 1
    assert torch.equal(locked_dropout(x, 0.5, training=False), x)
    assert torch.equal(locked_dropout(x, 0.0, training=True), x)


PROJ = BiLMConfig(
    vocab_size=50,
    embedding_dim=6,
    hidden_dim=12,
    projection_dim=4,
    num_layers=2,
    dropout=0.0,
    num_samples=10,
)


def test_projection_lstm_layers_are_2p_wide_and_train():
    m = _model(PROJ).train()
    assert m.forward_lstms[0].weight_hr_l0.shape == (4, 12)  # (P, H) projection of H cells
    tokens = torch.randint(4, 50, (3, 7))
    out = m(tokens, torch.ones(3, 7, dtype=torch.bool))
    assert out.layers.shape == (3, 3, 7, 8) and m.output_dim == 8  # (L+1, B, T, 2P)
    loss = m.lm_loss(tokens)
    loss.backward()
    assert m.forward_lstms[1].weight_hr_l0.grad.abs().sum() > 0
    assert m.softmax.weight.shape == (50, 4)  # the softmax works in P


@pytest.mark.parametrize("proj", [0, 4])
def test_clipped_lstm_without_clipping_is_the_fused_lstm(proj):
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(5, 12, batch_first=True, proj_size=proj)
    x = torch.randn(3, 9, 5)
    assert torch.allclose(clipped_lstm(lstm, x, 0.0, 0.0), lstm(x)[0], atol=1e-6)


def test_clipping_bounds_cells_and_outputs_at_every_step():
    torch.manual_seed(2)
    lstm = torch.nn.LSTM(5, 12, batch_first=True, proj_size=4)
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(20.0)  # saturating weights: unclipped outputs exceed the clip
    x = torch.randn(2, 6, 5) * 5
    free = clipped_lstm(lstm, x, 0.0, 0.0)
    clipped = clipped_lstm(lstm, x, 0.5, 0.3)
    assert free.abs().max() > 0.3 and clipped.abs().max() <= 0.3 + 1e-6
    m = _model(BiLMConfig(**{**PROJ.__dict__, "cell_clip": 3.0, "proj_clip": 3.0}))
    out = m(torch.randint(4, 50, (2, 5)), torch.ones(2, 5, dtype=torch.bool))
    assert out.layers[1].abs().max() <= 3.0 + 1e-6  # layer 1: the clipped output itself
    assert out.layers[2].abs().max() <= 6.0 + 1e-6  # layer 2: clipped output + residual


# --------------------------------------------------------------------------- character encoder

CHAR = BiLMConfig(
    vocab_size=12, embedding_dim=6, hidden_dim=8, dropout=0.0, num_samples=4,
    token_encoder="char", char_dim=4, char_filters=(3, 3, 4, 2), max_chars=12,
)  # fmt: skip
WORDS = ("<pad>", "<unk>", "<s>", "</s>", "a", "the", "cat", "dog", "sat", "on", "mat", "fell")


def _char_model(cfg: BiLMConfig = CHAR) -> BiLM:
    torch.manual_seed(0)
    m = BiLM(cfg)
    m.set_words(WORDS[: cfg.vocab_size])
    return m


def test_char_ids_frame_bytes_with_word_boundaries_and_cut_long_words():
    ids = char_ids(["ab", "é", "abcdefgh"], 6)
    assert ids[0].tolist() == [CHAR_BOW, 97 + 3, 98 + 3, CHAR_EOW, 0, 0]
    assert ids[1].tolist()[:4] == [CHAR_BOW, 0xC3 + 3, 0xA9 + 3, CHAR_EOW]  # UTF-8 bytes
    assert ids[2].tolist() == [CHAR_BOW, *(c + 3 for c in b"abcd"), CHAR_EOW]


def test_char_encoder_vectors_do_not_depend_on_the_batch():
    enc = _char_model().char_encoder
    alone = enc(char_ids(["cat"], 12))
    beside_long = enc(char_ids(["catastrophe", "cat"], 12))[1:]
    torch.testing.assert_close(alone, beside_long)


def test_unseen_words_get_their_own_layer_0_vectors_through_the_embedding_path():
    """What predict/embed read: encode_for + layer_store_for. A char biLM gives two different
    unseen words different layer-0 vectors; a word biLM reads both as <unk> (the same)."""
    docs_tokens = [["the", "zebra", "sat"], ["the", "quokka", "sat"]]
    vocab = Vocab(WORDS, (1,) * len(WORDS))
    for model, differ in [(_char_model(), True), (_model(CFG), False)]:
        model.eval()
        docs, extra = encode_for(model, vocab, docs_tokens)
        if model.open_vocabulary:
            assert extra == ["zebra", "quokka"] and docs[1][1] == len(WORDS) + 1
        store = layer_store_for(model, docs, WHOLE16, extra_words=extra)
        zebra, quokka = store.rows(1, 2)[0, 0], store.rows(4, 5)[0, 0]  # layer 0
        assert bool(np.any(zebra != quokka)) is differ
        assert store.tokens[1] == 1  # the task embedding still reads <unk> (V rows)
        # a seen word reads the same whatever the unseen words around it
        np.testing.assert_array_equal(store.rows(0, 1)[0, 0], store.rows(3, 4)[0, 0])


def test_char_bilm_trains_its_cnn_has_no_word_table_and_round_trips(tmp_path):
    m = _char_model()
    assert m.embedding is None and m.sparse_parameters() == [m.softmax.weight, m.softmax.bias]
    m.train()
    m.lm_loss(torch.randint(1, 12, (3, 7))).backward()
    assert m.char_encoder.conv.weight.grad.abs().sum() > 0
    masked = m.char_encoder.conv.weight.grad * (1 - m.char_encoder.tap_mask)
    assert not masked.any()  # a width-1 filter never learns taps 2..K
    assert m.char_encoder.char_embedding.weight.grad[0].abs().sum() == 0  # padding char
    assert m.input_vectors().shape == (12, 6) and not m.input_vectors()[0].any()
    save_bilm(tmp_path / "c.pt", m, Vocab(WORDS, (1,) * 12))
    back, vocab = load_bilm(tmp_path / "c.pt")
    assert torch.equal(back.word_chars, m.word_chars) and vocab.tokens == WORDS
    tokens = torch.tensor([[5, 6, 7, 0]])
    m.eval()
    torch.testing.assert_close(back(tokens, tokens != 0).layers, m(tokens, tokens != 0).layers)


def test_char_encoder_rejects_bad_settings_and_ids_outside_the_words():
    with pytest.raises(ValueError, match="token_encoder"):
        BiLMConfig(vocab_size=5, token_encoder="bytes")
    with pytest.raises(ValueError, match="char_filters"):
        BiLMConfig(vocab_size=5, token_encoder="char", char_filters=(4, 0))
    with pytest.raises(ValueError, match="set_words got 3"):
        _char_model().set_words(["a", "b", "c"])
    m = _char_model().eval()
    with pytest.raises(ValueError, match="token id 12"):
        m(torch.tensor([[5, 12]]), torch.ones(1, 2, dtype=torch.bool))


def test_new_words_start_from_unk_and_leave_every_old_word_unchanged():
    m = _model()
    share = torch.log(torch.tensor([0.5, 0.25]))
    g = m.with_new_words(["newa", "newb"], share).eval()
    assert g.config.vocab_size == 52 and g.embedding.weight.shape == (52, 6)
    tokens = torch.tensor([[4, 9, 1, 7], [5, 6, 0, 0]])
    mask = tokens != 0
    torch.testing.assert_close(g(tokens, mask).layers, m(tokens, mask).layers)  # old ids: same
    as_new = tokens.where(tokens != 1, torch.tensor(50))  # <unk> -> the first new word
    torch.testing.assert_close(g(as_new, mask).layers, m(tokens, mask).layers)  # starts as <unk>
    h = torch.randn(3, 8)
    old = h @ m.softmax.weight.T + m.softmax.bias.T  # (N, V) logits
    new = h @ g.softmax.weight.T + g.softmax.bias.T  # (N, V+2)
    torch.testing.assert_close(new[:, :50], old)
    torch.testing.assert_close(new[:, 50:], old[:, 1:2] + share)
    assert g.softmax.weight.requires_grad and g.embedding.sparse
    with pytest.raises(ValueError, match="log_share"):
        m.with_new_words(["a"], torch.zeros(2))


def test_char_bilm_new_words_read_their_own_spelling():
    m = _char_model().eval()
    g = m.with_new_words(["zebra", "yak"], torch.zeros(2)).eval()
    assert g.word_chars.shape[0] == 14
    torch.testing.assert_close(g.word_chars[12:], char_ids(["zebra", "yak"], m.config.max_chars))
    vecs = g.input_vectors()
    assert not torch.allclose(vecs[12], vecs[13])  # two new words, two vectors
    torch.testing.assert_close(vecs[:12], m.input_vectors())
