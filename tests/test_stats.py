"""Distribution recording: every statistic against numpy, hooks, memory, snapshots, error analysis."""

import copy
import gc
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

import bitwidth as bw
from bitwidth.families import make_format
from bitwidth.sites import engine_of
from bitwidth.stats import PERCENTILES, Recorder, hist_edges, record
from bitwidth.stats_analysis import analyze, predict_min_bits, sweep
from bitwidth.wrap import covered_layers

EXACT = ("count", "min", "max", "absmax", "zero_frac", "nan_count", "inf_count")


def bin_of(v: float) -> int:
    """Index of the histogram bin holding |v|."""
    return int(np.searchsorted(hist_edges(), abs(v), side="right")) - 1


def reference(*tensors: torch.Tensor) -> dict:
    """The statistics of the concatenated data, in float64 numpy, over the finite values."""
    a = np.concatenate([t.detach().double().numpy().ravel() for t in tensors])
    f = a[np.isfinite(a)]
    d = f - f.mean()
    m2 = (d**2).mean()
    return {
        "count": f.size, "min": f.min(), "max": f.max(), "absmax": np.abs(f).max(), "mean": f.mean(),
        "std": np.sqrt(m2), "kurtosis": (d**4).mean() / m2**2 - 3, "zero_frac": (f == 0).mean(),
        "nan_count": int(np.isnan(a).sum()), "inf_count": int(np.isinf(a).sum()),
        # numpy interpolates between these two order statistics of |x|
        "around": [(np.sort(np.abs(f))[int(np.floor(p))], np.sort(np.abs(f))[int(np.ceil(p))])
                   for p in np.array(PERCENTILES) / 100 * (f.size - 1)],
    }


def check(row: pd.Series, ref: dict) -> None:
    for key in EXACT:
        assert row[key] == ref[key], key
    assert row["mean"] == pytest.approx(ref["mean"], rel=1e-6, abs=1e-9 * ref["std"])
    assert row["std"] == pytest.approx(ref["std"], rel=1e-6)
    assert row["kurtosis"] == pytest.approx(ref["kurtosis"], rel=1e-5, abs=1e-5)
    for col, (lo, hi) in zip(("p99", "p999", "p9999"), ref["around"], strict=True):
        # Within one histogram bin of numpy's percentile (of the two values it interpolates
        # between, which for large data share a bin).
        assert bin_of(lo) - 1 <= bin_of(row[col]) <= bin_of(hi) + 1, (col, row[col], lo, hi)


def row_of(df: pd.DataFrame, layer: str, kind: str, quantized: bool = False, **extra) -> pd.Series:
    sel = (df["layer"] == layer) & (df["kind"] == kind) & (df["quantized"] == quantized)
    for k, v in extra.items():
        sel &= df[k] == v
    assert sel.sum() == 1, (layer, kind, quantized, extra)
    return df[sel].iloc[0]


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture
def batches():
    """Batches of different means, shapes and tails; one is large enough to skip the pooling."""
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(300, 8, generator=g) * 3 + 5,
        torch.rand(200, 8, generator=g) ** 3,
        torch.randn(9000, 8, generator=g).relu() * 1e-3,  # 72000 values, 50% zeros
        torch.randn(50, 8, generator=g).exp() * 100,  # heavy tail
    ]


def test_statistics_match_numpy_over_batches(batches):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    grads = [torch.randn(len(x), 4) * (i + 1) * (torch.rand(len(x), 4) < 0.7) for i, x in enumerate(batches)]
    with record(model) as rec:
        for x, g in zip(batches, grads, strict=True):
            model(x).backward(g)
    df = rec.to_frame()
    assert len(df) == 3 and "step" not in df.columns
    check(row_of(df, "0", "activation"), reference(*batches))
    check(row_of(df, "0", "gradient"), reference(*grads))
    check(row_of(df, "0", "weight"), reference(model[0].weight))
    row = row_of(df, "0", "weight")
    assert (row["layer_type"], row["params"], row["macs"]) == ("Linear", 32, 32.0)  # the weight site's elements


def test_nan_and_inf_are_counted_and_poison_nothing(batches):
    bad = batches[1].clone()
    bad[0, 0], bad[1, 1], bad[2, 2], bad[3, 3] = float("nan"), float("inf"), -float("inf"), float("nan")
    all_nan = torch.full((10, 8), float("nan"))
    model = nn.Sequential(nn.Linear(8, 4))
    with record(model, kinds="activation") as rec:
        for x in (batches[0], bad, all_nan, batches[2]):
            model(x)
    row = row_of(rec.to_frame(), "0", "activation")
    ref = reference(batches[0], bad, all_nan, batches[2])
    assert (ref["nan_count"], ref["inf_count"]) == (82, 2)
    check(row, ref)
    sample = rec.sample("0", "activation")
    assert torch.isfinite(sample).all()
    assert np.isfinite(analyze(rec, "int8")["sqnr_db"]).all()


def test_only_nan_gives_counts_and_nan_figures():
    model = nn.Sequential(nn.Linear(2, 2))
    with record(model, kinds="activation") as rec:
        model(torch.full((3, 2), float("nan")))
    row = row_of(rec.to_frame(), "0", "activation")
    assert (row["count"], row["nan_count"]) == (0, 6)
    assert np.isnan(row[["min", "mean", "std", "p99"]].astype(float)).all()


def test_hooks_removed_on_exit_even_when_the_body_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"), record(model) as rec:
        out = model(torch.randn(3, 4))
        assert hooks_left(model) > 0
        raise RuntimeError("boom")
    assert hooks_left(model) == 0
    before = rec.to_frame()
    out.sum().backward(retain_graph=True)  # a backward after exit records nothing
    pd.testing.assert_frame_equal(rec.to_frame(), before)
    # The gradient hooks on the graph, which is still alive, are gone too: nothing holds the recorder.
    gone = weakref.ref(rec)
    del rec
    gc.collect()
    assert gone() is None
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_taps_removed_from_wrapped_layers_even_when_the_body_raises():
    model = bw.wrap(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), {"*": "int8"})
    with pytest.raises(KeyError), record(model, after_quant=True):
        model(torch.randn(3, 4))
        assert len(engine_of(model).taps) == 1
        raise KeyError
    assert engine_of(model).taps == []
    bw.set_plan(model, {})
    assert hooks_left(model) == 0  # nothing left to do: no hooks


def test_memory_does_not_grow_with_batches(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sizes, held = [], []
    for n in (4, 200):
        g = torch.Generator().manual_seed(0)
        with record(model, sample_size=512) as rec:
            for _ in range(n):
                model(torch.randn(64, 8, generator=g)).sum().backward()
            assert len(rec._grad_hooks) <= 8 * 2 + 64  # hook dicts of freed graphs are dropped
            held.append(sum(getattr(s, a).nbytes for s in rec._streams.values() for a in ("acc", "hist", "part",
                                                                                          "reservoir")))
        assert len(rec.sample("0", "activation")) == 512
        rec.save(tmp_path / f"{n}.pt")
        sizes.append((tmp_path / f"{n}.pt").stat().st_size)
    assert held[0] == held[1], held  # 50x the batches, the same arrays
    assert sizes[1] <= sizes[0] * 1.1, sizes  # saved histograms keep their nonzero range, which may widen
    with record(model, every=1) as rec:
        for _ in range(20):
            model(torch.randn(64, 8)).sum().backward()
            rec.step()
            # Closed snapshots pool nothing, keep no partial histograms, and only the bins in use.
            assert all(s.buf is None and s.part is None and len(s.hist) < 400 for s in rec._streams.values())


def test_gradient_recorded_only_where_the_output_gradient_exists():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # its output needs no gradient: nothing flows there
    with record(model, kinds="gradient") as rec:
        model(torch.randn(5, 4)).sum().backward()
        with torch.no_grad():
            model(torch.randn(5, 4))
    df = rec.to_frame()
    assert df["layer"].tolist() == ["2"] and df["count"].tolist() == [10]


def test_gradient_is_taken_before_an_inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    x = torch.randn(7, 6)
    h = model[0](x)
    ref = torch.autograd.grad(model[2](torch.relu(h)).square().sum(), h)[0]  # d loss / d layer-0 output
    with record(model, kinds="gradient", sample_size=100) as rec:
        model(x).square().sum().backward()
    assert torch.equal(rec.sample("0", "gradient").sort().values, ref.flatten().sort().values)
    check(row_of(rec.to_frame(), "0", "gradient"), reference(ref))


def test_gradient_hooks_share_the_output_with_the_users_own():
    """A tensor hook the user put on a layer's output keeps working, during and after recording."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    seen = []
    model[0].register_forward_hook(lambda m, a, out: [out.register_hook(lambda g: seen.append(g.clone()))] and None)
    x = torch.randn(5, 4)
    with record(model, kinds="gradient") as rec:
        out = model(x)
        out.sum().backward(retain_graph=True)
    assert len(seen) == 1 and row_of(rec.to_frame(), "0", "gradient")["count"] == 15
    assert torch.equal(rec.sample("0", "gradient").sort().values, seen[0].flatten().sort().values)
    out.sum().backward()  # after exit: the user's hook still fires, ours is gone
    assert len(seen) == 2 and row_of(rec.to_frame(), "0", "gradient")["count"] == 15


def test_gradient_hooks_without_the_hook_dict_api(monkeypatch):
    """On a torch whose graph nodes lack ``_register_hook_dict``, the public Tensor.register_hook serves."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    with record(model, kinds="gradient") as fast:
        out = model(x)
        out.sum().backward(retain_graph=True)
    real_getattr = getattr

    def no_hook_dict(obj, name, *default):
        return None if name == "_register_hook_dict" else real_getattr(obj, name, *default)

    import bitwidth.stats as stats_module

    monkeypatch.setattr(stats_module, "getattr", no_hook_dict, raising=False)
    with record(model, kinds="gradient") as public:
        out = model(x)
        out.sum().backward(retain_graph=True)
        assert public._grad_hooks and all(key != id(public) for _, key in public._grad_hooks)  # handles' keys
    pd.testing.assert_frame_equal(public.to_frame(), fast.to_frame())
    gone = weakref.ref(public)
    del public
    gc.collect()
    assert gone() is None  # the graph is alive, our hooks on it are gone


def test_resnet18_every_layer_and_kind():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    logits = {}
    model.fc.register_forward_hook(lambda m, a, out: logits.setdefault("y", out))
    with record(model) as rec:
        model(x).square().sum().backward()
    df = rec.to_frame()
    layers = list(covered_layers(model))
    assert len(layers) == 21 and len(df) == 21 * 3
    assert df.groupby("layer", sort=False)["kind"].apply(list).to_dict() == {
        n: ["weight", "activation", "gradient"] for n in layers}
    check(row_of(df, "conv1", "activation"), reference(x))
    check(row_of(df, "fc", "gradient"), reference(2 * logits["y"]))
    conv1 = row_of(df, "conv1", "weight")
    assert (conv1["macs"], conv1["params"]) == (64 * 16 * 16 * 3 * 7 * 7, 64 * 3 * 7 * 7)
    assert (df["count"] > 0).all() and hooks_left(model) == 1  # only the test's own hook


def test_after_quant_records_quantized_tensors_on_the_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    bw.wrap(model, {"*": bw.QuantSpec(weight="fixed8_4", activation="fixed8_4", gradient="fixed8_4")})
    x = torch.randn(16, 8) * 4
    with record(model, after_quant=True) as rec:
        (model(x) * 100).sum().backward()
    df = rec.to_frame()
    assert len(df) == 12 and df["quantized"].sum() == 6
    fmt = bw.parse_format("fixed8_4")
    for row in df[df["quantized"]].itertuples():
        s = rec.sample(row.layer, row.kind, quantized=True) * 16
        assert torch.equal(s, s.round()) and s.abs().max() <= 128, (row.layer, row.kind)
        assert -8 <= row.min and row.max <= fmt.max_value
    check(row_of(df, "0", "activation"), reference(x))
    check(row_of(df, "0", "activation", True), reference(fmt.quantize(x)))
    check(row_of(df, "0", "weight", True), reference(fmt.quantize(model[0].weight)))


def test_every_n_makes_separate_snapshots_with_the_weight_at_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    xs = [torch.randn(10, 4) * (s + 1) + s for s in range(5)]
    weights = {}
    with record(model, kinds=("weight", "activation"), every=2) as rec:
        for s, x in enumerate(xs):
            model(x)
            with torch.no_grad():
                model[0].weight.add_(1.0)
            weights[s] = model[0].weight.detach().clone()
            rec.step()
    df = rec.to_frame()
    assert sorted(set(df["step"])) == [0, 2, 4] and len(df) == 6
    for s in (0, 2, 4):
        check(row_of(df, "0", "activation", step=s), reference(xs[s]))
        check(row_of(df, "0", "weight", step=s), reference(weights[s]))


def test_weight_is_summarized_once_however_often_the_frame_is_read():
    model = nn.Sequential(nn.Linear(4, 2))
    with record(model, kinds="weight") as rec:
        for _ in range(3):
            model(torch.randn(2, 4))
            assert rec.to_frame()["count"].tolist() == [8]
        with torch.no_grad():
            model[0].weight.mul_(2)
    check(row_of(rec.to_frame(), "0", "weight"), reference(model[0].weight))


def test_percentiles_interpolate_inside_their_bin():
    model = nn.Sequential(nn.Linear(1, 1))
    x = (torch.arange(100_000, dtype=torch.float32) + 0.5) / 100_000  # uniform on (0, 1)
    with record(model, kinds="activation") as rec:
        model(x.view(-1, 1))
    row = row_of(rec.to_frame(), "0", "activation")
    # The p99 bin is [0.9375, 1): a bin edge would be off by 0.01, linear interpolation is exact.
    assert row[["p99", "p999", "p9999"]].tolist() == pytest.approx([0.99, 0.999, 0.9999], abs=2e-5)


def test_reservoir_is_uniform_and_deterministic_for_a_seed():
    data = torch.arange(200_000, dtype=torch.float32)
    sizes = [1000, 70_000, 3000, 26_000, 100_000]

    def sample(seed: int) -> torch.Tensor:
        model = nn.Sequential(nn.Linear(1, 1))
        with record(model, kinds="activation", seed=seed) as rec:
            for part in data.split(sizes):
                model(part.view(-1, 1))
        return rec.sample("0", "activation")

    s = sample(0)
    assert len(s) == 4096 and len(s.unique()) == 4096 and s.min() >= 0 and s.max() < 200_000
    assert torch.equal(sample(0), s) and not torch.equal(sample(1), s)
    # Each part's share of the sample follows its share of the data (binomial sd < 0.008).
    edges = np.cumsum([0] + sizes)
    share = np.histogram(s.numpy(), bins=edges)[0] / 4096
    assert np.abs(share - np.array(sizes) / 200_000).max() < 0.035, share


def test_save_and_load_round_trip(tmp_path, batches):
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with record(model, every=1) as rec:
        for x in batches[:2]:
            model(x).sum().backward()
            rec.step()
    rec.save(tmp_path / "stats.pt")
    back = Recorder.load(tmp_path / "stats.pt")
    pd.testing.assert_frame_equal(back.to_frame(), rec.to_frame())
    pd.testing.assert_frame_equal(back.hist_frame(), rec.hist_frame())
    assert torch.equal(back.sample("2", "gradient", step=1), rec.sample("2", "gradient", step=1))
    pd.testing.assert_frame_equal(analyze(back, "int4"), analyze(rec, "int4"))


def test_macs_and_layer_types():
    model = nn.ModuleDict({
        "lin": nn.Linear(4, 8), "conv": nn.Conv2d(3, 8, 3, padding=1, groups=1),
        "dw": nn.Conv2d(8, 8, 3, padding=1, groups=8), "up": nn.ConvTranspose2d(4, 2, 3, stride=2),
        "emb": nn.Embedding(10, 3),
    })
    with record(model, kinds="weight") as rec:
        model["lin"](torch.randn(2, 3, 4))
        model["conv"](torch.randn(2, 3, 5, 5))
        model["dw"](torch.randn(2, 8, 5, 5))
        model["up"](torch.randn(2, 4, 3, 3))
        model["emb"](torch.tensor([[1, 2]]))
    got = rec.to_frame().set_index("layer")[["layer_type", "macs"]].T.to_dict()
    assert got == {
        "lin": {"layer_type": "Linear", "macs": 3 * 4 * 8},
        "conv": {"layer_type": "Conv2d", "macs": 8 * 25 * 3 * 9},
        "dw": {"layer_type": "Conv2d", "macs": 8 * 25 * 9},
        "up": {"layer_type": "ConvTranspose2d", "macs": 4 * 9 * 2 * 9},
        "emb": {"layer_type": "Embedding", "macs": 0.0},
    }


def test_layers_and_kinds_select_what_is_recorded():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    with record(model, layers=["1.*"], kinds="activation") as rec:
        model(torch.randn(3, 4))
    df = rec.to_frame()
    assert df[["layer", "kind"]].values.tolist() == [["1.0", "activation"], ["1.1", "activation"]]
    with record(model, layers=None, kinds=["weight"]) as rec:
        model(torch.randn(3, 4))
    assert rec.to_frame()["layer"].tolist() == ["0", "1.0", "1.1"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kinds": ("weights",)}, "kinds must be a non-empty subset of"),
    ({"layers": "fc9"}, "'fc9' match no site; sites: 0, 1"),
    ({"layers": []}, "layers must be None or name at least one"),
    ({"every": 0}, "every must be None or a positive integer"),
    ({"sample_size": -1}, "sample_size must be a non-negative integer"),
    ({"after_quant": True}, "needs a wrapped model"),
])
def test_bad_arguments_raise_with_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        record(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), **kwargs)


def test_other_bad_input_raises():
    with pytest.raises(ValueError, match="'0' match no site; sites: none"):
        record(nn.ReLU(), layers="0")
    model = nn.Sequential(nn.Linear(2, 2))
    rec = record(model)
    with rec, pytest.raises(ValueError, match="already recording"):
        rec.__enter__()
    with pytest.raises(ValueError, match="nothing recorded for layer='0' kind='gradient'"):
        rec.sample("0", "gradient")
    with pytest.raises(ValueError, match="analyze needs number formats"):
        analyze(rec, ["fp32"])
    with pytest.raises(ValueError, match="family must be one of .*got .posit."):
        predict_min_bits(rec, "posit", [4])
    with pytest.raises(ValueError, match="candidates must be integers"):
        sweep(rec, "int", ["int4"])


def int_reference(a: np.ndarray, absmax: float, bits: int) -> np.ndarray:
    top = 2 ** (bits - 1) - 1
    scale = np.float32(absmax) / np.float32(top)  # float32, as the quantizer computes it
    return np.clip(np.rint(a.astype(np.float32) / scale), -top - 1, top) * scale


@pytest.fixture
def act_recorder():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(4000, generator=g) * 4, torch.randn(1000, generator=g) * 1e-3])
    model = nn.Sequential(nn.Linear(1, 1))
    with record(model, kinds="activation", sample_size=2048) as rec:
        model(x.view(-1, 1))
    return rec


def test_analyze_matches_a_numpy_reference(act_recorder):
    rec = act_recorder
    a = rec.sample("0", "activation").double().numpy()
    absmax = float(rec.to_frame()["absmax"].iloc[0])
    refs = {
        "fixed8_4": (np.clip(np.rint(a * 16), -128, 127) / 16, 127 / 16, -8.0),
        "int4": (int_reference(a, absmax, 4), absmax, -absmax * 8 / 7),
    }
    df = analyze(rec, list(refs)).set_index("format")
    for name, (q, hi, lo) in refs.items():
        err = (q - a) ** 2
        row = df.loc[name]
        assert row["n_sample"] == 2048
        assert row["mse"] == pytest.approx(err.mean(), rel=1e-6)
        assert row["sqnr_db"] == pytest.approx(10 * np.log10((a**2).mean() / err.mean()), rel=1e-6)
        assert row["clip_frac"] == ((a > hi + 1e-9) | (a < lo - 1e-9)).mean()
        assert row["flush_frac"] == ((q == 0) & (a != 0)).mean()
    assert df.loc["fixed8_4", "clip_frac"] > 0 and df.loc["fixed8_4", "flush_frac"] > 0
    assert df.loc["int4", "clip_frac"] == 0  # the scale covers the recorded range


def test_predict_min_bits_is_the_smallest_width_meeting_the_threshold(act_recorder):
    sw = sweep(act_recorder, "int", range(2, 11))
    for thr in (10.0, 25.0, 40.0):
        pred = predict_min_bits(act_recorder, "int", range(2, 11), sqnr_db=thr)
        meets = sw[sw["sqnr_db"] >= thr]["bits"]
        assert pred["min_bits"].iloc[0] == meets.min()
        assert pred["format"].iloc[0] == f"int{meets.min()}"
    none = predict_min_bits(act_recorder, "int", [2, 3], sqnr_db=1e6)
    assert pd.isna(none["min_bits"].iloc[0]) and none["format"].iloc[0] is None
    assert none["sqnr_db"].iloc[0] == sw[sw["bits"] == 3]["sqnr_db"].iloc[0]


def test_fixed_family_places_the_binary_point_like_the_search(act_recorder):
    absmax = float(act_recorder.to_frame()["absmax"].iloc[0])
    sw = sweep(act_recorder, "fixed", [6, 8, 12])
    assert sw["format"].tolist() == [make_format("fixed", b, absmax=absmax).name for b in (6, 8, 12)]
    assert (sw["clip_frac"] == 0).all() and sw["sqnr_db"].is_monotonic_increasing


# ---------------------------------------------------------------- compiled kernels and sampler
def test_kernels_match_numpy():
    from bitwidth.stats_kernels import (
        COUNT,
        M2,
        M4,
        MAX,
        MEAN,
        MIN,
        PENDING,
        SEEN,
        ZEROS,
        abs_histogram,
        central_sums,
        fold,
        new_partials,
        new_state,
        scan,
        update,
    )

    def merge_in(values, acc, hist=None):  # a stream that keeps no sample (k = 0), its histogram folded
        hist = np.zeros(2048, np.int64) if hist is None else hist
        part = new_partials()
        done = update(np.asarray(values, np.float32), part, hist, acc, np.zeros(0, np.float32), np.zeros(1, np.uint64),
                      0, 512)
        fold(part, hist)
        return done

    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(5001, generator=g) * 1e3, torch.zeros(700), torch.rand(300, generator=g) * 1e-40,
                   -torch.rand(99, generator=g).exp(), torch.tensor([-0.0])])
    a = x.numpy()
    a64 = a.astype(np.float64)
    s1, s2, s3, s4, zeros, _, _ = scan(a, 3.0)
    d = a64 - 3.0
    assert (s1, s2, s3, s4) == pytest.approx([(d**p).sum() for p in (1, 2, 3, 4)], rel=1e-12)
    assert zeros == (a == 0).sum() >= 701
    assert central_sums(a, 3.0) == pytest.approx(((d**2).sum(), (d**3).sum(), (d**4).sum()), rel=1e-10)
    hist, part = np.zeros(2048, np.int64), new_partials()
    hist[5] = 7  # folding adds to what is there
    abs_histogram(a, part)
    fold(part, hist)
    assert not part.any()  # folding empties the partials
    codes = np.abs(a).view(np.int32) >> 20  # bit pattern of |x|: exponent and top 3 mantissa bits
    expected = np.bincount(codes, minlength=2048)
    assert np.array_equal(hist - np.eye(1, 2048, 5, dtype=np.int64)[0] * 7, expected)
    assert bin_of(float(a[0])) == codes[0]
    # The partials spill into the histogram before an int32 count could overflow.
    acc, hist, part = new_state(), np.zeros(2048, np.int64), new_partials()
    update(a[:100], part, hist, acc, np.zeros(0, np.float32), np.zeros(1, np.uint64), 0, 512)
    assert hist.sum() == 0 and part.sum() == 100 and acc[PENDING] == 100
    acc[PENDING] = 2**31 - 50
    update(a[100:200], part, hist, acc, np.zeros(0, np.float32), np.zeros(1, np.uint64), 0, 512)
    assert hist.sum() == 100 and part.sum() == 100 and acc[PENDING] == 100
    # update: two halves merged (Pébay) equal the whole; no sample kept (k = 0).
    acc, hist = new_state(), np.zeros(2048, np.int64)
    for half in (a[:3000], a[3000:]):
        assert merge_in(half, acc, hist) == 0
    assert np.array_equal(hist, expected)
    assert acc[[COUNT, MIN, MAX, ZEROS, SEEN]].tolist() == [a.size, a.min(), a.max(), zeros, a.size]
    assert acc[MEAN] == pytest.approx(a64.mean(), rel=1e-12)
    assert acc[M2] == pytest.approx(((a64 - a64.mean()) ** 2).sum(), rel=1e-12)
    assert acc[M4] == pytest.approx(((a64 - a64.mean()) ** 4).sum(), rel=1e-12)
    # A batch far from the running mean (1e6 sd away) takes the second, centring pass.
    far = (np.arange(1000, dtype=np.float32) * 1e-3 + 1e4).astype(np.float32)
    acc2 = new_state()
    for part in (a, far):
        merge_in(part, acc2)
    both = np.concatenate([a64, far.astype(np.float64)])
    assert acc2[MEAN] == pytest.approx(both.mean(), rel=1e-12)
    for p, idx in ((2, M2), (4, M4)):
        assert acc2[idx] == pytest.approx(((both - both.mean()) ** p).sum(), rel=1e-10)
    tight = new_state()  # nearly constant data offset from zero: cancellation would show here
    merge_in(far, tight)
    f64 = far.astype(np.float64)
    assert tight[M2] == pytest.approx(((f64 - f64.mean()) ** 2).sum(), rel=1e-9)
    # Extremes over negative numbers, signed zeros, subnormals and the largest floats.
    for values in ([-5.0, -1.0, -7.5], [-0.0, 0.0], [1e-45, -1e-45], [2.0], [3e38, -3e38, 1.0]):
        acc = new_state()
        merge_in(values, acc)
        assert (acc[MIN], acc[MAX]) == (min(np.float32(values)), max(np.float32(values)))
    # A NaN or Inf makes the batch refused untouched; an empty one changes nothing.
    before, hist0 = acc.copy(), hist.copy()
    for bad in ([1.0, np.inf], [np.nan], []):
        assert merge_in(bad, acc, hist) == (0 if not bad else -1)
        assert np.array_equal(acc, before) and np.array_equal(hist, hist0)


def test_reservoir_plan_is_deterministic_and_names_each_slot_once():
    from bitwidth.stats_kernels import reservoir_plan

    state = np.array([7], np.uint64)
    # w near 1 (the reservoir just filled): ~k ln(N/k) = 100 values enter, so every slot is hit.
    pos, slots, w, nxt = reservoir_plan(state, 16, 16, 10_000, 1.0 - 1e-9, -1)
    assert len(np.unique(slots)) == len(slots) == 16 and np.array_equal(np.sort(slots), np.arange(16))
    assert 0 <= pos.min() and pos.max() < 10_000 and len(np.unique(pos)) == 16
    assert nxt >= 16 + 10_000 and 0 < w < 0.05  # w fell to about k / N
    state2 = np.array([7], np.uint64)
    again = reservoir_plan(state2, 16, 16, 10_000, 1.0 - 1e-9, -1)
    assert np.array_equal(again[0], pos) and np.array_equal(again[1], slots) and state2[0] == state[0]
    # Far into a stream few values enter, and a batch the next pick lies beyond gets none.
    pos, slots, w2, nxt2 = reservoir_plan(state, 16, 10**9, 10_000, 16 / 10**9, -1)
    assert len(pos) <= 3 and w2 <= 16 / 10**9
    none = reservoir_plan(state, 16, 10**9 + 10_000, nxt2 - 10**9 - 10_000, w2, nxt2)
    assert len(none[0]) == 0 and none[3] == nxt2


def test_dense_plan_draws_uniform_distinct_subsets():
    """Floyd's algorithm: every position and every slot equally likely, never twice in a plan."""
    from bitwidth.stats_kernels import dense_plan

    state = np.array([11], np.uint64)
    pos_counts, slot_counts, draws = np.zeros(12), np.zeros(7), 20_000
    for _ in range(draws):
        pos, slots = dense_plan(state, 7, 12, 4)
        assert len(set(pos.tolist())) == 4 and len(set(slots.tolist())) == 4
        assert pos.min() >= 0 and pos.max() < 12 and slots.max() < 7
        pos_counts[pos] += 1
        slot_counts[slots] += 1
    for counts, n in ((pos_counts, 12), (slot_counts, 7)):
        expected = draws * 4 / n
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 32.9 if n == 12 else chi2 < 22.5, counts  # p = 0.0005 for 11 and 6 degrees of freedom
    huge = dense_plan(state, 8, 1 << 23, 5)[0]  # beyond a byte per candidate: the hash set
    assert len(set(huge.tolist())) == 5 and huge.max() < 1 << 23


def test_sample_size_zero_keeps_statistics_and_no_sample(batches):
    model = nn.Sequential(nn.Linear(8, 4))
    with record(model, sample_size=0) as rec:
        for x in batches:
            model(x).sum().backward()
    assert len(rec.sample("0", "activation")) == 0
    frame = rec.to_frame().set_index("kind")
    assert frame.loc["activation", "count"] == sum(x.numel() for x in batches)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "tensor-ops"])
def test_a_released_stream_keeps_its_bins_in_use_and_reopens(kernels, monkeypatch):
    from bitwidth import stats_stream

    monkeypatch.setattr(stats_stream, "_KERNELS", kernels)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10_000, generator=g), torch.randn(5000, generator=g) * 1e4
    s = stats_stream.StreamStats(64, [0])
    s.add(x, pool=False)
    hist, summary = s.histogram(), s.summary()
    s.flush(release=True)
    assert len(s.hist) < 250 and np.array_equal(s.histogram(), hist) and s.summary() == summary
    s.add(y, pool=False)  # a late batch (a gradient after its step closed) beyond the kept bins
    whole = stats_stream.StreamStats(64, [0])
    whole.add(torch.cat([x, y]), pool=False)
    assert np.array_equal(s.histogram(), whole.histogram())
    assert s.summary()["count"] == 15_000 and s.summary()["p9999"] == whole.summary()["p9999"]
    # A sample that never filled keeps only its values, and fills on after a late batch.
    small = stats_stream.StreamStats(64, [0])
    small.add(x[:40], pool=False)
    small.flush(release=True)
    assert len(small.reservoir) == 40 and torch.equal(torch.from_numpy(small.sample), x[:40])
    small.add(x[40:100], pool=False)
    small.flush()
    values = set(small.sample.tolist())
    assert len(small.sample) == 64 and len(values) == 64 and values <= set(x[:100].tolist())


def test_hypergeometric_and_beta_draws_match_their_distributions():
    """The sampler's own variates (seeded per stream, no NumPy generator) against scipy-free exact moments."""
    from bitwidth.stats_kernels import beta, hypergeometric, seed_state

    state = seed_state([11])
    draws = np.array([hypergeometric(state, 30, 70, 20) for _ in range(20_000)])
    # Exact pmf of the hypergeometric (30 good, 70 bad, 20 draws), chi-square over its bulk.
    from math import comb

    pmf = np.array([comb(30, j) * comb(70, 20 - j) / comb(100, 20) for j in range(21)])
    seen = np.bincount(draws, minlength=21)
    bulk = pmf * 20_000 >= 5
    expected = pmf[bulk] * 20_000
    chi2 = ((seen[bulk] - expected) ** 2 / expected).sum()
    assert chi2 < 2 * bulk.sum() + 20, (seen, expected)
    assert hypergeometric(state, 5, 0, 5) == 5 and hypergeometric(state, 0, 9, 4) == 0
    for a, b in ((4, 1), (4, 9), (100, 3000)):  # b == 1 by the closed form, the rest by gammas
        x = np.array([beta(state, a, b) for _ in range(20_000)])
        mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
        assert abs(x.mean() - mean) < 4 * np.sqrt(var / 20_000), (a, b)
        assert x.var() == pytest.approx(var, rel=0.06), (a, b)
        assert 0 < x.min() and x.max() < 1


@pytest.mark.parametrize("sizes", [[2500] * 400, [50_000, 300, 300, 200_000, 100, 7, 250_000, 2000, 40, 197_253]],
                         ids=["many-small", "mixed"])
def test_reservoir_stays_uniform_across_both_sampling_methods(sizes):
    """The dense (hypergeometric) and sparse (Algorithm L) methods, and switches between them."""
    from bitwidth.stats_stream import StreamStats

    total = sum(sizes)
    data = torch.arange(total, dtype=torch.float32)
    counts = np.zeros(10)
    for seed in range(20):
        s = StreamStats(1024, [seed])
        for part in data.split(sizes):
            s.add(part, pool=False)
        assert len(np.unique(s.sample)) == 1024
        counts += np.histogram(s.sample, bins=10, range=(0, total))[0]
    expected = 20 * 1024 / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9, counts  # 9 degrees of freedom, p = 0.001


def test_tensor_op_path_matches_the_compiled_kernels(monkeypatch, batches):
    """Data on an accelerator takes the tensor-op path; here it is forced on the CPU."""
    from bitwidth import stats_stream

    model = nn.Sequential(nn.Linear(8, 4))
    bad = batches[1].clone()
    bad[0, 0], bad[1, 1] = float("nan"), float("inf")

    def run() -> Recorder:
        with record(model, kinds="activation") as rec:
            for x in (*batches, bad, batches[2]):
                model(x)
        return rec

    kernels = run()
    monkeypatch.setattr(stats_stream, "_KERNELS", False)
    ops = run()  # small batches pooled, as on an accelerator
    a, b = kernels.to_frame(), ops.to_frame()
    exact = ["count", "min", "max", "absmax", "zero_frac", "nan_count", "inf_count", "p99", "p999", "p9999"]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    for col in ("mean", "std", "kurtosis"):
        assert a[col].iloc[0] == pytest.approx(b[col].iloc[0], rel=1e-6)
    pd.testing.assert_frame_equal(kernels.hist_frame(), ops.hist_frame())
    monkeypatch.setattr(stats_stream, "_DIRECT", 1)  # no pooling: the same batches, so the same sample
    ops = run()
    assert torch.equal(kernels.sample("0", "activation"), ops.sample("0", "activation"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recording_on_cuda_matches_the_cpu_kernels(batches):
    """The tensor-op path, pooling included, on a real accelerator against the CPU kernels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))

    def run(device: str) -> Recorder:
        m = copy.deepcopy(model).to(device)
        with record(m, sample_size=256) as rec:
            for x in batches:
                m(x.to(device)).sum().backward()
        return rec

    cpu, cuda = run("cpu"), run("cuda")
    a, b = cpu.to_frame(), cuda.to_frame()
    # The first layer's input is the same data on both: every figure agrees.
    first = (a["layer"] == "0") & (a["kind"] != "gradient")
    exact = ["count", "min", "max", "absmax", "zero_frac", "nan_count", "inf_count", "p99", "p999", "p9999"]
    pd.testing.assert_frame_equal(a.loc[first, exact], b.loc[first, exact])
    for col in ("mean", "std", "kurtosis"):
        assert np.allclose(a.loc[first, col], b.loc[first, col], rtol=1e-6)
    # Later tensors come from different matmul kernels: equal to float tolerance.
    for col in ("count", "absmax", "mean", "std"):
        assert np.allclose(a[col], b[col], rtol=1e-3, atol=1e-6), col
    assert all(len(cuda.sample(r.layer, r.kind)) == min(256, r.count) for r in b.itertuples())
