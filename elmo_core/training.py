"""The biLM's training loop and layer extraction, and the helpers every loop shares.

The classifier's loop is in ``elmo_core.classifier_training``: a separate module, so editing it
changes the classifier stage's code version and not the biLM's.

Loops report through a ``log_metrics(metrics, step)`` callback and never touch tracking systems.
They checkpoint atomically (model, optimizers, RNG state, position) and resume from a checkpoint
file when one is given and present, so a killed run continues where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from elmo_core.bilm import BiLM
from elmo_core.checkpoint import CheckpointError, atomic_save, safe_load
from elmo_core.config import PretrainConfig, check_precision
from elmo_core.distributed import (
    SINGLE,
    DistContext,
    all_reduce_sparse_rows,
    barrier,
    check_batch,
    ddp_loss,
    gather_objects,
    shard_batch,
)
from elmo_core.optim import LazyAdam
from elmo_core.vocab import Vocab

LogFn = Callable[[dict[str, float], int], None]
# progress(done, total, info): units done of total in the current stretch (steps of an epoch,
# documents of a split), info = what a display shows beside it (epoch, tokens/s). Called often:
# the receiver throttles; the loops only count
ProgressFn = Callable[[int, int, dict[str, float]], None]


def no_log(metrics: dict[str, float], step: int) -> None:
    return None


def no_progress(done: int, total: int, info: dict[str, float]) -> None:
    return None


def report_epoch_progress(
    progress: ProgressFn, done: int, total: int, epoch: int, epochs: int, tokens: int, t0: float
) -> None:
    """The training loops' progress call: step ``done`` of ``total`` in epoch ``epoch``
    (0-based) of ``epochs``, and this epoch's tokens/s since ``t0``."""
    rate = tokens / max(time.perf_counter() - t0, 1e-9)
    progress(done, total, {"epoch": epoch + 1, "epochs": epochs, "tokens_per_s": rate})


def pick_device(prefer: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


def bf16_native(device: torch.device) -> bool:
    """Does ``device`` run bf16 matmuls natively? CUDA with bf16 support; a CPU with AMX or
    AVX512-BF16 (there an LSTM step runs ~2-4x faster in bf16; elsewhere bf16 is emulated, slow)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(
            bool(getattr(cpu, name, lambda: False)())
            for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        )
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device runs it natively, else ``fp32``."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto") -> Any:
    """bf16 autocast (weights and optimizer state stay float32) or nothing for ``fp32``.

    Both are deterministic on a CPU: the same machine repeats a run bit for bit.
    """
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def rng_state() -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])


def try_resume(path: Path | None, kind: str) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        state = safe_load(path)
    except CheckpointError:
        path.unlink(missing_ok=True)  # corrupt: never loaded, rebuilt from scratch
        return None
    return state if state.get("kind") == kind else None


# --------------------------------------------------------------------------- biLM pretraining


def make_windows(ids: np.ndarray, window: int) -> torch.Tensor:
    """A token stream (N,) -> non-overlapping windows (W, T) (the tail that does not fill one is dropped)."""
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"token stream of {len(ids)} ids is shorter than one window of {window}")
    return torch.from_numpy(np.ascontiguousarray(ids[: n * window], dtype=np.int64)).view(n, window)


class TokenWindows:
    """Training windows (W, T) over one or more token-id shards (numpy arrays, typically
    ``np.load(..., mmap_mode="r")``): nothing is copied until a batch is asked for, so a corpus
    of any size costs its page cache, not RAM. Windows never cross a shard's end (each shard's
    tail that does not fill one is dropped)."""

    def __init__(self, shards: Sequence[np.ndarray], window: int) -> None:
        self.shards = [s for s in shards if len(s) >= window]
        self.window = window
        counts = np.array([len(s) // window for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            total = sum(len(s) for s in shards)
            raise ValueError(f"token stream of {total} ids is shorter than one window of {window}")
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # (S+1,) first window per shard

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        """Windows ``idx`` (B,) → ids (B, T) int64."""
        idx_np = idx.numpy()
        shard = np.searchsorted(self.starts, idx_np, side="right") - 1
        out = np.empty((len(idx_np), self.window), dtype=np.int64)  # (B, T)
        for r, (s, w) in enumerate(zip(shard, idx_np - self.starts[shard], strict=True)):
            a = int(w) * self.window
            out[r] = self.shards[s][a : a + self.window]
        return torch.from_numpy(out)


SHUFFLE_BLOCK = 1 << 20  # windows per shuffle block: an epoch's order costs 8 MiB, any corpus size


def epoch_order(
    n: int, seed: int, epoch: int, block: int = SHUFFLE_BLOCK
) -> Iterator[torch.Tensor]:
    """The windows of one epoch in a seeded random order, block by block, in bounded memory:
    the full blocks of ``block`` windows in random order (the partial one last), each
    shuffled within. Up to ``block`` windows this is exactly ``randperm(n)``."""
    g = torch.Generator().manual_seed(seed * 1009 + epoch)
    if n <= block:
        yield torch.randperm(n, generator=g)
        return
    n_full = n // block
    for b in [*torch.randperm(n_full, generator=g).tolist(), *([n_full] if n % block else [])]:
        size = min(block, n - b * block)
        yield torch.randperm(size, generator=g) + b * block


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, start: int = 0, block: int = SHUFFLE_BLOCK
) -> Iterator[torch.Tensor]:
    """Batches of window indices of one epoch (``ceil(n / batch_size)`` of them), from batch
    ``start`` on: a resumed run gets the batches an uninterrupted one would have."""
    pending: list[torch.Tensor] = []
    have = 0
    skip = start * batch_size  # windows before the first batch wanted
    for part in epoch_order(n, seed, epoch, block):
        if skip >= len(part):
            skip -= len(part)
            continue
        part = part[skip:]
        skip = 0
        pending.append(part)
        have += len(part)
        while have >= batch_size:
            cat = torch.cat(pending)
            yield cat[:batch_size]
            rest = cat[batch_size:]
            pending, have = [rest], len(rest)
    if have:
        yield torch.cat(pending)


def bilm_optimizers(model: BiLM, lr: float) -> list[torch.optim.Optimizer]:
    """Row-sparse Adam for the embedding and softmax rows, fused Adam for the LSTMs."""
    return [LazyAdam(model.sparse_parameters(), lr=lr), adam(dense_parameters(model), lr=lr)]


def bilm_step(
    model: BiLM,
    opts: Sequence[torch.optim.Optimizer],
    x: torch.Tensor,
    generator: torch.Generator,
    precision: str,
    dense: Sequence[torch.Tensor],
    clip_norm: float,
    loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    after_backward: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One biLM training step on windows x (B, T): sampled-softmax loss under ``precision``,
    backward, gradient-norm clip of the ``dense`` parameters, every optimizer. Returns the loss.

    The pretraining loop and bench/bilm_throughput.py both run this, so the benchmark times
    exactly the pipeline's step. Data-parallel training passes ``loss_fn`` (the DDP-wrapped
    loss) and ``after_backward`` (the all-reduce of the row-sparse gradients)."""
    with autocast(x.device, precision):
        loss = (loss_fn or model.lm_loss)(x, generator)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:  # data-parallel: the row-sparse gradients' all-reduce
        after_backward()
    # clip_grad_norm_, but the gradients are rescaled only when the norm is over the limit
    # (clip_grad_norm_ multiplies every gradient by a coefficient clamped to 1 on every step)
    grads = [p.grad for p in dense if p.grad is not None]
    total = nn.utils.get_total_norm(grads, foreach=True)
    if float(total) > clip_norm:
        nn.utils.clip_grads_with_norm_(dense, clip_norm, total, foreach=True)
    for o in opts:
        o.step()
    return loss


def dense_parameters(model: BiLM) -> list[nn.Parameter]:
    """Trainable parameters with dense gradients (the LSTMs, the projection): the clipped ones."""
    sparse = {id(p) for p in model.sparse_parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in sparse]


def adam(params: Any, **kwargs: Any) -> torch.optim.Adam:
    """torch's Adam, fused into one kernel per step (CPU and CUDA): ~6x cheaper than the
    per-tensor loop on this CPU for the biLM's LSTM weights; same update rule."""
    return torch.optim.Adam(params, fused=True, **kwargs)


@torch.no_grad()
def perplexity(
    model: BiLM, windows: torch.Tensor, device: torch.device, batch: int = 64
) -> tuple[float, float]:
    """Exact (full-softmax) perplexity of the forward and backward LMs over windows (W, T)."""
    was_training = model.training
    model.eval()
    f_sum = b_sum = 0.0
    n = 0
    for i in range(0, len(windows), batch):
        with autocast(device, "fp32"):  # exact: full softmax in float32
            f, b = model.exact_nll(windows[i : i + batch].to(device))
        f_sum += float(f.double().sum())
        b_sum += float(b.double().sum())
        n += f.numel()
    model.train(was_training)
    return math.exp(f_sum / max(n, 1)), math.exp(b_sum / max(n, 1))


@dataclass
class PretrainResult:
    steps: int
    tokens: int
    seconds: float
    val_perplexity_forward: float
    val_perplexity_backward: float

    @property
    def val_perplexity(self) -> float:
        return math.sqrt(self.val_perplexity_forward * self.val_perplexity_backward)


def pretrain_bilm(
    model: BiLM,
    train_ids: np.ndarray | TokenWindows,
    val_ids: np.ndarray,
    config: PretrainConfig,
    log_metrics: LogFn = no_log,
    checkpoint: Path | None = None,
    device: torch.device | None = None,
    log_every: int = 50,
    progress: ProgressFn = no_progress,
    dist_ctx: DistContext = SINGLE,
) -> PretrainResult:
    """Train the biLM on a token stream (an id array, or ``TokenWindows`` over memory-mapped
    shards); resumes from ``checkpoint`` if it holds a run in progress.

    Epoch e visits the windows in the order of a generator seeded by (seed, e), and negatives come
    from a generator whose state is checkpointed, so a resumed run repeats an uninterrupted one.

    Under ``dist_ctx`` (torchrun) every rank runs this with the same arguments: each takes its
    slice of every global batch, gradients are averaged (DDP + the sparse rows' all-gather),
    and only rank 0 logs and writes the checkpoint (which every rank then resumes from; it
    records the world size, and a different one is refused).
    """
    device = device or pick_device()
    ctx = dist_ctx
    check_batch(config.batch_size, ctx)
    torch.manual_seed(config.seed + ctx.rank)  # dropout masks differ per rank, as per window
    model.to(device).train()
    if not ctx.is_main:
        log_metrics, progress, checkpoint_out = no_log, no_progress, None
    else:
        checkpoint_out = checkpoint
    train_w = (
        train_ids
        if isinstance(train_ids, TokenWindows)
        else TokenWindows([np.asarray(train_ids)], config.window)
    )
    val_w = make_windows(val_ids, config.window)
    opts = bilm_optimizers(model, config.lr)
    neg_gen = torch.Generator(device=model.softmax.proposal.device).manual_seed(config.seed + 1)
    epoch, batch_i, step, tokens, seconds = 0, 0, 0, 0, 0.0
    state = try_resume(checkpoint, "bilm-train")
    if state is not None:
        saved_world = int(state.get("world_size", 1))
        if saved_world != ctx.world_size:
            raise ValueError(
                f"{checkpoint} was written by {saved_world} rank(s), this run has "
                f"{ctx.world_size}: resume with the same world size, or delete it to start over"
            )
        model.load_state_dict(state["model"])
        for o, s in zip(opts, state["optimizers"], strict=True):
            o.load_state_dict(s)
        neg_gen.set_state(state["neg_gen"])
        set_rng_state(state["rng_ranks"][ctx.rank] if "rng_ranks" in state else state["rng"])
        epoch, batch_i, step = state["epoch"], state["batch"], state["step"]
        tokens, seconds = state["tokens"], state["seconds"]
        log_metrics({"resumed_from_step": step}, step)

    def save() -> None:
        if checkpoint is None:
            return
        rngs = gather_objects(rng_state(), ctx)  # a collective: every rank takes part
        if checkpoint_out is not None:
            atomic_save(
                {
                    "kind": "bilm-train",
                    "model": model.state_dict(),
                    "optimizers": [o.state_dict() for o in opts],
                    "neg_gen": neg_gen.get_state(),
                    "rng": rngs[0],
                    "rng_ranks": rngs,
                    "world_size": ctx.world_size,
                    "epoch": epoch,
                    "batch": batch_i,
                    "step": step,
                    "tokens": tokens,
                    "seconds": seconds,
                },
                checkpoint_out,
            )
        barrier(ctx)  # no rank reads on before the checkpoint is complete

    dense = dense_parameters(model)
    loss_fn, after_backward = None, None
    if ctx.active:
        sparse = model.sparse_parameters()
        loss_fn = ddp_loss(model, sparse, ctx)
        after_backward = lambda: all_reduce_sparse_rows(sparse, ctx)  # noqa: E731
    done = False
    ppl = (float("nan"), float("nan"))
    while epoch < config.epochs and not done:
        n_batches = -(-len(train_w) // config.batch_size)
        batches = epoch_batches(len(train_w), config.batch_size, config.seed, epoch, batch_i)
        t0, run_loss, run_n = time.perf_counter(), 0.0, 0
        t_epoch, tokens_epoch = time.perf_counter(), 0
        while batch_i < n_batches:
            if config.max_steps and step >= config.max_steps:
                done = True  # position is kept as is: a longer run resumes from here
                break
            x = shard_batch(train_w.get(next(batches)), ctx).to(device)  # (B / ranks, T)
            loss = bilm_step(
                model,
                opts,
                x,
                neg_gen,
                config.precision,
                dense,
                config.clip_norm,
                loss_fn,
                after_backward,
            )
            batch_i += 1
            step += 1
            tokens += x.numel() * ctx.world_size
            run_loss += float(loss.detach())
            run_n += 1
            tokens_epoch += x.numel() * ctx.world_size
            report_epoch_progress(
                progress, batch_i, n_batches, epoch, config.epochs, tokens_epoch, t_epoch
            )
            if step % log_every == 0:
                dt = time.perf_counter() - t0
                seconds += dt
                log_metrics(
                    {
                        "train_loss": run_loss / run_n,
                        "tokens_per_s": run_n * x.numel() * ctx.world_size / dt,
                        "epoch": epoch,
                    },
                    step,
                )
                t0, run_loss, run_n = time.perf_counter(), 0.0, 0
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save()
        seconds += time.perf_counter() - t0
        if ctx.is_main:  # the others wait at the checkpoint's barrier
            ppl = perplexity(model, val_w, device)
        log_metrics(
            {
                "val_perplexity": math.sqrt(ppl[0] * ppl[1]),
                "val_perplexity_forward": ppl[0],
                "val_perplexity_backward": ppl[1],
            },
            epoch + 1,
        )
        if not done:
            epoch, batch_i = epoch + 1, 0
        save()
    if math.isnan(ppl[0]) and ctx.is_main:  # resumed from a finished run
        ppl = perplexity(model, val_w, device)
    model.eval()
    return PretrainResult(step, tokens, seconds, ppl[0], ppl[1])


# --------------------------------------------------------------------------- layer extraction


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
) -> None:
    """Run the frozen biLM over documents and write their layers into ``out``.

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
        with autocast(device, "fp32"):  # stored features do not depend on the machine's bf16
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


class RowFile:
    """A (N, ...) float16 ``.npy`` file read and written by row ranges with pread / pwrite.

    The stored layers of a large dataset are many GB: a memory map of them counts every page
    it touched in the process's resident memory, these reads go through the page cache only,
    so the classifier's memory stays bounded by its batches."""

    def __init__(self, path: Path, shape: tuple[int, ...] | None = None) -> None:
        self.path = Path(path)
        if shape is not None:  # create: header, then the file extended to its full size
            self.shape = tuple(int(x) for x in shape)
            self.dtype = np.dtype(np.float16)
            with open(self.path, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f,
                    {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                     "shape": self.shape},
                )  # fmt: skip
                self.header = f.tell()
                f.truncate(self.header + int(np.prod(self.shape)) * self.dtype.itemsize)
            self._fd = os.open(self.path, os.O_RDWR)
        else:
            # the header only: a map that is never read adds nothing to resident memory
            m = np.load(self.path, mmap_mode="r")
            if not m.flags.c_contiguous:
                raise ValueError(f"{self.path}: Fortran-ordered arrays are not supported")
            self.shape, self.dtype, self.header = tuple(m.shape), m.dtype, int(m.offset)
            del m
            self._fd = os.open(self.path, os.O_RDONLY)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _range(self, key: slice) -> tuple[int, int]:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"RowFile takes contiguous row slices, got {key!r}")
        lo, hi, _ = key.indices(self.shape[0])
        return lo, max(lo, hi)

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi = self._range(key)
        raw = os.pread(self._fd, (hi - lo) * self.row_bytes, self.header + lo * self.row_bytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape(hi - lo, *self.shape[1:])

    def __setitem__(self, key: slice, value: np.ndarray) -> None:
        lo, hi = self._range(key)
        data = np.ascontiguousarray(value, dtype=self.dtype)
        if data.shape != (hi - lo, *self.shape[1:]):
            raise ValueError(
                f"rows {lo}:{hi} take shape {(hi - lo, *self.shape[1:])}, got {data.shape}"
            )
        os.pwrite(self._fd, data.tobytes(), self.header + lo * self.row_bytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


# --------------------------------------------------------------------------- classifier


@dataclass
class LayerStore:
    """Precomputed biLM layers of a document set, flat over tokens (no padding stored).

    With ``static`` set, ``features`` holds the contextual layers 1..L only and layer 0 (the
    biLM's context-free token vector) comes from ``static[static_rows]``: one row per
    distinct token instead of one per occurrence."""

    # (N_tok, L+1, D) float16 (or (N_tok, L, D) with ``static``): an array, a memmap or a
    # RowFile; None: tokens only (fine-tuning)
    features: Any
    offsets: np.ndarray  # (N+1,) int64 row offsets per document
    labels: np.ndarray  # (N,) int64 class ids (or -1 when unknown)
    tokens: np.ndarray | None = None  # (N_tok,) int32 vocabulary ids of the same tokens
    static: np.ndarray | None = None  # (U, D) float16 layer 0 of each distinct token
    static_rows: np.ndarray | None = None  # (N_tok,) int32 row of static per token

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def layer_shape(self) -> tuple[int, int]:
        """(L+1, D) of every token's layers, layer 0 included however it is stored."""
        _, n, d = self.features.shape
        return n + (self.static is not None), d

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Tokens lo..hi -> their layers (hi-lo, L+1, D) float16, layer 0 included."""
        x = np.asarray(self.features[lo:hi])  # (n, L or L+1, D)
        if self.static is None:
            return x
        first = self.static[self.static_rows[lo:hi]][:, None]  # (n, 1, D)
        return np.concatenate([first, x], axis=1)  # (n, L+1, D)

    def batch(
        self, idx: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Documents idx -> layers (L, B, T, D) float32 (None without features), mask (B, T)
        bool, token ids (B, T) (zeros when the store has none), labels (B,)."""
        lens = self.offsets[idx + 1] - self.offsets[idx]
        t = int(lens.max())
        mask = torch.from_numpy(np.arange(t)[None, :] < lens[:, None])  # (B, T)
        ids = np.zeros((len(idx), t), dtype=np.int64)  # (B, T)
        if self.tokens is not None:
            for r, i in enumerate(idx):
                ids[r, : lens[r]] = self.tokens[self.offsets[i] : self.offsets[i + 1]]
        labels = torch.from_numpy(self.labels[idx])
        if self.features is None:  # tokens only: a fine-tuned biLM computes the layers
            return None, mask, torch.from_numpy(ids), labels
        n_layers, d = self.layer_shape
        x = np.zeros((len(idx), t, n_layers, d), dtype=np.float32)  # (B, T, L, D)
        first = int(self.static is not None)  # layer 0 from the table, the rest from features
        for r, i in enumerate(idx):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            x[r, : lens[r], first:] = self.features[lo:hi]
            if first:
                x[r, : lens[r], 0] = self.static[self.static_rows[lo:hi]]
        layers = torch.from_numpy(x).permute(2, 0, 1, 3)  # (L, B, T, D)
        return layers, mask, torch.from_numpy(ids), labels

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[np.ndarray]:
        """Length-bucketed batches of document indices; shuffled (batches and members) if a generator is given."""
        lens = np.diff(self.offsets)
        if generator is None:
            order = np.argsort(lens, kind="stable")
        else:
            noise = torch.rand(len(lens), generator=generator).numpy()
            order = np.lexsort((noise, lens))  # by length, random among equal lengths
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if generator is not None:
            perm = torch.randperm(len(chunks), generator=generator).tolist()
            chunks = [chunks[p] for p in perm]
        yield from chunks


# --------------------------------------------------------------------------- inference


def layer_store_for(
    model: BiLM,
    docs: Sequence[Sequence[int]],
    max_len: int,
    labels: np.ndarray | None = None,
    device: torch.device | None = None,
    window: int = 0,
    context: int = 0,
    extra_words: Sequence[str] = (),
) -> LayerStore:
    """In-memory LayerStore of documents (ids, from ``encode_for``): the same float16 layers
    (layer 0 once per distinct token), batching and truncation as the pipeline's
    layer-extraction stage, so predictions reproduce the evaluated ones."""
    offsets = np.concatenate([[0], np.cumsum(doc_lengths(docs, max_len))]).astype(np.int64)
    out = np.zeros((int(offsets[-1]), model.config.num_layers, model.output_dim), np.float16)
    extract_layers(
        model, docs, out, offsets, device=device, window=window, context=context,
        extra_words=extra_words, contextual_only=True,
    )  # fmt: skip
    static, rows = static_layer(model, open_ids(docs, offsets), extra_words, device)
    tokens = vocab_ids(docs, offsets, model.config.vocab_size)
    if labels is None:
        labels = np.full(len(docs), -1, dtype=np.int64)
    return LayerStore(out, offsets, labels, tokens, static, rows)
