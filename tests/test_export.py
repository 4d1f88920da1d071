"""Export: plans as ONNX Q/DQ run in onnxruntime, torchao, and `bitwidth export` on a run directory."""

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bitwidth as bw
from bitwidth.cli import main

onnx = pytest.importorskip("onnx", reason="needs pip install 'bitwidth[export]'")
ort = pytest.importorskip("onnxruntime", reason="needs pip install 'bitwidth[export]'")
pytest.importorskip("onnxscript", reason="needs pip install 'bitwidth[export]'")

from onnx import numpy_helper  # noqa: E402

from bitwidth.export_onnx import deploy_type, export_onnx  # noqa: E402
from bitwidth.tasks import make_task  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    task = make_task("digits_cnn")
    model = task.build_model(0).eval()
    x = next(iter(task.val_batches()))[0][:32]
    calib = [b[0] for b in task.calib_batches(2)]
    return model, x, calib


def _simulated(model, plan, x, calib):
    sim = bw.wrap(copy.deepcopy(model), plan)
    bw.calibrate(sim, calib)
    with torch.no_grad():
        return sim, sim(x)


def _run(path, x, optimize=False):
    opts = ort.SessionOptions()
    if not optimize:  # the graph as written: exactly the simulation's arithmetic
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _inits(path):
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def _weight(inits, site):
    """The dequantized weight of ``site`` from its integer initializer, and the codes themselves."""
    codes = numpy_helper.to_array(inits[f"{site}.weight.codes"]).astype(np.float64)
    scale = numpy_helper.to_array(inits[f"{site}.weight.scale"]).astype(np.float64)
    zero = numpy_helper.to_array(inits[f"{site}.weight.zero_point"]).astype(np.float64)
    shape = [-1] + [1] * (codes.ndim - 1) if scale.ndim else []
    return (codes - zero.reshape(shape)) * scale.reshape(shape), codes


def test_w8a8_digits_cnn_runs_and_its_integer_weights_are_the_fake_quantized_ones(digits, tmp_path):
    model, x, calib = digits
    path = tmp_path / "w8a8.onnx"
    summary = export_onnx(model, {"*": "int8"}, x, path, calib=calib)
    inits = _inits(path)
    for site in ("conv1", "conv2", "fc1", "fc2"):
        w = getattr(model, site).weight.detach()
        assert inits[f"{site}.weight.codes"].data_type == onnx.TensorProto.INT8
        assert f"{site}.weight" not in inits  # no float copy of a quantized weight
        scale = float(numpy_helper.to_array(inits[f"{site}.weight.scale"]))
        fake = bw.parse_format("int8").quantize(w)
        codes = numpy_helper.to_array(inits[f"{site}.weight.codes"])
        np.testing.assert_array_equal(codes, np.round(fake.numpy() / scale).astype(np.int8))
        assert np.abs(codes).max() == 127  # the max scale: the largest weight takes the largest code
    _, want = _simulated(model, {"*": "int8"}, x, calib)
    np.testing.assert_allclose(_run(path, x), want.numpy(), atol=1e-5)
    got = _run(path, x, optimize=True)  # onnxruntime's fused kernels: the deployment itself
    assert (got.argmax(1) == want.numpy().argmax(1)).mean() >= 0.95
    assert summary.changed.empty and summary.sites["exact"].all()
    assert set(summary.sites["deployed"]) == {"int8", "uint8"}  # activations: the same grid, shifted
    assert summary.max_abs_diff < 0.1 and summary.file_bytes == path.stat().st_size


def test_int4_per_channel_weights_round_trip(digits, tmp_path):
    model, x, calib = digits
    fmt = bw.IntFormat(4, granularity="channel")
    plan = {"*": bw.QuantSpec(weight=fmt)}
    path = tmp_path / "w4.onnx"
    export_onnx(model, plan, x, path, calib=calib)
    inits = _inits(path)
    for site in ("conv1", "fc1"):
        w = getattr(model, site).weight.detach()
        assert inits[f"{site}.weight.codes"].data_type == onnx.TensorProto.INT4
        deq, codes = _weight(inits, site)
        assert codes.min() >= -8 and codes.max() <= 7
        assert numpy_helper.to_array(inits[f"{site}.weight.scale"]).shape == (w.shape[0],)  # one per channel
        np.testing.assert_allclose(deq, fmt.quantize(w, axis=0).numpy(), rtol=0, atol=1e-7)
    dq = {n.name: n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"}
    assert [a.i for a in dq["conv1.weight/dq"].attribute if a.name == "axis"] == [0]
    _, want = _simulated(model, plan, x, calib)
    np.testing.assert_allclose(_run(path, x), want.numpy(), atol=1e-5)


def test_widths_a_runtime_cannot_hold_are_widened_and_reported(digits, tmp_path):
    model, x, calib = digits
    plan = {"conv1": bw.QuantSpec(weight="int3", activation="int5"), "conv2": "e2m3", "fc1": "int24",
            "fc2": bw.QuantSpec(weight="fixed8_4", gradient="fixed16_8")}
    summary = export_onnx(model, plan, x, tmp_path / "odd.onnx", calib=calib)
    rows = summary.sites.set_index(["site", "kind"])
    assert rows.loc[("conv1", "weight"), "deployed"] == "int4"
    assert "int3 grid kept in int4" in rows.loc[("conv1", "weight"), "note"]
    assert rows.loc[("conv1", "activation"), "deployed"] == "uint8" and rows.loc[("conv1", "activation"), "exact"]
    assert rows.loc[("conv2", "activation"), "deployed"] == "float8e4m3fn"
    assert not rows.loc[("conv2", "activation"), "exact"]  # another float grid: said, not hidden
    assert rows.loc[("conv2", "weight"), "exact"]  # every e2m3 value is an e4m3fn value
    assert rows.loc[("fc1", "weight"), "deployed"] == "float32" and "left in float32" in rows.loc[("fc1", "weight"),
                                                                                                   "note"]
    assert "training only" in rows.loc[("fc2", "gradient"), "note"]
    assert len(summary.sites) == 8  # every (site, kind) of the plan has a row: nothing dropped
    text = str(summary)
    assert "conv1 weight: int3 -> int4" in text and "conv2 activation: e2m3 -> float8e4m3fn" in text
    inits = _inits(tmp_path / "odd.onnx")
    deq, codes = _weight(inits, "conv1")
    assert codes.min() >= -4 and codes.max() <= 3  # the int3 grid inside int4 storage
    np.testing.assert_allclose(deq, bw.parse_format("int3").quantize(model.conv1.weight.detach()).numpy(), atol=1e-7)
    assert float(numpy_helper.to_array(inits["fc2.weight.scale"])) == 2.0**-4  # fixed point: a power-of-two scale
    assert inits["conv2.weight.codes"].data_type == onnx.TensorProto.FLOAT8E4M3FN
    assert "fc1.weight" in inits and inits["fc1.weight"].data_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("fmt,onnx_types", [("e4m3", {"float8e4m3fn"}), ("e5m2", {"float8e5m2"}),
                                            ("fp16", {"float16"}), ("fixed12_6", {"int16", "uint16"}),
                                            ("uint8", {"uint8"})])
def test_formats_with_an_onnx_type_run_exactly(digits, tmp_path, fmt, onnx_types):
    model, x, calib = digits
    path = tmp_path / f"{fmt}.onnx"
    summary = export_onnx(model, {"*": fmt}, x, path, calib=calib)
    assert set(summary.sites["deployed"]) == onnx_types and summary.sites["exact"].all()
    _, want = _simulated(model, {"*": fmt}, x, calib)
    np.testing.assert_allclose(_run(path, x), want.numpy(), atol=1e-4)


def test_deploy_type_table():
    assert deploy_type(bw.IntFormat(2)) == ("int4", True)
    assert deploy_type(bw.IntFormat(2, signed=False), "activation") == ("uint8", True)
    assert deploy_type(bw.IntFormat(12), "activation") == ("uint16", True)
    assert deploy_type(bw.IntFormat(12)) == ("int16", True)
    assert deploy_type(bw.IntFormat(8, rounding="stochastic")) == ("int8", False)
    assert deploy_type(bw.parse_format("e3m4")) == ("float16", False)
    assert deploy_type(bw.parse_format("bf16")) == ("bfloat16", True)
    assert deploy_type(bw.FloatFormat(8, 10)) == ("float32", False)


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_int_weights_are_blocked_dequantize_linear(digits, tmp_path, symmetric):
    model, x, calib = digits
    fmt = bw.parse_format("int4_g32", symmetric=symmetric)
    plan = {"*": bw.QuantSpec(weight=fmt)}
    path = tmp_path / "g32.onnx"
    summary = export_onnx(model, plan, x, path, calib=calib)
    assert set(summary.sites["deployed"]) == {"int4"} and summary.sites["exact"].all()
    assert set(summary.sites["granularity"]) == {"block32"}
    inits = _inits(path)
    dq = {n.name: n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"}
    for site in ("conv2", "fc1"):  # conv2: 16·3·3 = 144 = 4 blocks of 32 and a last one of 16
        w = getattr(model, site).weight.detach()
        rows = w.reshape(len(w), -1)  # (out, rest) in memory order, as bitwidth.blocks sees a weight
        codes = numpy_helper.to_array(inits[f"{site}.weight.codes"]).astype(np.float64)
        scale = numpy_helper.to_array(inits[f"{site}.weight.scale"])
        assert inits[f"{site}.weight.codes"].data_type == onnx.TensorProto.INT4 and codes.shape == rows.shape
        assert scale.dtype == np.float16 and scale.shape == (len(w), -(-rows.shape[1] // 32))  # fp16, as simulated
        assert {a.name: a.i for a in dq[f"{site}.weight/dq"].attribute} == {"axis": 1, "block_size": 32}
        per = np.repeat(scale.astype(np.float64), 32, axis=1)[:, : rows.shape[1]]
        zero = np.zeros_like(per)
        if not symmetric:
            zero = np.repeat(numpy_helper.to_array(inits[f"{site}.weight.zero_point"]).astype(np.float64), 32,
                             axis=1)[:, : rows.shape[1]]
            assert zero.any()
        fake = fmt.quantize(w, axis=0).reshape(rows.shape).double().numpy()
        np.testing.assert_array_equal(codes - zero, fake / per)  # the fake-quantized weights ÷ their block scales
        assert codes.min() >= -8 and codes.max() <= 7
    assert "fc1.weight" not in inits  # no float copy of a quantized weight
    _, want = _simulated(model, plan, x, calib)
    np.testing.assert_allclose(_run(path, x), want.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(_run(path, x, optimize=True), want.numpy(), rtol=0, atol=1e-4)


def test_block_formats_onnxruntime_cannot_run_stay_float_and_are_listed(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(8, 64)
    plan = {"0": bw.QuantSpec(weight="mxfp4", activation="int4_g32"), "2": "nvfp4"}
    summary = export_onnx(model, plan, x, tmp_path / "mx.onnx")
    rows = summary.sites.set_index(["site", "kind"])
    assert len(rows) == 4 and set(rows["deployed"]) == {"float32"} and not rows["exact"].any()
    assert "float8e8m0" in rows.loc[("0", "weight"), "note"] and "float4e2m1" in rows.loc[("0", "weight"), "note"]
    assert "computed at run time" in rows.loc[("0", "activation"), "note"]
    assert "float4e2m1" in rows.loc[("2", "activation"), "note"]
    text = str(summary)
    assert "0 weight: mxfp4 -> float32" in text and "2 weight: nvfp4 -> float32" in text


def test_transformer_exports_and_runs(tmp_path):
    task = make_task("tiny_lm", "pytext", train_bytes=4096, val_bytes=2048)
    model = task.build_model(0).eval()
    x = next(iter(task.val_batches()))[0][:4]
    path = tmp_path / "lm.onnx"
    summary = export_onnx(model, {"*": "int8"}, x, path, calib=[x])
    names = {n.name for n in onnx.load(str(path)).graph.node}
    for site in ("blocks.0.attn:sdpa.q", "blocks.0.attn:sdpa.k", "blocks.0.attn:sdpa.v", "head", "tok_emb"):
        assert any(n.startswith(site + ".") for n in names), site
    assert {"weight", "activation"} <= set(summary.sites["kind"])
    op_sites = summary.sites[summary.sites["site"].str.contains(":")]
    assert len(op_sites) and set(op_sites["kind"]) == {"activation"}  # an attention input has no weight row
    _, want = _simulated(model, {"*": "int8"}, x, [x])
    np.testing.assert_allclose(_run(path, x), want.numpy(), atol=1e-4)
    longer = torch.cat([x, x])  # the batch size is dynamic in the file
    assert _run(path, longer, optimize=True).shape == (8, *want.shape[1:])


def test_bad_export_arguments_are_value_errors(digits, tmp_path):
    model, x, _ = digits
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(model, {"*": "int8"}, x, tmp_path / "m.txt")
    with pytest.raises(ValueError, match="opset must be an integer >= 21"):
        export_onnx(model, {"*": "int8"}, x, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ValueError, match="matches no site"):
        export_onnx(model, {"fc9": "int8"}, x, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="tensor or a tuple of tensors"):
        export_onnx(model, {"*": "int8"}, [x], tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mlp"
    code = main(["run", str(Path(__file__).parent.parent / "configs/quickstart.yaml"), "--out", str(out),
                 "--set", "task.model=digits_mlp", "--set", "train.epochs=3", "--set", "search.candidates=[4,8]",
                 "--set", "search.strategy=grid", "--set", "stats.enabled=false", "--set", "deploy.to=[onnx]",
                 "--set", "deploy.repeats=2", "--quiet"])
    assert code == 0
    return out


def test_the_run_records_deployed_metrics_and_export_replaces_them(run_dir, capsys):
    table = pd.read_csv(run_dir / "deploy.csv")  # written by the run itself (deploy.to: [onnx])
    assert list(table["plan"]) == ["joint", "uniform"]
    assert (table["deployed"] - table["simulated"]).abs().max() <= 0.02
    assert (table["latency_ms"] > 0).all() and (table["fp32_latency_ms"] > 0).all()
    assert (run_dir / "deploy" / "joint.onnx").exists() and (run_dir / "deploy" / "fp32.onnx").exists()
    sites = pd.read_csv(run_dir / "deploy_sites.csv")
    assert {"mismatch", "max_abs_diff", "stored_bits"} <= set(sites.columns)
    report = (run_dir / "report.md").read_text()
    assert "Simulation vs deployment" in report and "deployed accuracy" in report
    assert main(["export", str(run_dir), "--plan", "joint", "--repeats", "1"]) == 0  # replaces its own rows
    assert "joint: onnxruntime accuracy" in capsys.readouterr().out
    assert list(pd.read_csv(run_dir / "deploy.csv")["plan"]) == ["uniform", "joint"]


def test_deploy_needs_a_searched_plan():
    from bitwidth.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="deploy.to: mode 'adaptive' finds a schedule"):
        load_config(None, ["mode=adaptive", "deploy.to=[onnx]"])
    with pytest.raises(ConfigError, match="deploy.to"):
        load_config(None, ["deploy.to=[tflite]"])


def test_export_usage_errors_exit_2(run_dir, tmp_path, capsys, monkeypatch):
    assert main(["export", str(tmp_path), "--to", "onnx"]) == 2
    assert "no joint_plan.yaml" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--to", "tflite"]) == 2
    assert "unknown export target 'tflite'; allowed: onnx, torchao" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--plan", "best"]) == 2
    assert "--plan is joint, uniform or a plan YAML file" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(tmp_path / "a.onnx")]) == 2  # two plans, one file
    assert "exactly one --plan" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["export", str(run_dir), "--plan", "joint"]) == 2
    assert "pip install 'bitwidth[export]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_torchao_applies_linear_configs_and_lists_what_it_cannot(tmp_path):
    pytest.importorskip("torchao", reason="needs pip install 'bitwidth[ao]'")
    from bitwidth.export_torchao import to_torchao

    task = make_task("digits_cnn")
    model = task.build_model(0).eval()
    plan = {"conv1": "int8", "fc1": bw.QuantSpec(weight="int4"), "fc2": "int8"}
    quantized, sites = to_torchao(model, plan)
    rows = sites.set_index(["site", "kind"])
    assert rows.loc[("fc1", "weight"), "deployed"] == "IntxWeightOnlyConfig"
    assert rows.loc[("fc2", "weight"), "deployed"] == "Int8DynamicActivationInt8WeightConfig"
    assert rows.loc[("conv1", "weight"), "deployed"] == "float" and "nn.Linear only" in rows.loc[("conv1", "weight"),
                                                                                                  "note"]
    assert type(model.fc1.weight).__name__ == "Parameter"  # the caller's model is untouched
    assert type(quantized.fc1.weight).__name__ != "Parameter"
    x = next(iter(task.val_batches()))[0][:16]
    with torch.no_grad():
        assert quantized(x).shape == model(x).shape
