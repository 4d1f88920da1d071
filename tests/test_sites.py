"""Sites on real models: coverage, naming, one-site changes, the registry, bad input."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bitwidth as bw
from bitwidth.formats import IntFormat
from bitwidth.sites import engine_of


class RecurrentLM(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.rnn = cell(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 50)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


class Output(nn.Module):
    """A Hugging Face model's main tensor (logits or last hidden state)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        out = self.model(ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _hf(name: str) -> tuple[nn.Module, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    small = {"vocab_size": 100}
    if name.startswith("gpt2"):
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, bos_token_id=0,
                                      eos_token_id=0, **small)
        if name == "gpt2_eager":
            cfg._attn_implementation = "eager"
        model = transformers.GPT2LMHeadModel(cfg)
    elif name == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, **small))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, **small))
    return Output(model), torch.randint(0, 100, (2, 12))


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 32)
    if name in ("resnet18", "mobilenet_v3_small"):
        return getattr(torchvision.models, name)(num_classes=10), img
    if name == "vit_b_16":
        model = torchvision.models.vit_b_16(num_classes=10, image_size=32)
        nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: outputs would be 0
        return model, img
    if name == "swin_t":
        return torchvision.models.swin_t(num_classes=10), torch.randn(1, 3, 64, 64)
    if name == "transformer_encoder":
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(2, 10, 32)
    if name in ("lstm", "gru"):
        return RecurrentLM(nn.LSTM if name == "lstm" else nn.GRU), torch.randint(0, 50, (2, 7))
    return _hf(name)


MODELS = ["resnet18", "mobilenet_v3_small", "vit_b_16", "swin_t", "transformer_encoder", "lstm", "gru",
          "gpt2", "gpt2_eager", "bert", "llama"]


@pytest.mark.parametrize("name", MODELS)
def test_int8_everywhere_covers_every_mac_input_and_weight(name):
    model, x = build(name)
    cov = bw.coverage(model.eval(), {"*": "int8"}, x)
    assert cov.mac_fraction == 1.0 and cov.weight_fraction == 1.0 and cov.left_out.empty, str(cov)
    # The denominators are the model's, not what the sites happen to know about.
    weights = {id(p): p.numel() for p in model.parameters() if p.dim() >= 2}
    table = cov.table[cov.table["kind"] == "weight"]
    assert table.drop_duplicates("param")["elements"].sum() == sum(weights.values())
    assert str(cov).startswith("quantizes 100.0% of MAC inputs and 100.0% of weight elements; left out: nothing")


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "gpt2", "gpt2_eager", "bert"])
def test_macs_agree_with_torch_flop_counter(name):
    model, x = build(name)
    table = bw.sites(model.eval(), x)
    with FlopCounterMode(display=False) as counter:  # with grad: no fused attention fast path
        model(x)
    acts = table[table["kind"] == "activation"]
    sdpa = acts["op"] == "sdpa"
    # One product per op call; the flop counter does not count attention on the CPU
    assert acts.loc[~sdpa, "macs"].sum() == counter.get_total_flops() // 2
    for row in acts[sdpa].itertuples():  # q·kᵀ for q and k, p·v for v: batch × heads × L × S × E
        assert row.macs == row.elements * row.shape[-2], row.site


@pytest.mark.parametrize("name", MODELS)
def test_two_bits_at_one_site_changes_the_output_and_none_restores_it(name):
    model, x = build(name)
    model.eval()
    table = bw.sites(model, x)
    with torch.no_grad():
        ref = model(x)
        bw.wrap(model, {})
        assert torch.equal(model(x), ref)  # an empty plan is the model itself
        acts = table[table["kind"] == "activation"]["site"].tolist()
        for site in (acts[len(acts) // 3], acts[len(acts) // 2]):
            bw.set_plan(model, {site: bw.QuantSpec(weight="int2", activation="int2")})
            assert not torch.equal(model(x), ref), site
            bw.set_plan(model, {site: None})
            assert torch.equal(model(x), ref), site
    bw.unwrap(model)
    assert engine_of(model) is None


# ----------------------------------------------------------------------------- resnet18 against a reference

class RefQuant(nn.Module):
    """The layer's computation written out: quantized input and weight, then the op (the old wrappers' maths)."""

    def __init__(self, layer: nn.Module, spec: bw.QuantSpec) -> None:
        super().__init__()
        self.layer, self.spec = layer, spec

    def forward(self, x):
        layer, spec = self.layer, self.spec
        if spec.activation is not None:
            x = spec.activation.quantize(x)
        w = layer.weight if spec.weight is None else spec.weight.quantize(layer.weight, axis=0)
        if isinstance(layer, nn.Conv2d):
            y = nn.functional.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        else:
            y = nn.functional.linear(x, w, layer.bias)
        if spec.gradient is not None and y.requires_grad:
            y = bw.functional.quantize_gradient(y, spec.gradient.quantize)
        return y


def test_resnet18_matches_a_written_out_reference_forward_and_backward():
    model, x = build("resnet18")
    model.train()
    plan = {"*": bw.QuantSpec(weight=IntFormat(4, granularity="channel"), activation="int8", gradient="fixed16_8"),
            "layer2.*": bw.QuantSpec(weight="e4m3", activation="e5m2")}
    ref = copy.deepcopy(model)
    specs = bw.resolve_plan(model, plan)
    for name, m in list(ref.named_modules()):
        for child_name, child in list(m.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in specs:
                setattr(m, child_name, RefQuant(child, specs[full]))
    bw.wrap(model, plan)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    expected = ref(x)
    assert torch.equal(out, expected)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(model.parameters()), g)
    ref_grads = torch.autograd.grad(expected, list(ref.parameters()), g)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))


# ----------------------------------------------------------------------------- the contract

def test_state_dict_and_parameters_stay_the_originals_also_when_a_forward_fails():
    model, x = build("gpt2")
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    bw.wrap(model, {"*": "int4"})
    model(x).sum().backward()
    assert list(model.state_dict()) == keys and dict(model.named_parameters()) == params
    assert all(p.grad is not None for p in params.values() if p.dim() >= 2)
    modes = torch._C._len_torch_function_stack()
    with pytest.raises(IndexError):
        model(torch.full((1, 4), 1000))  # out of the vocabulary: fails inside the forward
    assert dict(model.named_parameters()) == params and torch._C._len_torch_function_stack() == modes
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()  # the optimizer holds the very parameters the model reads
    bw.unwrap(model)
    assert list(model.state_dict()) == keys and not any(m._forward_hooks or m._forward_pre_hooks
                                                         for m in model.modules())


def test_tied_weights_share_a_parameter_but_each_read_is_its_own_site():
    model, x = build("gpt2_eager")
    table = bw.sites(model, x)
    weights = table[table["kind"] == "weight"].set_index("site")["param"]
    assert weights["model.lm_head"] == weights["model.transformer.wte"] == "model.transformer.wte.weight"
    half = bw.coverage(model, {"model.lm_head": bw.QuantSpec(weight="int4")}, x)
    assert half.weight_fraction < 0.5  # a parameter counts only when every read of it is quantized
    seen = []
    bw.wrap(model, {"model.lm_head": bw.QuantSpec(weight="int2")})
    engine_of(model).taps.append(lambda site, kind, t, q: seen.append((site, t)) if kind == "weight" and q else None)
    with torch.no_grad():
        model(x)
    assert [s for s, _ in seen] == ["model.lm_head"] and seen[0][1].unique().numel() <= 4


def test_attention_sites_are_named_by_module_op_and_input():
    model, x = build("gpt2_eager")
    names = set(bw.sites(model, x)["site"])
    assert {"model.transformer.h.0.attn:matmul.0", "model.transformer.h.0.attn:matmul.1"} <= names
    model, x = build("gpt2")
    names = set(bw.sites(model, x)["site"])
    assert {f"model.transformer.h.1.attn:sdpa.{q}" for q in "qkv"} <= names
    model, x = build("transformer_encoder")
    names = set(bw.sites(model, x)["site"])
    assert {"layers.0.self_attn.in_proj_weight", "layers.0.self_attn.out_proj", "layers.0.self_attn:sdpa.q",
            "layers.0.linear1"} <= names
    # A pattern over attention reaches its inputs, also those not seen before the first forward
    with torch.no_grad():
        ref = model(x)
        bw.wrap(model, {"*:sdpa.k": "int2"})
        assert not torch.equal(model(x), ref)
    bw.set_plan(model, {"*attn*": "int4"})
    assert "layers.1.self_attn:sdpa.k" in bw.plan_of(model) and "layers.1.linear1" not in bw.plan_of(model)


def test_mha_with_weights_and_cross_attention_quantize_every_product():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True).eval()
    tgt, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    cov = bw.coverage(dec, {"*": "int8"}, (tgt, mem))
    assert cov.mac_fraction == 1.0 and cov.weight_fraction == 1.0
    # The cross attention splits its packed projection: both halves are the same weight site.
    rows = cov.table[(cov.table["site"] == "multihead_attn.in_proj_weight") & (cov.table["kind"] == "activation")]
    assert rows["macs"].item() == 2 * 5 * 16 * 16 + 2 * 7 * 16 * 32
    mha = nn.MultiheadAttention(16, 2).eval()
    q = torch.randn(5, 2, 16)
    names = set(bw.sites(mha, (q, q, q)).query("kind == 'activation'")["site"])  # need_weights=True: bmm path
    assert names == {"in_proj_weight", "out_proj", ":bmm.0", ":bmm.1"}  # scores, then weights @ v


def test_recurrent_layers_run_step_by_step_with_the_same_result():
    for cell in (nn.LSTM, nn.GRU, nn.RNN):
        torch.manual_seed(0)
        rnn = cell(6, 8, num_layers=2, bidirectional=True, batch_first=True)
        x = torch.randn(3, 5, 6, requires_grad=True)
        ref = rnn(x)[0]
        (ref_grad,) = torch.autograd.grad(ref.sum(), x)
        bw.wrap(rnn, {"weight_hh_l1": bw.QuantSpec(gradient="fixed16_4")})  # the steps run in Python
        out = rnn(x)[0]
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.allclose(out, ref, atol=1e-5), cell
        assert not torch.allclose(grad, ref_grad, atol=1e-3), cell  # the hidden state's gradient is quantized
        bw.set_plan(rnn, {"weight_hh_l0": bw.QuantSpec(activation="int2")})
        assert not torch.allclose(rnn(x)[0], ref, atol=1e-3)
        bw.set_plan(rnn, {})
        assert torch.equal(rnn(x)[0], ref)  # nothing to do: the fused kernel again
    lstm = nn.LSTM(4, 6, proj_size=3)
    assert bw.coverage(lstm, {"*": "int8"}, torch.randn(5, 2, 4)).mac_fraction == 1.0


def test_record_sees_op_sites_with_their_gradients():
    model, x = build("gpt2_eager")
    with bw.record(model, layers="*attn:matmul*", kinds=("activation", "gradient")) as rec:
        model(x).logsumexp(-1).sum().backward()
    df = rec.to_frame()
    assert set(df["layer"]) == {f"model.transformer.h.{i}.attn:matmul.{j}" for i in (0, 1) for j in (0, 1)}
    assert set(df["kind"]) == {"activation", "gradient"} and (df["count"] > 0).all()
    assert (df["layer_type"] == "matmul").all() and (df["macs"] > 0).all()


# ----------------------------------------------------------------------------- registry

class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(6, 4))  # (in, out): x @ kernel
        self.table = nn.Parameter(torch.randn(3, 3))  # not a weight of this module

    def forward(self, x):
        return x @ self.kernel


def test_registry_names_weights_and_their_channel_axis():
    torch.manual_seed(0)
    model = nn.Sequential(Gate())
    assert set(bw.sites(model, torch.randn(2, 6))["site"]) == {"0.kernel", "0.table"}
    bw.register_module(Gate, {"kernel": 1})
    try:
        table = bw.sites(model, torch.randn(2, 6))
        assert table.set_index(["site", "kind"]).loc[("0.table", "weight"), "quantizable"].item() is False
        fmt = IntFormat(3, granularity="channel")
        bw.wrap(model, {"0.kernel": bw.QuantSpec(weight=fmt)})
        x = torch.randn(5, 6)
        assert torch.equal(model(x), x @ fmt.quantize(model[0].kernel, axis=1))
    finally:
        from bitwidth import registry

        registry._RULES.pop(Gate)


def test_hf_conv1d_weights_are_per_channel_along_their_output_axis():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(5, 3)  # weight (3, 5): in, out
    fmt = IntFormat(3, granularity="channel")
    bw.wrap(conv, {"*": bw.QuantSpec(weight=fmt)})
    x = torch.randn(4, 3)
    assert torch.allclose(conv(x), x @ fmt.quantize(conv.weight, axis=1) + conv.bias)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: bw.register_module(int, {"weight": 0}), "needs an nn.Module subclass"),
    (lambda: bw.register_module(nn.Linear, {"weight": "0"}), "channel axes"),
    (lambda: bw.register_module("Linear", {"weight": 0}), "package.module.Class"),
])
def test_bad_registrations_are_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_plans_name_what_exists():
    model, x = build("gpt2_eager")
    with pytest.raises(ValueError, match="closest sites: model.transformer.h.0.attn.c_attn"):
        bw.wrap(model, {"model.transformer.h.0.attn.c_atn": "int4"})
    with pytest.raises(ValueError, match="'.*nothing.*' matches no site"):
        bw.wrap(model, {"*nothing*": "int4"})
    bw.wrap(model, {"model.transformer.h.0.attn:matmul.0": "int4"})  # an op site: accepted before it has run
    with pytest.raises(ValueError, match="matches no site"):
        bw.coverage(model, {"model.transformer.h.0.attn:matmul.7": "int4"}, x)  # once run: checked exactly
    with pytest.raises(ValueError, match="unwrap it"):
        bw.wrap(nn.Sequential(model), {})


def test_a_weight_reused_with_autograd_on_gives_the_exact_gradient_and_follows_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv1d(1, 2, 3))
    x = torch.randn(4, 1, 6)
    fmt = bw.QuantSpec(weight=IntFormat(3, scale="percentile", percentile=90.0))  # clips: the mask matters
    bw.wrap(model, {"*": fmt})

    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    first = grads()  # quantized afresh
    again = grads()  # reused through the cached mask
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert (model[0].weight.grad == 0).any()  # clipped weights get no gradient, also when reused
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # an update: the next forward quantizes the new weight
    out = model(x)
    expected = nn.functional.conv1d(torch.relu(nn.functional.linear(
        x, fmt.weight.quantize(model[0].weight, axis=0), model[0].bias)), fmt.weight.quantize(model[2].weight, axis=0),
        model[2].bias)
    assert torch.equal(out, expected)
