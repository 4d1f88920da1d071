"""Block-scaled formats: group-wise int, OCP MX and NVFP4 against references, costs, parsing, wrap and search.

References: torchao's ``MXTensor`` / ``NVFP4Tensor`` round trips (bit for bit), torchao's
affine fake quantizer for asymmetric groups, and the group-wise int and MXINT8
references written below from their definitions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bitwidth as bw
from bitwidth import blocks as B
from bitwidth.cost import CostModel, LayerCost
from bitwidth.families import make_format
from bitwidth.formats import GroupIntFormat, MXFormat, NVFP4Format, format_from_dict, format_to_dict, parse_format

MX_NAMES = {"e4m3": "mxfp8_e4m3", "e5m2": "mxfp8_e5m2", "e2m3": "mxfp6_e2m3", "e3m2": "mxfp6_e3m2", "e2m1": "mxfp4"}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values with equal signs (so -0.0 is not 0.0), NaN equal to NaN."""
    same = ((a == b) & (torch.signbit(a) == torch.signbit(b))) | (a.isnan() & b.isnan())
    return a.shape == b.shape and bool(same.all())


@pytest.fixture(params=["torch", "fused"])
def path(request, monkeypatch):
    """Both implementations: the torch code, and the numba kernels of float32 CPU tensors (forced on small ones)."""
    monkeypatch.setattr(B, "FUSE_MIN_NUMEL", 1 << 62 if request.param == "torch" else 0)
    return request.param


def _adversarial(rows: int = 24, k: int = 128, seed: int = 0) -> torch.Tensor:
    """Random rows over 40 octaves, then the cases a block format gets wrong first."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-20, 20, (rows, 1), generator=g).float())
    x[0] = 0.0  # an all-zero row
    x[1, :32] = 0.0  # a zero block inside a live row
    x[2, 5] = math.nan
    x[3, 7], x[3, 40] = math.inf, -math.inf
    x[4, :32] = 448.0 * 2.0**10  # the top of e4m3's range, times a power of two
    x[5, :32] = 6.0  # the top of e2m1's range
    x[6, :32] = torch.randn(32, generator=g) * 1e-3  # subnormal element values under a large block max
    x[6, 0] = 100.0
    x[7, :32] = torch.tensor([1.0, -1.0] * 16) * 3.4e38  # near float32's max
    x[8, :16] = 2.0**-100  # a tiny block (MX scale well inside E8M0)
    x[9, :32] = torch.linspace(-7.0, 7.0, 32)  # ties of every element grid
    return x


# ----------------------------------------------------------------------------- MX vs torchao
@pytest.fixture(scope="module")
def torchao_mx():
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    dtypes = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e2m3": DTYPE_FP6_E2M3,
              "e3m2": DTYPE_FP6_E3M2, "e2m1": torch.float4_e2m1fn_x2}

    def round_trip(x: torch.Tensor, element: str, block: int, mode: str) -> torch.Tensor:
        return MXTensor.to_mx(x, dtypes[element], block, scaling_mode=ScaleCalculationMode(mode)).dequantize(x.dtype)

    return round_trip


@pytest.mark.parametrize("mode", B.SCALE_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("element", list(MX_NAMES))
def test_mx_equals_torchao_bit_for_bit(torchao_mx, element, dtype, mode, path):
    x = _adversarial().to(dtype)
    ours = parse_format(MX_NAMES[element], scale_mode=mode).quantize(x)
    assert ours.dtype == dtype
    assert _same(ours, torchao_mx(x, element, 32, mode))


@pytest.mark.parametrize("block", [16, 64, 128])
def test_mx_other_blocks_equal_torchao(torchao_mx, block, path):
    x = _adversarial(seed=1)
    assert _same(B.quantize_mx(x, "e2m1", block), torchao_mx(x, "e2m1", block, "floor"))


def test_mx_special_values_follow_the_spec(torchao_mx):
    x = _adversarial()
    q = parse_format("mxfp8_e4m3").quantize(x)
    assert bool(q[2, :32].isnan().all()) and not bool(q[2, 32:].isnan().any())  # NaN takes its block, only it
    assert q[3, 7] == math.inf and q[3, 40] == -math.inf  # Inf stays Inf...
    assert bool((q[3, 8:32] == 0).all())  # ...and its block's scale flushes the rest
    assert bool((q[0] == 0).all()) and bool((q[1, :32] == 0).all())
    assert bool((q[4, :32] == x[4, :32]).all())  # the top of the range is exact


def test_mx_float32_subnormal_blocks_differ_from_torchao_as_documented(torchao_mx):
    # torchao divides by max(X, 2**-126) but multiplies back by X = 2**-127 (a Triton
    # workaround): blocks whose max is below 2**(emax - 126) come back halved there. We
    # follow the OCP spec: X = 2**-127 both ways.
    x = torch.full((1, 32), 1e-37)
    x[0, 0] = 3e-37
    ours, ref = B.quantize_mx(x, "e4m3", 32), torchao_mx(x, "e4m3", 32, "floor")
    assert torch.equal(ours / 2, ref)
    spec = (x.double() * 2.0**127).to(torch.float8_e4m3fn).double() * 2.0**-127  # elements cast under X = 2**-127
    assert torch.equal(ours.double(), spec)


# ----------------------------------------------------------------------------- NVFP4 vs torchao
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_nvfp4_equals_torchao_bit_for_bit(dtype, seed, path):
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    x = _adversarial(seed=seed).to(dtype)
    # torchao takes the per-tensor amax from the caller; ours is the largest finite magnitude
    amax = torch.where(torch.isfinite(x), x.abs(), 0).amax().float()
    ref = NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=per_tensor_amax_to_scale(amax)).dequantize(dtype)
    ours = parse_format("nvfp4").quantize(x)
    assert _same(ours, ref)
    assert bool(ours[2, :16].isnan().all()) and not bool(ours[2, 16:].isnan().any())
    assert math.isfinite(ours[3, 7]) and ours[3, 7] > 0  # Inf saturates


# ----------------------------------------------------------------------------- group-wise int
def _group_int_reference(x: torch.Tensor, bits: int, block: int, symmetric: bool, scale_dtype: str) -> torch.Tensor:
    """One group at a time in numpy float32, from the definition."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    store = {"fp16": np.float16, "fp32": np.float32, "bf16": None}[scale_dtype]
    rows = x.float().reshape(-1, x.shape[-1]).numpy()
    out = np.empty_like(rows)
    for r, row in enumerate(rows):
        for start in range(0, row.size, block):
            v = row[start:start + block]
            fin = v[np.isfinite(v)]
            lo = np.float32(min(fin.min(initial=0.0), 0.0))
            hi = np.float32(max(fin.max(initial=0.0), 0.0))
            s = max(-lo, hi) / np.float32(qmax) if symmetric else (hi - lo) / np.float32(qmax - qmin)
            s = np.float32(store(s)) if store is not None else np.float32(s)
            s = s if s > 0 else np.float32(1.0)
            zp = np.float32(0.0) if symmetric else np.float32(np.clip(qmin - np.rint(lo / s), qmin, qmax))
            with np.errstate(invalid="ignore"):
                out[r, start:start + block] = (np.clip(np.rint(v / s) + zp, qmin, qmax) - zp) * s
    return torch.from_numpy(out).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("scale_dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_group_int_equals_reference(bits, block, symmetric, scale_dtype, path):
    g = torch.Generator().manual_seed(bits * block)
    x = torch.randn(6, 300, generator=g) * torch.exp2(torch.randint(-6, 6, (6, 1), generator=g).float())
    x[0, :block] = 0.0
    x[1, 3] = math.nan
    x[2, 4] = math.inf  # saturates, and takes no part in the scale
    fmt = GroupIntFormat(bits, block=block, symmetric=symmetric, scale_dtype=scale_dtype)
    assert _same(fmt.quantize(x), _group_int_reference(x, bits, block, symmetric, scale_dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["f16", "bf16", "f64"])
def test_group_int_dtypes(dtype):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    q = GroupIntFormat(4, block=32, scale_dtype="fp32").quantize(x)
    assert q.dtype == dtype
    ref = _group_int_reference(x.float(), 4, 32, True, "fp32")  # half inputs are exact in float32
    assert torch.equal(q, ref.to(dtype)) if dtype != torch.float64 else torch.allclose(q, ref.double(), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_int_asymmetric_matches_torchao_affine(bits):
    pytest.importorskip("torchao")
    from torchao.quantization.quant_primitives import MappingType, _fake_quantize_affine, choose_qparams_affine

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(bits)) + 0.5
    scale, zp = choose_qparams_affine(x, MappingType.ASYMMETRIC, (1, 32), torch.int32, qmin, qmax)
    ref = _fake_quantize_affine(x, (1, 32), scale, zp, torch.int32, qmin, qmax)
    fmt = GroupIntFormat(bits, block=32, symmetric=False, scale_dtype="fp32")
    assert torch.equal(fmt.block_scales(x), scale.reshape(-1))
    ours = fmt.quantize(x)
    # torchao multiplies by 1/scale where we divide: a code may differ by one step within an ulp of a tie
    diff = (ours - ref).abs().reshape(-1, 32) / scale.reshape(-1, 1)
    assert float(diff.max()) <= 1.0 + 1e-6 and float((diff > 0).float().mean()) < 1e-3


# ----------------------------------------------------------------------------- MXINT8 reference
def _mxint8_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """OCP MX v1.0: X = 2**floor(log2 amax) (INT8's emax is 0), elements round(v / X * 64) in ±127."""
    rows = x.double().reshape(-1, block).numpy()
    out = np.empty_like(rows)
    for r, v in enumerate(rows):
        amax = np.abs(v).max()
        e = -127 if amax == 0 else min(max(math.frexp(amax)[1] - 1, -127), 127)
        s = 2.0**e
        out[r] = np.clip(np.rint(v / s * 64), -127, 127) / 64 * s
    return torch.from_numpy(out).reshape(x.shape).float()


def test_mxint8_equals_reference(path):
    x = _adversarial()[10:].contiguous()  # finite rows
    assert torch.equal(parse_format("mxint8").quantize(x), _mxint8_reference(x, 32))


@pytest.mark.parametrize("fmt", ["int3_g16", "int4_g32", "mxfp4", "mxfp6_e3m2", "mxfp8_e5m2", "mxint8", "nvfp4"])
def test_fused_kernels_equal_the_torch_code(fmt, monkeypatch):
    f = parse_format(fmt, scale_mode="even") if fmt.startswith("mxfp") else parse_format(fmt)
    if fmt == "int3_g16":
        f = GroupIntFormat(3, block=16, symmetric=False, scale_dtype="bf16")
    x = torch.cat([_adversarial(seed=s) for s in range(3)]).requires_grad_()
    got = {}
    for name, threshold in (("torch", 1 << 62), ("fused", 0)):
        monkeypatch.setattr(B, "FUSE_MIN_NUMEL", threshold)
        q = f.quantize(x)
        got[name] = (q.detach(), torch.autograd.grad(q.sum(), x)[0])
    assert _same(got["torch"][0], got["fused"][0]) and torch.equal(got["torch"][1], got["fused"][1])



def _mxfp4_sum(seed: int) -> float:
    x = torch.randn(1 << 17, generator=torch.Generator().manual_seed(seed))
    return float(parse_format("mxfp4").quantize(x).sum())


def test_fused_kernels_survive_a_forked_pool():
    # The process executor forks its workers; an OpenMP-parallel kernel used in the parent
    # made every forked worker abort ("fork() called from a process already using GNU OpenMP").
    import multiprocessing as mp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the executor does before it forks: torch's own OpenMP is not fork-safe either
    try:
        expected = [_mxfp4_sum(s) for s in range(2)]
        with mp.get_context("fork").Pool(1) as pool:  # an aborted worker never answers: time out instead of hanging
            assert pool.map_async(_mxfp4_sum, range(2), chunksize=1).get(timeout=120) == expected
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- layout, gradients, rounding
@pytest.mark.parametrize("fmt", ["int4_g32", "mxfp4", "nvfp4"])
def test_remainder_forms_a_smaller_block(fmt):
    f = parse_format(fmt)
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(0))
    k = 70 // f.block * f.block
    whole = torch.cat([f.quantize(x[:, :k].contiguous()), f.quantize(x[:, k:].contiguous())], dim=1)
    if isinstance(f, NVFP4Format):  # one tensor scale for both parts: quantize the remainder with it
        padded = torch.nn.functional.pad(x, (0, -70 % f.block))
        whole = f.quantize(padded)[:, :70]
    assert torch.equal(f.quantize(x), whole)


@pytest.mark.parametrize("fmt", ["int4_g32", "mxfp6_e2m3", "nvfp4"])
def test_weights_block_along_the_reduction_dims(fmt):
    f = parse_format(fmt)
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))  # conv: (out, in, kh, kw)
    assert torch.equal(f.quantize(w, axis=0), f.quantize(w.reshape(8, -1)).reshape(w.shape))
    wt = w.transpose(0, 1).contiguous()  # conv transpose: (in, out, kh, kw), channels on axis 1
    assert torch.equal(f.quantize(wt, axis=1), f.quantize(w, axis=0).transpose(0, 1))


def test_straight_through_gradient_is_zero_only_where_saturated(path):
    x = torch.tensor([[500.0, 300.0, 1.0, -2.0] + [0.0] * 28]).requires_grad_()
    q = B.quantize_mx(x, "e4m3", 32)  # X = 2**(8 - 8) = 1: 500 saturates to 448
    assert q[0, 0] == 448.0
    (g,) = torch.autograd.grad(q.sum(), x)
    assert g[0, 0] == 0 and bool((g[0, 1:] == 1).all())


def test_stochastic_rounding_is_unbiased_and_reproducible():
    x = torch.full((1, 4096), 0.3)
    x[0, 0] = 1.0  # e2m1 grid near 0.3 under X = 2**-2: 0.25 and 0.375
    fmt = MXFormat("e2m1", block=4096 if 4096 in B.BLOCK_SIZES else 1024, rounding="stochastic")
    q1 = fmt.quantize(x, generator=torch.Generator().manual_seed(5))
    q2 = fmt.quantize(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(q1, q2)
    vals = set(q1[0, 1:].tolist())
    assert vals <= {0.25, 0.375} and len(vals) == 2
    assert abs(float(q1[0, 1:].mean()) - 0.3) < 0.005


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8_e5m2", "nvfp4", "int4_g32"])
def test_float64_and_float16_inputs(name):
    f = parse_format(name)
    x = _adversarial()[2:].contiguous()  # NaN, Inf and values over 40 octaves, all within float32
    q64 = f.quantize(x.double())
    assert q64.dtype == torch.float64 and _same(q64, f.quantize(x).double())  # Inf stays Inf in float64 too
    h = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).half()
    assert _same(f.quantize(h), f.quantize(h.float()).half())


def test_empty_and_scalar_tensors():
    for name in ("int4_g32", "mxfp4", "nvfp4"):
        f = parse_format(name)
        assert f.quantize(torch.empty(0, 5)).shape == (0, 5)
        assert f.quantize(torch.tensor(3.0)).shape == ()


# ----------------------------------------------------------------------------- formats, parsing, costs
@pytest.mark.parametrize(("name", "bits", "storage"), [
    ("int4_g128", 4, 4.125), ("int8_g32", 8, 8.5), ("mxfp4", 4, 4.25), ("mxfp6_e2m3", 6, 6.25),
    ("mxfp6_e3m2", 6, 6.25), ("mxfp8_e4m3", 8, 8.25), ("mxfp8_e5m2", 8, 8.25), ("mxint8", 8, 8.25),
    ("nvfp4", 4, 4.5), ("mxfp4_b16", 4, 4.5), ("nvfp4_b32", 4, 4.25),
])
def test_names_bits_storage_and_round_trip(name, bits, storage):
    f = parse_format(name)
    assert (f.name, f.bits, f.storage_bits) == (name, bits, storage)
    assert format_from_dict(format_to_dict(f)) == f
    assert bw.QuantSpec(weight=name).weight == f


@pytest.mark.parametrize(("name", "options", "message"), [
    ("int4_g100", {}, "block must be one of"),
    ("int1_g32", {}, "bits must be an integer in 2..16"),
    ("int4_g32", {"block": 64}, "block size is given twice"),
    ("mxfp4", {"element": "e4m3"}, "names its element format"),
    ("mxfp4", {"scale_mode": "up"}, "scale_mode must be one of"),
    ("mxfp3", {}, "unknown format"),
    ("nvfp4", {"block": 48}, "block must be one of"),
    ("int4_g32", {"scale_dtype": "fp8"}, "scale_dtype must be one of"),
    ("nvfp4", {"rounding": "up"}, "rounding must be one of"),
    ("mxfp4", {"symmetric": True}, "bad option"),
])
def test_bad_formats_say_what_is_allowed(name, options, message):
    with pytest.raises(ValueError, match=message):
        parse_format(name, **options)


def test_format_dict_errors():
    with pytest.raises(ValueError, match="type must be one of"):
        format_from_dict({"type": "mxx"})
    with pytest.raises(ValueError, match="bad field"):
        format_from_dict({"type": "mx", "elem": "e2m1"})


def test_cost_counts_storage_bits():
    costs = CostModel({"fc": LayerCost(params=1024, macs=1024)})
    assert costs.of({"fc": bw.QuantSpec(weight="mxfp4")})["memory_bits"] == 1024 * 4.25
    assert costs.of({"fc": bw.QuantSpec(weight="int4_g128", activation="int8")})["bops"] == 1024 * 4.125 * 8
    assert costs.of({"fc": bw.QuantSpec(weight="nvfp4")})["memory_bits"] == 1024 * 4.5


# ----------------------------------------------------------------------------- families
def test_families_make_the_block_formats():
    assert [make_format("mx", n).name for n in (4, 6, 8)] == ["mxfp4", "mxfp6_e2m3", "mxfp8_e4m3"]
    assert make_format("mx", 8, fp8="int8", block=64).name == "mxint8_b64"
    assert [make_format("group_int", n, block=32).name for n in (2, 4)] == ["int2_g32", "int4_g32"]
    assert [make_format("block", n).block for n in (1, 2, 8, 32)] == [256, 128, 32, 8]
    assert make_format("block", 16, format="nvfp4").name == "nvfp4"
    assert make_format("block", 4, symmetric=False) == GroupIntFormat(4, block=64, symmetric=False)
    for family, n, opts, message in [("mx", 5, {}, "element widths"), ("mx", 6, {"fp6": "e4m3"}, "fp6 must be"),
                                     ("block", 3, {}, "power of two"), ("block", 4, {"format": "int4"}, "block format"),
                                     ("block", 4, {"block": 16}, "drop the block option")]:
        with pytest.raises(ValueError, match=message):
            make_format(family, n, **opts)


def test_config_validates_block_families():
    from bitwidth.config import _family_errors

    assert _family_errors("mx", {"fp8": "e5m2", "block": 32}, [4, 6, 8]) == []
    assert _family_errors("block", {"format": "int4_g128", "symmetric": False}, [1, 2, 4]) == []
    errors = _family_errors("mx", {}, [4, 5, 8])
    assert len(errors) == 1 and "candidates[1]" in errors[0] and "element widths" in errors[0]


# ----------------------------------------------------------------------------- wrap and search
@pytest.mark.parametrize("name", ["int4_g32", "mxfp4", "mxfp6_e3m2", "mxfp8_e4m3", "mxint8", "nvfp4"])
def test_wrapped_model_under_each_block_format(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(4, 3, 8, 8)
    fmt = parse_format(name)
    seen = {}
    model[3].register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    bw.wrap(model, {"*": bw.QuantSpec(weight=name, activation=name, gradient=name)})
    model(x).square().sum().backward()
    # the linear layer multiplied its quantized input by its weight quantized along the input dimension
    fc = model[3]
    expected = torch.nn.functional.linear(fmt.quantize(seen["x"]), fmt.quantize(fc.weight.detach(), axis=0), fc.bias)
    assert torch.equal(seen["y"], expected.detach())
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    bw.unwrap(model)


def test_search_over_mx_on_digits(tmp_path):
    from bitwidth.criteria import make_criterion
    from bitwidth.runner import run_search
    from bitwidth.trial import TrialOptions

    result = run_search("digits_mlp", mode="ptq", layers=["fc1"], kinds=("weight", "activation"), family="mx",
                        candidates=(4, 6, 8), strategy="grid", criterion=make_criterion("accuracy", max_drop=0.02),
                        trial_options=TrialOptions(epochs=1), run_dir=tmp_path)
    mb = result.min_bits
    assert set(mb["kind"]) == {"weight", "activation"}
    assert set(mb["min_bits"].dropna()) <= {4, 6, 8}
    costs = result.costs
    assert costs.loc["joint", "memory_bits"] < costs.loc["fp32", "memory_bits"]


def test_block_effects_see_outliers_flush_their_blocks():
    from bitwidth.stats import record
    from bitwidth.stats_analysis import block_effects

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 8))
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].weight[:, ::16] = 10.0  # one outlier in every 16 values: in every block
    with record(model, kinds="weight") as rec:
        model(torch.randn(2, 256))
    eff = block_effects(rec, ["mxfp4", "mxfp8_e4m3", "int8_g32"]).set_index("format")
    assert eff.loc["mxfp4", "flush_frac"] > 0.5  # the outlier's scale (2**1) leaves 0.01 below e2m1's 0.5 step
    assert eff.loc["mxfp8_e4m3", "flush_frac"] < eff.loc["mxfp4", "flush_frac"]
    assert eff.loc["mxfp4", "spread_octaves"] == 0  # every block holds an outlier: one scale
    with pytest.raises(ValueError, match="needs block formats"):
        block_effects(rec, ["int8"])
