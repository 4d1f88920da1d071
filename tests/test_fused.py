"""The fused (torch.compile) kernels used for large tensors give exactly the eager results."""

import pytest
import torch

from bitwidth import functional as F

N = 7 * 11 * 54472  # >= FUSE_MIN_NUMEL for the fused path; not a power of two (vector tails)


def value_and_grad(fn, x, g):
    y = fn(x)
    return y, torch.autograd.grad(y.reshape(-1), x, g)[0]


assert N >= F.FUSE_MIN_NUMEL

CASES = {
    "int8": lambda x: F.quantize_int(x, 0.02, 3, -128, 127),
    "int4_channel": lambda x: F.quantize_int(x.reshape(7, -1), torch.linspace(0.1, 0.5, 7), 0, -8, 7, axis=0),
    "fixed12_6": lambda x: F.quantize_fixed(x, 12, 6),
    "e4m3": lambda x: F.quantize_float(x, 4, 3, max_value=448.0),
    "e5m2_nosub": lambda x: F.quantize_float(x, 5, 2, subnormals=False),
}


@pytest.mark.skipif(not F._fuse["enabled"], reason="fusion disabled by BITWIDTH_COMPILE=0")
@pytest.mark.parametrize("case", CASES)
def test_fused_equals_eager_forward_and_backward(case, monkeypatch):
    fn = CASES[case]
    torch.manual_seed(0)
    x = (torch.randn(N) * torch.exp2(torch.randint(-12, 6, (N,)).float())).requires_grad_()
    g = torch.randn(N)
    y, gx = value_and_grad(fn, x, g)
    assert F._fuse["cache"], "the fused path was not taken"
    monkeypatch.setitem(F._fuse, "enabled", False)
    y_ref, gx_ref = value_and_grad(fn, x, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
