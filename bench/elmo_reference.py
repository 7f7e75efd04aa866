"""The reference protocol of ELMo's original implementation on any folder of its test-fixture
form (``options.json``, ``lm_weights.hdf5``, ``lm_embeddings_sentences.json``,
``lm_embeddings_{0,1,2}.hdf5``; ``../shared/data/elmo_reference/bilm-tf`` is one): the model is
imported as ``elmo-news import-bilm`` does, then reads 10 batches of 3 sentences (batch i =
sentence i of each list), statefully, float32 on the CPU, as the original test does. Prints the
max abs difference of the top layer per list, the length and state checks, and last
``elmo_reference_max_abs_diff=<x>``.

    .venv/bin/python bench/elmo_reference.py --fixture ../shared/data/elmo_reference/bilm-tf [--out bench/results/elmo_reference.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import machine, write_report  # noqa: E402
from elmo_core.bilm import BiLM  # noqa: E402
from elmo_core.stateful import StatefulReader  # noqa: E402
from elmo_core.vocab import SPECIALS, Vocab  # noqa: E402
from storage.published_models import load_published  # noqa: E402

VOCAB = Vocab(SPECIALS, (1,) * len(SPECIALS))


def batch(model: BiLM, sentences: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Sentences -> tokens (B, T), mask (B, T), the character ids of their words."""
    ids, extra = VOCAB.encode_open(sentences)
    tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)  # (B, T)
    for r, row in enumerate(ids):
        tokens[r, : len(row)] = torch.tensor(row)
    return tokens, tokens != 0, model.extra_chars(extra)


def _states(reader: StatefulReader, row: int) -> list[torch.Tensor]:
    return [s[row].clone() for layers in reader.states.values() for hc in layers for s in hc]


@torch.no_grad()
def run_protocol(fixture: Path) -> dict[str, Any]:
    model, _ = load_published(fixture / "options.json", fixture / "lm_weights.hdf5")
    sentences = json.loads((fixture / "lm_embeddings_sentences.json").read_text())
    n_lists, n_batches = len(sentences), len(sentences[0])
    reader = StatefulReader(model, max_batch=n_lists + 1)
    diffs = [0.0] * n_lists
    lengths_ok = padding_zero = True
    files = [h5py.File(fixture / f"lm_embeddings_{k}.hdf5", "r") for k in range(n_lists)]
    for i in range(n_batches):
        words = [sentences[k][i].strip().split() for k in range(n_lists)]
        out = reader(*batch(model, words))
        lengths_ok &= out.mask.sum(1).tolist() == [len(w) for w in words]
        for k, w in enumerate(words):
            e = files[k][str(i)][...]  # (2, T, D): forward, backward
            want = np.concatenate([e[0], e[1]], axis=-1)
            got = out.layers[-1, k, : len(w)].numpy()  # the top layer, marks dropped
            diffs[k] = max(diffs[k], float(np.abs(got - want).max()))
            padding_zero &= not bool(out.layers[:, k, len(w) :].any())
    # the original's state checks: batches of n rows leave the spare row at zero; a smaller
    # batch keeps the states of the rows it does not fill
    spare_zero = all(float(s.abs().sum()) < 1e-7 for s in _states(reader, n_lists))
    kept = _states(reader, n_lists - 1)
    reader(*batch(model, [["a", "b", "c"]] * (n_lists - 1)))
    now = _states(reader, n_lists - 1)
    unfilled_kept = all(torch.equal(a, b) for a, b in zip(kept, now, strict=True))
    return {
        "max_abs_diff_per_list": diffs,
        "max_abs_diff": max(diffs),
        "lengths_ok": lengths_ok,
        "padding_zero": padding_zero,
        "spare_row_states_zero": spare_zero,
        "unfilled_row_states_kept": unfilled_kept,
        "batches": n_batches,
        "rows_per_batch": n_lists,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixture", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = run_protocol(args.fixture)
    report = {"command": " ".join(sys.argv), "machine": machine(), **res}
    headline = f"elmo_reference_max_abs_diff={res['max_abs_diff']:.3g}"
    if args.out:
        write_report(args.out, report, headline)
    else:
        print(json.dumps(report, indent=2))
        print(headline)


if __name__ == "__main__":
    main()
