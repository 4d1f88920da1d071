"""Recurrent kernels step by step, so each matrix product is a ``linear`` call a site can see.

``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` hand all their weights to one fused kernel. While
a plan or recorder needs their inputs, :mod:`bitwidth.sites` runs this equivalent
instead: the input projection of every step in one ``linear`` call per layer and
direction, then one ``linear`` per step for the hidden state (and the LSTM projection).

>>> import torch, torch.nn as nn
>>> lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
>>> x = torch.randn(5, 2, 3)
>>> h0 = (torch.zeros(4, 2, 4), torch.zeros(4, 2, 4))
>>> args = (x, h0, lstm._flat_weights, True, 2, 0.0, False, True, False)
>>> out = run_rnn("lstm", args, lstm._flat_weights, lambda x, w, b: nn.functional.linear(x, w, b))
>>> torch.allclose(out[0], lstm(x, h0)[0], atol=1e-6)
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor

__all__ = ["run_rnn"]

Linear = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _cell(kind: str, xp: Tensor, hp: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if kind == "lstm":
        i, f, g, o = (xp + hp).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if kind == "gru":  # PyTorch's GRU: the reset gate scales the hidden projection, bias included
        xr, xz, xn = xp.chunk(3, -1)
        hr, hz, hn = hp.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    return (torch.tanh if kind == "rnn_tanh" else torch.relu)(xp + hp), None


def run_rnn(kind: str, args: Sequence[Any], weights: Sequence[Tensor], linear: Linear) -> tuple[Tensor, ...]:
    """``torch.<kind>(input, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first)``.

    ``weights`` replaces ``params`` (the quantized tensors); ``linear`` computes every product.
    """
    x, hx = args[0], args[1]
    has_biases, num_layers, dropout, train, bidirectional, batch_first = args[3:9]
    if batch_first:
        x = x.transpose(0, 1)
    dirs = 2 if bidirectional else 1
    per = len(weights) // (num_layers * dirs)
    h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    hs: list[Tensor] = []
    cs: list[Tensor] = []
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            w = weights[idx * per:(idx + 1) * per]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if per in (3, 5) else None  # LSTM with proj_size
            xp = linear(layer_in, w[0], b_ih)  # every step's input projection at once
            h, c = h0[idx], c0[idx] if c0 is not None else None
            steps: list[Tensor] = [x[0]] * x.shape[0]
            for t in range(x.shape[0]) if d == 0 else reversed(range(x.shape[0])):
                h, c = _cell(kind, xp[t], linear(h, w[1], b_hh), h, c)
                if w_hr is not None:
                    h = linear(h, w_hr, None)
                steps[t] = h
            outs.append(torch.stack(steps))
            hs.append(h)
            if c is not None:
                cs.append(c)
        layer_in = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if dropout and train and layer < num_layers - 1:
            layer_in = TF.dropout(layer_in, dropout, True)
    out = layer_in.transpose(0, 1) if batch_first else layer_in
    return (out, torch.stack(hs), torch.stack(cs)) if kind == "lstm" else (out, torch.stack(hs))
