"""The fused (torch.compile) kernels used for large tensors give exactly the eager results."""

import pytest
import torch

from bitwidth import functional as F

N = 7 * 11 * 54472  # >= FUSE_MIN_NUMEL for the fused path; not a power of two (vector tails)


def value_and_grad(fn, x, g):
    y = fn(x)
    return y, torch.autograd.grad(y.reshape(-1), x, g)[0]


assert N >= F.FUSE_MIN_NUMEL


def seeded(x):
    """A fresh generator with a fixed seed on ``x``'s device."""
    return torch.Generator(x.device).manual_seed(5)


CASES = {
    "int8": lambda x: F.quantize_int(x, 0.02, 3, -128, 127),
    "int4_channel": lambda x: F.quantize_int(x.reshape(7, -1), torch.linspace(0.1, 0.5, 7), 0, -8, 7, axis=0),
    "fixed12_6": lambda x: F.quantize_fixed(x, 12, 6),
    "e4m3": lambda x: F.quantize_float(x, 4, 3, max_value=448.0),
    "e5m2_nosub": lambda x: F.quantize_float(x, 5, 2, subnormals=False),
    # The noise is hashed from one seed inside the kernel: the same seed, the same values.
    "int8_stochastic": lambda x: F.quantize_int(x, 0.02, 3, -128, 127, rounding="stochastic", generator=seeded(x)),
    "e4m3_stochastic": lambda x: F.quantize_float(x, 4, 3, rounding="stochastic", generator=seeded(x)),
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


def test_fused_stochastic_rounding_is_unbiased_and_varies_per_call():
    """In-kernel noise: each element rounds up with probability frac, independently, new per call."""
    x = torch.full((N,), 1.3)
    g = torch.Generator().manual_seed(0)
    y1, y2 = (F.quantize_fixed(x, 8, 2, rounding="stochastic", generator=g) for _ in range(2))
    assert sorted(y1.unique().tolist()) == [1.25, 1.5]
    up = (y1 == 1.5).double()
    assert abs(up.mean().item() - 0.2) < 4 * (0.2 * 0.8 / N) ** 0.5  # P(up) = frac = 0.2
    # Neighbours are independent (a hash of the index, not a sequence with short-range structure).
    assert abs(torch.corrcoef(torch.stack([up[:-1], up[1:]]))[0, 1].item()) < 4 / N**0.5
    assert not torch.equal(y1, y2) and abs((y2 == 1.5).double().mean().item() - 0.2) < 4 * (0.16 / N) ** 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["int8", "e4m3", "int8_stochastic", "e4m3_stochastic"])
def test_fused_equals_eager_on_cuda(case, monkeypatch):
    fn = CASES[case]
    torch.manual_seed(0)
    x = (torch.randn(N, device="cuda") * torch.exp2(torch.randint(-12, 6, (N,), device="cuda").float()))
    x.requires_grad_()
    g = torch.randn(N, device="cuda")
    y, gx = value_and_grad(fn, x, g)
    monkeypatch.setitem(F._fuse, "enabled", False)
    y_ref, gx_ref = value_and_grad(fn, x, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
