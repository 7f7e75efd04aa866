"""Layer extraction: the frozen biLM run over documents (long ones in overlapping windows,
batched by length) into float16 rows, and layer 0 once per distinct token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from elmo_core.bilm import BiLM
from elmo_core.callbacks import ProgressFn, no_progress
from elmo_core.device import autocast, pick_device
from elmo_core.vocab import Vocab


def doc_lengths(docs: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    """Tokens kept per document: at least 1 (an empty document becomes one <unk>), at most max_len."""
    return np.array([min(max(len(d), 1), max_len) for d in docs], dtype=np.int64)


def encode_for(
    model: BiLM, vocab: Vocab, docs: Sequence[Sequence[str]]
) -> tuple[list[list[int]], list[str]]:
    """Token documents -> (ids, out-of-vocabulary words) as the biLM reads them: a char
    encoder gets every unseen word under its own id (>= V, see ``Vocab.encode_open``), a word
    encoder reads it as <unk> (no extra words)."""
    if model.open_vocabulary:
        return vocab.encode_open(docs)
    return [vocab.encode(d) for d in docs], []


def vocab_ids(docs: Sequence[Sequence[int]], offsets: np.ndarray, vocab_size: int) -> np.ndarray:
    """(N_tok,) int32 vocabulary ids of the rows a layer store keeps (``offsets`` from
    doc_lengths); ids of extra words (>= V) become <unk>, as a task embedding of V rows reads."""
    tokens = np.ones(int(offsets[-1]), dtype=np.int32)  # an empty document: one <unk>
    for i, d in enumerate(docs):
        ids = d[: offsets[i + 1] - offsets[i]]
        tokens[offsets[i] : offsets[i] + len(ids)] = ids
    tokens[tokens >= vocab_size] = 1
    return tokens


def window_pieces(length: int, window: int, context: int) -> list[tuple[int, int, int, int]]:
    """How a document of ``length`` tokens is cut for the biLM: (start, stop, keep_from, keep_to)
    per piece; the biLM reads tokens [start, stop) and the rows [keep_from, keep_to) of the
    document are taken from it. Pieces read at most ``window`` tokens; every kept token has
    ``context`` tokens of left and right context inside its piece (fewer only at the document's
    own edges), so no token sits at an artificial window edge. window = 0 reads documents whole.
    """
    if window == 0 or length <= window:
        return [(0, length, 0, length)]
    core = window - 2 * context
    if core < 1:
        raise ValueError(f"window {window} must exceed 2 * context ({2 * context})")
    out = []
    for lo in range(0, length, core):
        hi = min(length, lo + core)
        out.append((max(0, lo - context), min(length, hi + context), lo, hi))
    return out


@torch.no_grad()
def extract_layers(
    model: BiLM,
    docs: Sequence[Sequence[int]],
    out: Any,
    offsets: np.ndarray,
    batch_size: int = 64,
    device: torch.device | None = None,
    progress: ProgressFn = no_progress,
    window: int = 0,
    context: int = 0,
    extra_words: Sequence[str] = (),
    contextual_only: bool = False,
    precision: str = "fp32",
) -> None:
    """Run the frozen biLM over documents and write their layers into ``out``.

    ``precision``: fp32 (the stored features then do not depend on the machine's bf16) or
    bf16 / auto autocast (the speed benchmark measures both).

    ``extra_words``: the out-of-vocabulary words that ids >= V in ``docs`` stand for
    (``encode_for``; char encoder only).

    out: (N_tok, L+1, 2H) float16 rows (an array, a memmap or a ``RowFile``), document i at rows
    offsets[i]:offsets[i+1] (from doc_lengths); with ``contextual_only`` (N_tok, L, 2H), layers
    1..L: layer 0 depends on the token alone, and ``static_layer`` gives it once per distinct
    token instead of once per occurrence. Long documents are read in overlapping pieces
    (``window_pieces``); pieces are batched by length so padding stays small, and a batch
    holds at most ``batch_size * max(window, 64)`` tokens so long documents stay bounded in
    memory.
    """
    device = device or pick_device()
    model.to(device).eval()
    extra = model.extra_chars(extra_words)  # (W, C) or None, on the model's device
    lengths = np.diff(offsets)
    pieces = [  # (doc, start, stop, keep_from, keep_to)
        (d, *p)
        for d in range(len(lengths))
        for p in window_pieces(int(lengths[d]), window, context)
    ]
    pieces.sort(key=lambda p: p[2] - p[1])  # stable: by piece length
    budget = batch_size * max(window, 64)
    batches: list[list[tuple[int, int, int, int, int]]] = [[]]
    for p in pieces:
        t = p[2] - p[1]
        if batches[-1] and (len(batches[-1]) >= batch_size or (len(batches[-1]) + 1) * t > budget):
            batches.append([])
        batches[-1].append(p)
    done_docs = 0
    for batch in batches:
        t = max(p[2] - p[1] for p in batch)
        tokens = torch.zeros(len(batch), t, dtype=torch.long)  # (B, T)
        for r, (d, start, stop, _, _) in enumerate(batch):
            ids = list(docs[d])[start:stop] or [1]  # an empty document: one <unk>
            tokens[r, : len(ids)] = torch.tensor(ids)
        mask = tokens != 0  # (B, T)
        with autocast(device, precision):
            layers = model(tokens.to(device), mask.to(device), extra).layers  # (L+1, B, T, 2H)
        layers = layers[int(contextual_only) :]  # (L' = L+1 or L, B, T, 2H)
        layers = layers.permute(1, 2, 0, 3).to("cpu", torch.float16).numpy()  # (B, T, L', 2H)
        for r, (d, start, _, lo, hi) in enumerate(batch):
            out[offsets[d] + lo : offsets[d] + hi] = layers[r, lo - start : hi - start]
            done_docs += hi == lengths[d]
        progress(min(done_docs, len(lengths)), len(lengths), {})


def open_ids(docs: Sequence[Sequence[int]], offsets: np.ndarray) -> np.ndarray:
    """(N_tok,) int32 ids of the rows a layer store keeps as the biLM read them (``encode_for``:
    extra words keep their ids >= V, so a char biLM's layer 0 can spell them)."""
    return vocab_ids(docs, offsets, np.iinfo(np.int32).max)


@torch.no_grad()
def static_layer(
    model: BiLM,
    ids: np.ndarray,
    extra_words: Sequence[str] = (),
    device: torch.device | None = None,
    chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Layer 0 (the context-free ``[x; x]``) of the distinct tokens among ``ids`` (N_tok,):
    returns (table (U, 2H) float16, rows (N_tok,) int32 with table[rows[j]] = token j's layer 0).

    A store keeps this instead of layer 0 per occurrence: a third of its bytes at L = 2."""
    device = device or pick_device()
    model.to(device).eval()
    extra = model.extra_chars(extra_words)  # (W, C) or None
    uniq, rows = np.unique(ids, return_inverse=True)  # (U,), (N_tok,)
    out = np.zeros((len(uniq), model.output_dim), dtype=np.float16)  # (U, 2H)
    for lo in range(0, len(uniq), chunk):
        tok = torch.from_numpy(uniq[lo : lo + chunk].astype(np.int64)).to(device)[None]  # (1, U')
        with autocast(device, "fp32"):  # as extract_layers: the machine's bf16 plays no part
            x = model._embed(tok, extra)[0]  # (U', D)
        out[lo : lo + len(x)] = torch.cat([x, x], dim=-1).to("cpu", torch.float16).numpy()
    return out, rows.astype(np.int32)
