"""Every compiled path gives exactly the eager tensor-op results: the numba kernels on the CPU at
every size, torch.compile's fused kernels on CUDA. Bit for bit, values and gradients; NaN stays
NaN (which NaN is unspecified: torch's own vector and scalar paths return different ones)."""

import numpy as np
import pytest
import torch

from bitwidth import functional as F
from bitwidth import kernels

# Not multiples of any vector width (vector tails); the largest reaches the fused size on CUDA.
SMALL, ODD, LARGE = 7 * 13, 7 * 1237, 7 * 11 * 54472
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}

assert LARGE >= F.FUSE_MIN_NUMEL


def seeded(x):
    """A fresh generator with a fixed seed on ``x``'s device."""
    return torch.Generator(x.device).manual_seed(5)


CASES = {
    "int8": lambda x: F.quantize_int(x, 0.02, 3, -128, 127),
    "uint4": lambda x: F.quantize_int(x, 0.3, 0, 0, 15),
    "int4_channel": lambda x: F.quantize_int(x.reshape(7, -1), torch.linspace(0.1, 0.5, 7), torch.arange(7) - 3,
                                             -8, 7, axis=0),
    "int4_channel_last": lambda x: F.quantize_int(x.reshape(-1, 7), torch.linspace(0.1, 0.5, 7), 0, -8, 7, axis=1),
    "fixed12_6": lambda x: F.quantize_fixed(x, 12, 6),
    "e4m3": lambda x: F.quantize_float(x, 4, 3, max_value=448.0),
    "e5m2_nosub": lambda x: F.quantize_float(x, 5, 2, subnormals=False),
    "e8m23": lambda x: F.quantize_float(x, 8, 23),
    # The noise is hashed from one seed inside the kernel: the same seed, the same values.
    "int8_stochastic": lambda x: F.quantize_int(x, 0.02, 3, -128, 127, rounding="stochastic", generator=seeded(x)),
    "fixed8_4_stochastic": lambda x: F.quantize_fixed(x, 8, 4, rounding="stochastic", generator=seeded(x)),
    "e4m3_stochastic": lambda x: F.quantize_float(x, 4, 3, rounding="stochastic", generator=seeded(x)),
}


def data(n: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """Magnitudes over many binades, both signs, and the special values."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-40, 40, (n,), generator=gen).float())
    x[:7] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1e-30, 1e-42])
    return x.to(device=device, dtype=dtype)


def value_and_grad(fn, x, g):
    x = x.detach().requires_grad_()
    y = fn(x)
    return y.detach(), torch.autograd.grad(y.reshape(-1), x, g)[0]


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    assert torch.equal(a[~nan].view(BITS[a.dtype]), b[~nan].view(BITS[b.dtype]))


def compiled_equals_eager(case: str, x: torch.Tensor, monkeypatch) -> None:
    fn = CASES[case]
    g = torch.randn(x.numel(), generator=torch.Generator().manual_seed(1)).to(x)
    y, gx = value_and_grad(fn, x, g)
    with monkeypatch.context() as m:
        m.setitem(F._fuse, "enabled", False)
        y_ref, gx_ref = value_and_grad(fn, x, g)
    assert_same_bits(y, y_ref)
    assert_same_bits(gx, gx_ref)


needs_compile = pytest.mark.skipif(not F._fuse["enabled"], reason="compiled kernels disabled by BITWIDTH_COMPILE=0")


@needs_compile
@pytest.mark.parametrize("n", [SMALL, ODD], ids=["small", "odd"])
@pytest.mark.parametrize("case", CASES)
def test_cpu_kernels_equal_eager_forward_and_backward(case, n, monkeypatch):
    compiled_equals_eager(case, data(n), monkeypatch)
    assert F._fuse["cpu"], "the compiled CPU kernels were not taken"


@needs_compile
@pytest.mark.parametrize("case", ["int8", "int4_channel", "e4m3", "int8_stochastic", "e4m3_stochastic"])
def test_cpu_kernels_equal_eager_on_large_tensors(case, monkeypatch):
    compiled_equals_eager(case, data(LARGE), monkeypatch)


@needs_compile
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["int8", "int4_channel", "e4m3", "e5m2_nosub", "int8_stochastic", "e4m3_stochastic"])
def test_cpu_kernels_equal_eager_in_every_dtype(case, dtype, monkeypatch):
    compiled_equals_eager(case, data(ODD, dtype), monkeypatch)


@needs_compile
def test_cpu_kernels_take_non_contiguous_input_and_gradient():
    x = data(64 * 48).reshape(64, 48).t().requires_grad_()  # a transposed view
    g = torch.randn(96, 64)[::2]  # a strided gradient
    y = F.quantize_float(x, 4, 3)
    y.backward(g)
    grad = x.grad.clone()
    assert y.shape == x.shape and y.is_contiguous()
    x.grad = None
    with pytest.MonkeyPatch.context() as m:
        m.setitem(F._fuse, "enabled", False)
        y_ref = F.quantize_float(x, 4, 3)
        y_ref.backward(g)
    assert_same_bits(y.detach(), y_ref.detach())
    assert_same_bits(grad, x.grad)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_gradient_of_the_gradient(compiled, monkeypatch):
    """``create_graph=True``: the straight-through gradient is itself differentiable (in ``g``)."""
    monkeypatch.setitem(F._fuse, "enabled", compiled and F._fuse["enabled"])
    x = torch.tensor([0.3, 7.9, 8.5, -8.2], requires_grad=True)  # fixed8_4: range [-8, 7.9375]
    g = torch.ones(4, requires_grad=True)
    (gx,) = torch.autograd.grad(F.quantize_fixed(x, 8, 4), x, g, create_graph=True)
    (gg,) = torch.autograd.grad((gx * torch.arange(4.0)).sum(), g)
    assert gx.tolist() == [1.0, 1.0, 0.0, 0.0] and gg.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_parameters_made_in_inference_mode_serve_autograd_later(monkeypatch):
    with torch.inference_mode():
        F.quantize_int(torch.randn(3), 0.1234567, 1, -8, 7)  # makes (and caches) the parameters
    for compiled in (False, True):
        monkeypatch.setitem(F._fuse, "enabled", compiled and F._fuse["enabled"])
        x = torch.randn(3, requires_grad=True)
        F.quantize_int(x, 0.1234567, 1, -8, 7).sum().backward()
        assert x.grad is not None


def test_stochastic_rounding_is_unbiased_and_varies_per_call():
    """Hashed noise: each element rounds up with probability frac, independently, new per call."""
    n = 1 << 20
    x = torch.full((n,), 1.3)
    g = torch.Generator().manual_seed(0)
    y1, y2 = (F.quantize_fixed(x, 8, 2, rounding="stochastic", generator=g) for _ in range(2))
    assert sorted(y1.unique().tolist()) == [1.25, 1.5]
    up = (y1 == 1.5).double()
    assert abs(up.mean().item() - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5  # P(up) = frac = 0.2
    # Neighbours are independent (a hash of the index, not a sequence with short-range structure).
    assert abs(torch.corrcoef(torch.stack([up[:-1], up[1:]]))[0, 1].item()) < 4 / n**0.5
    assert not torch.equal(y1, y2) and abs((y2 == 1.5).double().mean().item() - 0.2) < 4 * (0.16 / n) ** 0.5


def test_stochastic_noise_is_the_same_at_every_size():
    """One noise definition: an element's noise depends on the seed and its index, not on the tensor's size."""
    x = torch.full((1 << 16,), 1.3)
    small = F.quantize_fixed(x[:1000].clone(), 8, 2, rounding="stochastic", generator=torch.Generator().manual_seed(4))
    big = F.quantize_fixed(x, 8, 2, rounding="stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(small, big[:1000])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [ODD, LARGE], ids=["eager_size", "fused_size"])
@pytest.mark.parametrize("case", ["int8", "int4_channel", "fixed12_6", "e4m3", "int8_stochastic",
                                  "e4m3_stochastic"])
def test_cuda_equals_eager(case, n, monkeypatch):
    compiled_equals_eager(case, data(n, device="cuda"), monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["int8", "int4_channel", "fixed12_6", "e4m3", "e5m2_nosub"])
def test_cuda_equals_cpu(case):
    """The same formats give the same values on CUDA and on the CPU kernels."""
    x = data(ODD)
    assert_same_bits(CASES[case](x.cuda()).cpu(), CASES[case](x))


# ----------------------------------------------------------------------------- the noise hash

def stochastic_both_paths(fn, x, monkeypatch):
    y = fn(x)
    with monkeypatch.context() as m:
        m.setitem(F._fuse, "enabled", False)
        return y, fn(x)


@needs_compile
@pytest.mark.parametrize("n", [1, 4097, (1 << 20) + 3], ids=["1", "4097", "2^20+3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_stochastic_noise_of_kernels_equals_eager_for_every_seed(n, dtype, monkeypatch):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
    for seed in (0, 1, 2**31 - 1, 2**32 + 5, 2**62 - 1):
        for fn in (lambda t, s: F.quantize_int(t, 0.1, 2, -128, 127, rounding="stochastic", generator=s),
                   lambda t, s: F.quantize_float(t, 4, 3, rounding="stochastic", generator=s)):
            y, ref = stochastic_both_paths(lambda t: fn(t, torch.Generator().manual_seed(seed)), x, monkeypatch)  # noqa: B023
            assert_same_bits(y, ref)


@needs_compile
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
def test_kernel_noise_across_a_block_of_2_to_the_32(dtype):
    """Each block of 2^32 elements has its own key: a chunk that crosses into the next one draws the
    noise of its global indices there too (a tensor that large is too large to test whole)."""
    first, n, seed = 2**32 - 100, 300, 123456789
    frac = np.random.default_rng(0).random(n).astype(dtype)  # x/scale: up with probability frac
    out, p = np.empty_like(frac), lambda v: np.array([v], dtype)
    kernels.int_forward(frac.reshape(1, 1, -1), out.reshape(1, 1, -1), p(1.0), p(0.0), p(-9), p(9), seed, first)
    noise = F._uniform_at(torch.arange(first, first + n), seed, torch.float32 if dtype == np.float32 else torch.float64)
    assert np.array_equal(out, (noise.numpy() < frac).astype(dtype))
    assert 0 < out[:100].sum() < 100 and 0 < out[100:].sum() < 200


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_noise_is_uniform_and_uncorrelated(dtype):
    """The hash's draws: uniform over [0, 1) (chi-square over 256 bins), and neighbours, draws of the
    same index under nearby seeds, and draws across a block boundary uncorrelated."""
    n = 1 << 20
    u = F._uniform_at(torch.arange(n), 42, dtype).double()
    assert 0 <= u.min() and u.max() < 1
    counts = torch.bincount((u * 256).long(), minlength=256).double()
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
    assert chi2 < 255 + 6 * (2 * 255) ** 0.5  # 6 sigma of chi-square with 255 degrees of freedom
    assert abs(u.mean().item() - 0.5) < 6 * (1 / 12 / n) ** 0.5
    for other in (u.roll(1), F._uniform_at(torch.arange(n), 43, dtype).double(),
                  F._uniform_at(torch.arange(n) + 2**32, 42, dtype).double()):
        assert abs(torch.corrcoef(torch.stack([u, other]))[0, 1].item()) < 6 / n**0.5
