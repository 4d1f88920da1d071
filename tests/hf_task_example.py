"""Hugging Face ``transformers`` models as user tasks: ``tests/hf_task_example.py:<callable>``.

Each callable builds a small causal language model from a ``transformers`` config (no
weights downloaded, nothing fetched) for the data named in ``make_task``, here ``pytext``
(the standard library as bytes): ``num_classes`` is that data's vocabulary (256) and
``image_size`` its ``(context,)``. A ``transformers`` model returns an output object, so
:class:`Logits` wraps it into a module returning the ``(B, T, vocab)`` logits that the
task's loss and ``evaluate`` take. Needs the extra: ``pip install 'bitwidth[hf]'``.

GPT-2 computes its projections with ``transformers``' own ``Conv1D`` modules (a
transposed ``addmm``), not ``nn.Linear``; Llama's are ``nn.Linear`` (``q_proj`` ...).

    from bitwidth.tasks import make_task
    task = make_task("tests/hf_task_example.py:llama", "pytext")
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class Logits(nn.Module):
    """A ``transformers`` causal LM as a module from token ids ``(B, T)`` to logits ``(B, T, vocab)``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def gpt2(num_classes: int = 256, image_size: Sequence[int] = (64,), width: int = 64) -> nn.Module:
    """A two-layer GPT-2, four heads, without dropout (so a seed fixes training)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=width, n_head=4, vocab_size=num_classes, n_positions=image_size[0],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return Logits(GPT2LMHeadModel(config))


def llama(num_classes: int = 256, image_size: Sequence[int] = (64,), width: int = 64) -> nn.Module:
    """A two-layer Llama, four heads (no grouped keys), a gated MLP twice as wide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=num_classes, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=image_size[0], bos_token_id=None, eos_token_id=None)
    return Logits(LlamaForCausalLM(config))
