"""Per-layer wrappers on real torchvision models: identity, precedence, set_plan, unwrap, training."""

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

import bitwidth as bw
from bitwidth.formats import IntFormat
from bitwidth.sites import engine_of
from bitwidth.wrap import covered_layers, quant_layers

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tv_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10)


@pytest.fixture(scope="module")
def resnet():
    return tv_model("resnet18")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vgg11"])
def test_empty_specs_are_bit_identical_forward_and_backward(name, device):
    model = tv_model(name).to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    for train in (True, False):
        model.train(train)
        torch.manual_seed(1)  # dropout draws the same mask in both runs
        ref = model(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
        bw.wrap(model, {})
        torch.manual_seed(1)
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        bw.unwrap(model)
        assert torch.equal(out, ref)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))


def test_wrap_changes_outputs_in_eval_and_no_grad(resnet):
    model = copy.deepcopy(resnet).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        bw.wrap(model, {"*": "int4"})
        out = model(x)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    assert (out - ref).abs().max() < ref.abs().max()  # quantized, not broken


def test_precedence_exact_beats_pattern_later_pattern_wins(resnet):
    model = copy.deepcopy(resnet)
    plan = {
        "layer1.*": "int8",
        "*": "int6",  # later pattern: beats layer1.* everywhere it matches
        "layer1.0.conv1": bw.QuantSpec(weight="int2"),  # exact: beats both, wherever listed
        "layer2.*": bw.QuantSpec(weight="e4m3", gradient="fixed16_8"),
    }
    bw.wrap(model, plan)
    specs = bw.plan_of(model)
    assert specs["layer1.0.conv1"] == bw.QuantSpec(weight="int2")
    assert specs["layer1.1.conv2"].weight.name == "int6"
    assert specs["layer2.0.conv1"].gradient.name == "fixed16_8"
    assert specs["layer3.0.conv1"].activation.name == "int6"
    assert set(specs) == set(covered_layers(model))
    assert bw.resolve_plan(model, {"*": "int6", "layer1.*": "int8"})["layer1.0.conv1"].weight.name == "int8"


def test_set_plan_reconfigures_without_rewrapping(resnet):
    model = copy.deepcopy(resnet).eval()
    x = torch.randn(2, 3, 32, 32)
    bw.wrap(model, {"*": "int8"})
    modules = {n: id(m) for n, m in model.named_modules()}
    with torch.no_grad():
        a8 = model(x)
        bw.set_plan(model, {"*": "int3"})
        a3 = model(x)
        bw.set_plan(model, {"*": "int8"})
        again = model(x)
        bw.set_plan(model, {})
        full = model(x)
        ref = bw.unwrap(copy.deepcopy(model))(x)
    assert {n: id(m) for n, m in model.named_modules()} == modules
    assert torch.equal(a8, again) and not torch.equal(a3, a8)
    assert torch.equal(full, ref) and bw.plan_of(model) == {}


def test_set_plan_round_trips_plan_of(resnet):
    model = copy.deepcopy(resnet)
    bw.wrap(model, {"layer3.*": "int4", "fc": bw.QuantSpec(activation="uint8")})
    plan = bw.plan_of(model)
    bw.set_plan(model, {})
    bw.set_plan(model, plan)
    assert bw.plan_of(model) == plan
    assert bw.plan_from_dict(bw.plan_to_dict(plan)) == plan


def test_unwrap_restores_objects_parameters_and_state_dict_keys(resnet):
    model = copy.deepcopy(resnet)
    modules = dict(model.named_modules())
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    bw.wrap(model, {"*": bw.QuantSpec("int4", "int4", "int8")})
    assert list(model.state_dict()) == keys  # wrapping adds nothing to the state_dict
    bw.calibrate(model, [torch.randn(2, 3, 32, 32)])
    bw.unwrap(model)
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)
    assert all(type(m) is type(modules[n]) for n, m in model.named_modules())
    assert {n: p for n, p in model.named_parameters()} == params
    assert list(model.state_dict()) == keys
    assert not quant_layers(model) and not any(hasattr(m, "_bw") for m in model.modules())


def test_wrapped_model_pickles_and_deepcopies(resnet):
    model = bw.wrap(copy.deepcopy(resnet).eval(), {"*": "int4"})
    x = torch.randn(1, 3, 32, 32)
    clone = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_training_step_with_weight_activation_gradient_formats(resnet):
    model = copy.deepcopy(resnet).train()
    bw.wrap(model, {"*": bw.QuantSpec(weight="int8", activation="int8", gradient="fixed16_10")})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = model.fc.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    assert not torch.equal(model.fc.weight, before)


def test_gradient_format_quantizes_the_output_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    model = nn.Sequential(lin)
    bw.wrap(model, {"0": bw.QuantSpec(gradient="fixed8_2")})
    out = model(x)
    g = torch.randn_like(out) * 0.7
    (gw,) = torch.autograd.grad(out, lin.weight, g)
    gq = bw.parse_format("fixed8_2").quantize(g)
    assert torch.allclose(gw, gq.T @ x)
    assert not torch.allclose(gw, g.T @ x)


def test_weight_and_activation_quantized_as_specified():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    x = torch.randn(8, 4)
    w4, a6 = IntFormat(4), IntFormat(6)
    expected = nn.functional.linear(a6.quantize(x), w4.quantize(lin.weight, axis=0), lin.bias)
    bw.wrap(model, {"0": bw.QuantSpec(weight=w4, activation=a6)})
    assert torch.equal(model(x), expected)


def test_per_channel_weights_use_output_channel_axis():
    torch.manual_seed(0)
    conv, tconv = nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 5, 3)
    model = nn.Sequential(conv, tconv)
    fmt = IntFormat(4, granularity="channel")
    bw.wrap(model, {"*": bw.QuantSpec(weight=fmt)})
    x = torch.randn(1, 3, 8, 8)
    h = nn.functional.conv2d(x, fmt.quantize(conv.weight, axis=0), conv.bias)
    # ConvTranspose weights are (in, out, kh, kw): the output channel is axis 1
    expected = nn.functional.conv_transpose2d(h, fmt.quantize(tconv.weight, axis=1), tconv.bias)
    assert torch.equal(model(x), expected)
    assert fmt.qparams(tconv.weight, axis=1)[0].shape == (5,)


def test_embedding_and_conv1d_are_covered():
    model = nn.Sequential(nn.Embedding(20, 6), nn.Flatten(0, -1))
    bw.wrap(model, {"0": "int2"})
    out = model(torch.tensor([1, 2, 3]))
    assert out.unique().numel() <= 4  # a 2-bit code book
    conv = nn.Sequential(nn.Conv1d(2, 3, 3))
    bw.wrap(conv, {"*": "e2m1"})
    assert conv(torch.randn(1, 2, 9)).shape == (1, 3, 7)


def test_static_activation_scale_after_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    bw.wrap(model, {"0": bw.QuantSpec(activation="int8")})
    calib = [torch.randn(16, 4) for _ in range(3)]
    bw.calibrate(model, calib)
    big = torch.randn(8, 4) * 100  # far outside the calibrated range: clipped by the static scale
    absmax = max(b.abs().max() for b in calib)
    seen = []
    engine_of(model).taps.append(lambda site, kind, t, q: seen.append(t) if kind == "activation" and q else None)
    model(big)
    # symmetric int8: scale = absmax / 127, codes -128..127
    assert torch.allclose(seen[0].max(), absmax) and torch.allclose(seen[0].min(), -absmax * 128 / 127)
    # the calibration is plan-independent: a 4-bit activation still uses the same range
    bw.set_plan(model, {"0": bw.QuantSpec(activation="int4")})
    seen.clear()
    model(big)
    assert torch.allclose(seen[0].max(), absmax) and torch.allclose(seen[0].min(), -absmax * 8 / 7)
    assert seen[0].unique().numel() <= 16


def test_errors_name_the_problem(resnet):
    model = copy.deepcopy(resnet)
    with pytest.raises(ValueError, match="closest sites: layer1.0.conv2, layer1.0.conv1"):
        bw.wrap(model, {"layer1.0.conv": "int4"})
    with pytest.raises(ValueError, match="BatchNorm2d without weight sites"):
        bw.wrap(model, {"bn1": "int4"})
    with pytest.raises(ValueError, match="'layer1\\*'"):
        bw.wrap(model, {"layer1": "int4"})
    with pytest.raises(ValueError, match="matches no site"):
        bw.wrap(model, {"encoder.*": "int4"})
    with pytest.raises(ValueError, match="unknown format 'int4x'"):
        bw.wrap(model, {"*": "int4x"})
    with pytest.raises(ValueError, match="unknown kind"):
        bw.wrap(model, {"*": {"weights": "int4"}})
    with pytest.raises(ValueError, match="wrapped model"):
        bw.set_plan(nn.Sequential(nn.Linear(2, 2)), {"*": "int8"})
    assert not quant_layers(model)  # a failed wrap leaves the model untouched
