import pytest

from elmo_core.text import normalize, tokenize
from elmo_core.vocab import SPECIALS, Vocab
from elmo_core.vocab_config import VocabConfig


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Wall St. Bears Claw Back #39;s", "Wall St. Bears Claw Back 's"),
        ("He said quot;hi quot;", 'He said "hi "'),
        ("a &lt;b&gt; c", "a c"),
        ("costs \\$5 for the\\band", "costs $5 for the band"),
        ("  many   spaces\n", "many spaces"),
        ("AT&amp;T", "AT&T"),
    ],
)
def test_normalize_undoes_ag_news_escapes(raw, expected):
    assert normalize(raw) == expected


def test_normalize_is_idempotent():
    s = "Reuters - Short-sellers, Wall Street #39;s dwindling\\band of ultra-cynics"
    assert normalize(normalize(s)) == normalize(s)


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("Wall St. Bears (Reuters) - U.S. oil at $40.5!") == [
        "wall", "st", ".", "bears", "(", "reuters", ")", "-", "u.s", ".", "oil", "at", "$",
        "40.5", "!",
    ]  # fmt: skip


def test_vocab_min_count_max_size_and_order():
    docs = [["a", "b", "b", "c"], ["b", "a", "d"]]
    v = Vocab.build(docs, VocabConfig(min_count=2, max_size=100))
    assert v.tokens == (*SPECIALS, "b", "a")
    assert v.counts[4:] == (3, 2)
    assert v.counts[1] == 2  # c and d became <unk>
    assert v.encode(["b", "zzz", "a"]) == [4, 1, 5]
    small = Vocab.build(docs, VocabConfig(min_count=1, max_size=5))
    assert small.tokens == (*SPECIALS, "b")


def test_vocab_unigram_never_samples_pad():
    v = Vocab.build([["x", "y", "x"]], VocabConfig(min_count=1))
    p = v.unigram()
    assert p[0] == 0 and abs(p.sum() - 1) < 1e-12


@pytest.mark.parametrize(
    ("kwargs", "needle"), [({"min_count": 0}, "min_count"), ({"max_size": 4}, "max_size")]
)
def test_vocab_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        VocabConfig(**kwargs)


def test_vocab_rejects_missing_specials():
    with pytest.raises(ValueError, match="must start with"):
        Vocab(tokens=("a", "b", "c", "d"), counts=(1, 1, 1, 1))


def test_vocab_extend_appends_unseen_frequent_words_and_keeps_old_ids():
    v = Vocab(SPECIALS + ("the", "cat"), (0, 5, 2, 2, 9, 4))
    g = v.extend({"the": 100, "dog": 3, "emu": 3, "yak": 1, "ant": 7}, min_count=2, max_new=2)
    assert g.tokens == (*v.tokens, "ant", "dog")  # most frequent first, ties by token; cap 2
    assert g.counts == (*v.counts, 7, 3)
    assert g.encode(["cat", "dog", "yak"]) == [5, 7, 1]
    assert v.extend({"yak": 1}, min_count=2, max_new=5) == v
    with pytest.raises(ValueError, match="min_count"):
        v.extend({}, min_count=0, max_new=1)
