"""LSTM helpers of the biLM and the classifier: reversing right-padded sequences, and one
LSTM layer stepped by hand with ELMo's cell and projection clipping."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of a right-padded batch within its own length (an involution).

    x: (B, T, *) ; lengths: (B,) -> (B, T, *), padding stays at the end. A row permutation of
    the flattened (B*T, *) batch: ``index_select`` copies whole rows (and its backward adds
    whole rows), where an element-wise ``gather`` read one index per element.
    """
    b, t = x.shape[:2]
    pos = torch.arange(t, device=x.device).unsqueeze(0)  # (1, T)
    lens = lengths.to(x.device).unsqueeze(1)  # (B, 1)
    idx = torch.where(pos < lens, lens - 1 - pos, pos)  # (B, T) position within the document
    rows = idx + t * torch.arange(b, device=x.device).unsqueeze(1)  # (B, T) row of (B*T, *)
    return x.reshape(b * t, *x.shape[2:]).index_select(0, rows.view(-1)).view(x.shape)


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype where autocast is on (so dropout and copies run in bf16 and the
    LSTM does not cast again), else unchanged."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return x.to(torch.get_autocast_dtype(kind))
    return x


def clipped_lstm(
    lstm: nn.LSTM, x: torch.Tensor, cell_clip: float, proj_clip: float
) -> torch.Tensor:
    """One layer of ``lstm`` (batch_first, optionally with ``proj_size``) stepped by hand so
    the cell state and the output can be clipped at every step, as ELMo's LSTMs do (cuDNN /
    oneDNN's fused kernels cannot). Same weights, same gate order (i, f, g, o) and, without
    clipping, the same output as ``lstm(x)[0]``. x: (B, T, I) -> (B, T, P or H)."""
    return lstm_steps(lstm, x, cell_clip, proj_clip)[0]


def lstm_steps(
    lstm: nn.LSTM,
    x: torch.Tensor,
    cell_clip: float,
    proj_clip: float,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``clipped_lstm`` from a given state, also returning the final state: x (B, T, I),
    state (h (B, P or H), c (B, H); zeros if None), lengths (B,) -> outputs (B, T, P or H),
    final h, final c, each row's taken at its own last step (``lengths``; the last step if
    None), as a stateful reader carries them into its next batch."""

    def weight(name: str) -> torch.Tensor:
        return cast(torch.Tensor, getattr(lstm, name))

    w_hh = weight("weight_hh_l0")
    w_hr = weight("weight_hr_l0") if lstm.proj_size else None
    kind = x.device.type
    if torch.is_autocast_enabled(kind):  # cast once, not at every step's matmul (same values)
        dtype = torch.get_autocast_dtype(kind)
        w_hh = w_hh.to(dtype)
        w_hr = None if w_hr is None else w_hr.to(dtype)
    bias = weight("bias_ih_l0") + weight("bias_hh_l0")
    gates_x = F.linear(x, weight("weight_ih_l0"), bias)  # (B, T, 4H)
    b, t = x.shape[:2]
    if state is None:
        h = x.new_zeros(b, w_hh.shape[1])  # (B, P or H)
        c = x.new_zeros(b, lstm.hidden_size)  # (B, H)
    else:
        h, c = state[0].to(gates_x.dtype), state[1].to(gates_x.dtype)
    last = None if lengths is None else (lengths.to(x.device) - 1).unsqueeze(1)  # (B, 1)
    h_end, c_end = h, c
    outs = []
    for step in range(t):
        g = torch.addmm(gates_x[:, step], h, w_hh.t())  # (B, 4H)
        i, f, cand, o = g.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cand)
        if cell_clip:
            c = c.clamp(-cell_clip, cell_clip)
        h = torch.sigmoid(o) * torch.tanh(c)  # (B, H)
        if w_hr is not None:
            h = h @ w_hr.t()  # (B, P)
        if proj_clip:
            h = h.clamp(-proj_clip, proj_clip)
        outs.append(h)
        if last is not None:  # rows whose last real step this is keep this state
            here = last == step  # (B, 1)
            h_end, c_end = torch.where(here, h, h_end), torch.where(here, c, c_end)
    if last is None:
        h_end, c_end = h, c
    return torch.stack(outs, 1), h_end, c_end  # (B, T, P or H), (B, P or H), (B, H)
