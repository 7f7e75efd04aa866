"""ELMo's published form (options.json + weights.hdf5, as bilm-tf and AllenNLP read them) to
this biLM and back: the options as a ``BiLMConfig``, the weights as a state dict.

Arrays only; reading and writing the files is ``storage.elmo_files``. The facts of the layout
(from bilm-tf's model and data code): character embeddings without the all-zero row 0;
``CNN/W_cnn_i`` (1, width, char_dim, filters) for the i-th (width, filters) pair;
``CNN_high_i/{W,b}_{carry,transform}`` with ``x @ W``, the carry gate a sigmoid, the
transform a relu; ``CNN_proj/{W,b}_proj``; per direction (``RNN_0`` forward, ``RNN_1``
backward) and layer ``.../Cell{layer}/LSTMCell/{W_0, B, W_P_0}``: W_0 (input + P, 4H) over
[input; previous output], gates in TensorFlow's order (i, j, f, o), and TensorFlow's LSTM
cell adds 1 to the forget gate's bias at run time."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from elmo_core.bilm_config import BiLMConfig
from elmo_core.char_encoder import (
    CHAR_BOW,
    CHAR_EOW,
    CHAR_PAD,
    ELMO_BOW,
    ELMO_EOW,
    ELMO_NUM_CHARS,
    ELMO_PAD,
    NUM_CHARS,
)

FORGET_BIAS = 1.0  # TensorFlow's LSTMCell default, added to the stored forget-gate bias
HINTS = "elmo_news"  # options.json key for what ELMo's schema cannot say (other tools ignore it)


class PublishedFormatError(ValueError):
    """Options or weights that do not describe one ELMo biLM; the message names the entry."""


def _cell(direction: int, layer: int) -> str:
    return f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"


def config_from_options(options: Mapping[str, Any]) -> BiLMConfig:
    """A published options.json -> the BiLMConfig that computes what it describes."""
    try:
        lstm, cnn = options["lstm"], options["char_cnn"]
        hidden, proj = int(lstm["dim"]), int(lstm["projection_dim"])
        filters = [(int(w), int(n)) for w, n in cnn["filters"]]
        hints = dict(options.get(HINTS, {}))
        config = BiLMConfig(
            vocab_size=4,  # the specials: published files carry no word vocabulary or softmax
            embedding_dim=proj,
            hidden_dim=hidden,
            num_layers=int(lstm.get("n_layers", 1)),
            dropout=0.0,
            num_samples=0,
            projection_dim=proj if proj < hidden else 0,
            cell_clip=float(lstm.get("cell_clip") or 0.0),
            proj_clip=float(lstm.get("proj_clip") or 0.0),
            token_encoder="char",
            char_dim=int(cnn["embedding"]["dim"]),
            char_filters=tuple(n for _, n in filters),
            char_highway=int(cnn.get("n_highway") or 0),
            max_chars=int(cnn["max_characters_per_token"]),
            char_ids=str(hints.get("char_ids", "elmo")),
            char_activation=str(cnn["activation"]),
            residual=bool(lstm["use_skip_connections"]),
            sentence_marks=bool(hints.get("sentence_marks", True)),
            lm_head=False,
        )
    except KeyError as e:
        raise PublishedFormatError(f"options: missing entry {e}") from e
    except (TypeError, ValueError) as e:
        raise PublishedFormatError(f"options: {e}") from e
    if [w for w, _ in filters] != list(range(1, len(filters) + 1)):
        raise PublishedFormatError(
            f"options: char_cnn.filters widths {[w for w, _ in filters]} are not 1, 2, ..., K"
        )
    if int(cnn.get("n_characters", ELMO_NUM_CHARS)) not in (ELMO_NUM_CHARS - 1, ELMO_NUM_CHARS):
        raise PublishedFormatError(
            f"options: char_cnn.n_characters {cnn['n_characters']} is not ELMo's 261 / 262"
        )
    if sum(n for _, n in filters) == proj:
        raise PublishedFormatError("options: filters equal to projection_dim (no CNN_proj)")
    return config


def _lstm_options(config: BiLMConfig) -> dict[str, Any]:
    return {
        "dim": config.hidden_dim,
        "projection_dim": config.projection_dim or config.hidden_dim,
        "n_layers": config.num_layers,
        "cell_clip": config.cell_clip or None,
        "proj_clip": config.proj_clip or None,
        "use_skip_connections": config.residual,
    }


def options_from_config(config: BiLMConfig) -> dict[str, Any]:
    """A BiLMConfig -> the options.json that describes it: ELMo's char_cnn form for a char
    encoder, bilm-tf's token-input form (no char_cnn; the token vectors in a separate
    embedding file) for a word encoder. What ELMo's schema cannot say (our compact character
    ids, reading without sentence marks) goes under ``elmo_news``, which bilm-tf and AllenNLP
    ignore."""
    hints = {"char_ids": config.char_ids, "sentence_marks": config.sentence_marks}
    if config.token_encoder != "char":
        return {"lstm": _lstm_options(config), HINTS: {**hints, "token_input": True}}
    return {
        "lstm": _lstm_options(config),
        "char_cnn": {
            "embedding": {"dim": config.char_dim},
            "filters": [[k + 1, n] for k, n in enumerate(config.char_filters)],
            "n_highway": config.char_highway,
            "n_characters": ELMO_NUM_CHARS,
            "max_characters_per_token": config.max_chars,
            "activation": config.char_activation,
        },
        HINTS: hints,
    }


def config_from_token_options(options: Mapping[str, Any], vocab_size: int) -> BiLMConfig:
    """bilm-tf's token-input options (an LSTM section, no char_cnn) and the size of its
    vocabulary -> a word-encoder BiLMConfig whose table is the published token vectors."""
    try:
        lstm = options["lstm"]
        hidden, proj = int(lstm["dim"]), int(lstm["projection_dim"])
        hints = dict(options.get(HINTS, {}))
        return BiLMConfig(
            vocab_size=vocab_size,
            embedding_dim=proj,
            hidden_dim=hidden,
            num_layers=int(lstm.get("n_layers", 1)),
            dropout=0.0,
            num_samples=0,
            projection_dim=proj if proj < hidden else 0,
            cell_clip=float(lstm.get("cell_clip") or 0.0),
            proj_clip=float(lstm.get("proj_clip") or 0.0),
            token_encoder="word",
            residual=bool(lstm["use_skip_connections"]),
            sentence_marks=bool(hints.get("sentence_marks", True)),
            lm_head=False,
        )
    except KeyError as e:
        raise PublishedFormatError(f"options: missing entry {e}") from e
    except (TypeError, ValueError) as e:
        raise PublishedFormatError(f"options: {e}") from e


def _gates(x: torch.Tensor) -> torch.Tensor:
    """Swap the middle two gate blocks along dim 0: TensorFlow's (i, j, f, o) <-> torch's
    (i, f, g, o) (the permutation is its own inverse)."""
    i, a, b, o = x.chunk(4, 0)
    return torch.cat([i, b, a, o])


# compact character id -> the ELMo id (model side, +1 form) whose row it becomes on export
def _compact_to_elmo_rows() -> torch.Tensor:
    rows = torch.empty(NUM_CHARS, dtype=torch.long)
    rows[CHAR_PAD], rows[CHAR_BOW], rows[CHAR_EOW] = ELMO_PAD, ELMO_BOW, ELMO_EOW
    rows[3:] = torch.arange(256) + 1
    return rows


class _Weights:
    """The weight file's arrays, each checked for presence and shape as it is read."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.arrays:
            raise PublishedFormatError(f"weights: missing dataset {name}")
        a = np.asarray(self.arrays[name], dtype=np.float32)
        if a.shape != shape:
            raise PublishedFormatError(
                f"weights: dataset {name} has shape {a.shape}, the options need {shape}"
            )
        return torch.from_numpy(a.copy())


def state_from_published(
    arrays: Mapping[str, np.ndarray], config: BiLMConfig, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The weight file's arrays -> ``state`` (a fresh BiLM(config)'s state dict: what the
    file does not hold, the softmax and the vocabulary's spellings, is kept from it)."""
    w = _Weights(arrays)
    out = dict(state)
    if config.token_encoder == "char":
        out.update(_char_state(w, config))
    else:  # bilm-tf's token-input form: the token vectors, one row per vocabulary word
        out["embedding.weight"] = w("embedding", (config.vocab_size, config.embedding_dim))
    d, h = config.projection_dim or config.hidden_dim, config.hidden_dim
    for direction, stack in enumerate(("forward_lstms", "backward_lstms")):
        for layer in range(config.num_layers):
            cell, name = _cell(direction, layer), f"{stack}.{layer}"
            kernel = _gates(w(f"{cell}/W_0", (d + d, 4 * h)).t())  # (4H, I + P), torch gates
            b = _gates(w(f"{cell}/B", (4 * h,)))
            b[h : 2 * h] += FORGET_BIAS
            out[f"{name}.weight_ih_l0"], out[f"{name}.weight_hh_l0"] = kernel.split(d, 1)
            out[f"{name}.bias_ih_l0"], out[f"{name}.bias_hh_l0"] = b, torch.zeros(4 * h)
            if config.projection_dim:
                out[f"{name}.weight_hr_l0"] = w(f"{cell}/W_P_0", (h, d)).t()
    return out


def _char_state(w: _Weights, config: BiLMConfig) -> dict[str, torch.Tensor]:
    """The character encoder's tensors from the weight file."""
    out: dict[str, torch.Tensor] = {}
    f, e, k = sum(config.char_filters), config.embedding_dim, len(config.char_filters)
    table = w("char_embed", (ELMO_NUM_CHARS - 1, config.char_dim))
    elmo_table = torch.cat([torch.zeros(1, config.char_dim), table])  # (262, char_dim)
    if config.char_ids == "compact":  # a biLM of ours, exported: its rows back in their places
        elmo_table = elmo_table[_compact_to_elmo_rows()]
        elmo_table[CHAR_PAD] = 0.0
    out["char_encoder.char_embedding.weight"] = elmo_table
    conv = torch.zeros(f, config.char_dim, k)  # (F, char_dim, K)
    bias = []
    row = 0
    for i, n in enumerate(config.char_filters):
        kernel = w(f"CNN/W_cnn_{i}", (1, i + 1, config.char_dim, n))[0]  # (width, char_dim, n)
        conv[row : row + n, :, : i + 1] = kernel.permute(2, 1, 0)
        bias.append(w(f"CNN/b_cnn_{i}", (n,)))
        row += n
    out["char_encoder.conv.weight"], out["char_encoder.conv.bias"] = conv, torch.cat(bias)
    for j in range(config.char_highway):
        p = f"CNN_high_{j}"
        out[f"char_encoder.highways.{j}.linear.weight"] = torch.cat(
            [w(f"{p}/W_transform", (f, f)).t(), w(f"{p}/W_carry", (f, f)).t()]
        )
        out[f"char_encoder.highways.{j}.linear.bias"] = torch.cat(
            [w(f"{p}/b_transform", (f,)), w(f"{p}/b_carry", (f,))]
        )
    out["char_encoder.project.weight"] = w("CNN_proj/W_proj", (f, e)).t()
    out["char_encoder.project.bias"] = w("CNN_proj/b_proj", (e,))
    return out


def published_from_state(
    state: Mapping[str, torch.Tensor], config: BiLMConfig
) -> dict[str, np.ndarray]:
    """A biLM's state dict -> the published arrays: char encoder and LSTMs, or (a word
    encoder, bilm-tf's token-input form) the LSTMs and ``embedding``, the token vectors, which
    go to their own file. A projection from E to the LSTMs' width (E != D) is folded in."""
    out: dict[str, np.ndarray] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.detach().to("cpu", torch.float32).contiguous().numpy()

    if config.token_encoder == "char":
        _put_char(state, config, put)
    else:  # the token vectors at the LSTMs' width (E -> D folded in): ``embedding``
        table = state["embedding.weight"].float()
        if "project.weight" in state:
            table = table @ state["project.weight"].t() + state["project.bias"]
        put("embedding", table)
    h = config.hidden_dim
    for direction, stack in enumerate(("forward_lstms", "backward_lstms")):
        for layer in range(config.num_layers):
            cell, name = _cell(direction, layer), f"{stack}.{layer}"
            kernel = torch.cat([state[f"{name}.weight_ih_l0"], state[f"{name}.weight_hh_l0"]], 1)
            b = (state[f"{name}.bias_ih_l0"] + state[f"{name}.bias_hh_l0"]).clone()
            b[h : 2 * h] -= FORGET_BIAS
            put(f"{cell}/W_0", _gates(kernel).t())
            put(f"{cell}/B", _gates(b))
            if config.projection_dim:
                put(f"{cell}/W_P_0", state[f"{name}.weight_hr_l0"].t())
    return out


def _put_char(
    state: Mapping[str, torch.Tensor], config: BiLMConfig, put: Callable[[str, torch.Tensor], None]
) -> None:
    """The character encoder's arrays (its E -> D projection folded into ``CNN_proj``)."""
    table = state["char_encoder.char_embedding.weight"].float()
    if config.char_ids == "compact":
        elmo_table = torch.zeros(ELMO_NUM_CHARS, config.char_dim)
        elmo_table[_compact_to_elmo_rows()] = table
        table = elmo_table
    put("char_embed", table[1:])
    conv, conv_b = state["char_encoder.conv.weight"], state["char_encoder.conv.bias"]
    row = 0
    for i, n in enumerate(config.char_filters):
        put(f"CNN/W_cnn_{i}", conv[row : row + n, :, : i + 1].permute(2, 1, 0).unsqueeze(0))
        put(f"CNN/b_cnn_{i}", conv_b[row : row + n])
        row += n
    f = sum(config.char_filters)
    for j in range(config.char_highway):
        lw = state[f"char_encoder.highways.{j}.linear.weight"]
        lb = state[f"char_encoder.highways.{j}.linear.bias"]
        put(f"CNN_high_{j}/W_transform", lw[:f].t())
        put(f"CNN_high_{j}/W_carry", lw[f:].t())
        put(f"CNN_high_{j}/b_transform", lb[:f])
        put(f"CNN_high_{j}/b_carry", lb[f:])
    pw, pb = state["char_encoder.project.weight"], state["char_encoder.project.bias"]
    if "project.weight" in state:  # E -> D folded in: one linear map, as ELMo has
        pw, pb = state["project.weight"] @ pw, state["project.weight"] @ pb + state["project.bias"]
    put("CNN_proj/W_proj", pw.t())
    put("CNN_proj/b_proj", pb)


def exported_config(config: BiLMConfig) -> BiLMConfig:
    """The config a biLM of ours has once exported and imported again."""
    return replace(
        config,
        vocab_size=4 if config.token_encoder == "char" else config.vocab_size,
        embedding_dim=config.projection_dim or config.hidden_dim,
        dropout=0.0,
        num_samples=0,
        lm_head=False,
    )


# bilm-tf's vocabulary file spells the sentence marks and the unknown word its own way
TOKEN_FILE_NAMES = {"<s>": "<S>", "</s>": "</S>", "<unk>": "<UNK>"}


def vocab_file_tokens(tokens: Sequence[str]) -> list[str]:
    """Our vocabulary (id order) as bilm-tf's vocabulary file lists it."""
    return [TOKEN_FILE_NAMES.get(t, t) for t in tokens]


def tokens_from_vocab_file(lines: Sequence[str]) -> list[str]:
    """A bilm-tf vocabulary file's tokens in our spelling, our specials first (the order our
    ids need); the file's own order is kept for the rest."""
    ours = {v: k for k, v in TOKEN_FILE_NAMES.items()}
    return [ours.get(t, t) for t in lines]
