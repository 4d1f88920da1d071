"""``tiny_lm``: a small decoder-only transformer language model in plain torch.

Pre-norm blocks as in GPT-2: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``. Attention has
its own ``nn.Linear`` for each of ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` and
calls ``scaled_dot_product_attention(q, k, v, is_causal=True)``, so every matrix product
of the model is a site: the linear layers by module, the attention product by the call's
q, k and v. The output head is untied from the token embedding: tying would make the
head's weight format also round the embedding table, two sites in one tensor. No dropout,
so training is deterministic for a seed. Weights start as in GPT-2: normal with standard
deviation 0.02, biases zero.

>>> import torch
>>> model = tiny_lm()
>>> model(torch.zeros(2, 64, dtype=torch.long)).shape
torch.Size([2, 64, 256])
>>> [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:4]
['blocks.0.attn.q_proj', 'blocks.0.attn.k_proj', 'blocks.0.attn.v_proj', 'blocks.0.attn.out_proj']
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

__all__ = ["Attention", "Block", "TinyLM", "tiny_lm"]


class Attention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v and output projections."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape  # (B, T, C)

        def heads(h: Tensor) -> Tensor:
            return h.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)  # (B, H, T, C/H)

        y = TF.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                            is_causal=True)  # (B, H, T, C/H)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """One pre-norm transformer block: attention, then a GELU MLP four times as wide."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict(
            fc1=nn.Linear(d_model, 4 * d_model), act=nn.GELU(), fc2=nn.Linear(4 * d_model, d_model)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Token and learned position embeddings, ``n_layers`` blocks, a final LayerNorm, an untied head.

    Input: token ids ``(B, T)`` with ``T <= context``; output: next-token logits ``(B, T, vocab)``.
    """

    def __init__(self, vocab: int = 256, context: int = 64, d_model: int = 64, n_heads: int = 4,
                 n_layers: int = 2) -> None:
        super().__init__()
        for key, value in (("vocab", vocab), ("context", context), ("d_model", d_model), ("n_heads", n_heads),
                           ("n_layers", n_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        self.context = context
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.apply(_init)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context of {self.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def tiny_lm(in_channels: int = 1, num_classes: int = 256, image_size: Sequence[int] = (64,)) -> nn.Module:
    """The ``tiny_lm`` for a data shape: ``num_classes`` is the vocabulary, ``image_size`` ``(context,)``.

    Two layers, ``d_model`` 64, four heads; ``in_channels`` is unused (tokens have one channel).

    >>> tiny_lm(num_classes=128, image_size=(32,)).head.out_features
    128
    """
    if len(image_size) != 1:
        raise ValueError(f"tiny_lm takes token windows of shape (context,), got a data shape {tuple(image_size)}; "
                         "use data 'pytext'")
    return TinyLM(vocab=num_classes, context=int(image_size[0]))
