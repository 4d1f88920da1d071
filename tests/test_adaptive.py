"""Adaptive precision: the controller's decisions on constructed tensors, and ``mode: adaptive`` end to end."""

from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as TF
import yaml

from bitwidth import rundir as rd
from bitwidth.adaptive import KindPolicy, PrecisionController, decide, fit_format, make_policies, measure
from bitwidth.adaptive_run import AdaptiveSettings, train_adaptive
from bitwidth.cli import main
from bitwidth.config import ConfigError, load_config
from bitwidth.families import fixed_frac_for
from bitwidth.formats import FixedFormat
from bitwidth.run import run_config
from bitwidth.tasks import make_task
from bitwidth.trial import TrialOptions, train_baseline

ROOT = Path(__file__).parent.parent
POLICY = KindPolicy(min_bits=4, max_bits=16, raise_above=0.05, lower_below=0.03, patience=2)


def bulk(n=4096, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def run_decisions(tensors, policy, current=None):
    calm, out = 0, []
    for x in tensors:
        d = decide(x, float(x.abs().max()), current, policy, calm)
        current, calm = d.format, d.calm
        out.append(d)
    return out


# ----------------------------------------------------------------------------- pure decisions


def test_raises_width_when_error_exceeds_threshold_as_range_grows():
    # The bulk stays N(0, 1) while its largest value grows: the binary point must follow it,
    # the bulk loses resolution, and only more bits bring the error back down.
    tensors = []
    for scale in (4, 8, 16, 32, 64):
        x = bulk()
        x[0] = scale
        tensors.append(x)
    ds = run_decisions(tensors, POLICY)
    bits = [d.format.bits for d in ds]
    assert ds[0].reason == "init"
    assert all(b > a for a, b in zip(bits, bits[1:], strict=False))  # a bit per doubling of the range
    for x, prev, d in zip(tensors[1:], ds[:-1], ds[1:], strict=True):
        absmax = float(x.abs().max())
        # The old width no longer holds the data at its threshold, even with the binary point moved...
        assert max(d.measurement.rel_error, measure(fit_format(prev.format.bits, absmax), x).rel_error) > 0.05
        assert d.reason == "raise" and d.format.bits > prev.format.bits
        assert d.new_error <= POLICY.raise_above  # ...the new one does, with the fewest bits that do
        assert measure(fit_format(d.format.bits - 1, absmax), x).rel_error > POLICY.raise_above
    grown = tensors[-1]
    assert ds[-1].format.frac == fixed_frac_for(ds[-1].format.bits, float(grown.abs().max()))


def test_lowers_when_error_comfortably_below_with_patience_and_stops_at_the_threshold():
    x = bulk()
    start = fit_format(16, float(x.abs().max()))
    ds = run_decisions([x] * 40, POLICY, current=start)
    bits = [d.format.bits for d in ds]
    lowered = [i for i, d in enumerate(ds) if d.reason == "lower"]
    assert lowered and all(b - a == 2 for a, b in zip(lowered, lowered[1:], strict=False))  # patience 2
    assert all(bits[i] == bits[i - 1] - 1 for i in lowered[1:])  # one bit at a time
    final = bits[-1]
    assert bits[-10:] == [final] * 10  # settled: no oscillation on stationary data
    # It stopped because one bit fewer would exceed lower_below, not because of a bound.
    assert measure(fit_format(final - 1, float(x.abs().max())), x).rel_error > POLICY.lower_below
    assert measure(ds[-1].format, x).rel_error <= POLICY.raise_above


@pytest.mark.parametrize("lo,hi", [(10, 16), (4, 6), (7, 7)], ids=["floor10", "ceiling6", "pinned7"])
def test_never_leaves_its_bounds(lo, hi):
    policy = KindPolicy(min_bits=lo, max_bits=hi, raise_above=0.05, lower_below=0.03)
    tensors = [bulk(seed=i) * (1 + 1000 * (i % 3 == 2)) for i in range(12)]
    for t in tensors[2::3]:
        t[:2] = 1e5  # heavy outliers: would ask for more than 16 bits
    ds = run_decisions(tensors, policy, current=FixedFormat(hi, 4))
    assert all(lo <= d.format.bits <= hi for d in ds)
    assert any(d.measurement.rel_error > policy.raise_above for d in ds)  # the ceiling was pressed


def test_fraction_bits_track_a_shifting_range():
    x = bulk()
    ds = run_decisions([x * 2.0**k for k in range(-6, 7, 2)] + [x * 2.0**k for k in range(3, -7, -3)], POLICY)
    bits = {d.format.bits for d in ds[1:]}
    assert len(bits) == 1  # scaling keeps the shape: the word stays...
    for k, d in zip(list(range(-6, 7, 2)) + list(range(3, -7, -3)), ds, strict=True):
        absmax = float((x * 2.0**k).abs().max())
        assert d.format.frac == fixed_frac_for(d.format.bits, absmax)  # ...the binary point moves
    assert [d.reason for d in ds[1:]].count("range") == len(ds) - 1
    fracs = [d.format.frac for d in ds]
    assert fracs[0] - fracs[6] == 12  # 2**-6 .. 2**6: twelve octaves


def test_max_underflow_raises_a_width_whose_small_values_flush_to_zero():
    # Gradient-like data: a few large values set the range, most are tiny.
    x = bulk() * 1e-3
    x[:8] = 1.0
    loose = decide(x, 1.0, None, KindPolicy(min_bits=4, max_bits=24, raise_above=0.25, lower_below=0.17))
    strict = decide(x, 1.0, None, KindPolicy(min_bits=4, max_bits=24, raise_above=0.25, lower_below=0.17,
                                             max_underflow=0.1))
    assert loose.measurement.underflow > 0.5  # the relative error is fine: the large values dominate it...
    assert strict.format.bits > loose.format.bits and strict.measurement.underflow <= 0.1  # ...not the flushing
    held = decide(x, 1.0, loose.format, KindPolicy(min_bits=4, max_bits=24, raise_above=0.25, lower_below=0.17,
                                                    max_underflow=0.1))
    assert held.reason == "raise" and held.format.bits == strict.format.bits


def test_measure_reports_overflow_and_underflow():
    fmt = FixedFormat(6, 3)  # step 1/8, max 3.875
    m = measure(fmt, torch.tensor([0.01, 0.02, 1.0, 10.0]))
    assert m.overflow == 0.25 and m.underflow == 0.5 and m.absmax == 10.0
    assert measure(fmt, torch.zeros(5)).rel_error == 0.0


@pytest.mark.parametrize("kwargs,message", [
    ({"min_bits": 1}, "min_bits must be an integer in 2..32"),
    ({"max_bits": 40}, "max_bits must be an integer in 2..32"),
    ({"min_bits": 9, "max_bits": 8}, "min_bits (9) must be <= max_bits (8)"),
    ({"raise_above": 1.5}, "raise_above must be a number in (0, 1)"),
    ({"raise_above": 0.1, "lower_below": 0.2}, "lower_below must be a number in (0, raise_above = 0.1)"),
    ({"patience": 0}, "patience must be an integer in 1..1000"),
    ({"max_underflow": 0.0}, "max_underflow must be a number in (0, 1]"),
], ids=["min", "max", "order", "raise", "hysteresis", "patience", "underflow"])
def test_bad_thresholds_and_bounds_name_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError, match=None) as info:
        KindPolicy(**kwargs)
    assert message in str(info.value)


def test_controller_rejects_bad_arguments_all_at_once():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError) as info:
        PrecisionController(model, every=0, kinds=["bias"], policies={"weight": {"min_bits": 1}})
    text = str(info.value)
    assert "every must be an integer >= 1" in text and "kinds must be" in text and "weight: min_bits" in text
    with pytest.raises(ValueError, match="unknown key"):
        make_policies({"gradient": {"max_bit": 8}})


# ----------------------------------------------------------------------------- training runs

OPTS = TrialOptions(mode="train", epochs=2, lr=0.05, seed=3)
SETTINGS = AdaptiveSettings(every=5, checkpoint_every=20)


@pytest.fixture(scope="module")
def task():
    return make_task("digits_cnn")


@pytest.fixture(scope="module")
def baseline(task):
    return train_baseline(task, OPTS)


@pytest.fixture(scope="module")
def reference(task, baseline):
    return train_adaptive(task, OPTS, baseline, SETTINGS)


def test_schedule_is_deterministic_for_a_seed(task, baseline, reference):
    again = train_adaptive(task, OPTS, baseline, SETTINGS)
    pd.testing.assert_frame_equal(again.schedule, reference.schedule)
    pd.testing.assert_frame_equal(again.changes, reference.changes)
    assert again.outcome.metrics == reference.outcome.metrics
    sched = reference.schedule
    assert set(sched["kind"]) == {"weight", "activation", "gradient"} and set(sched["site"]) == {
        "conv1", "conv2", "fc1", "fc2"}
    assert sched.groupby(["site", "kind"])["steps"].sum().eq(reference.steps).all()  # every step covered once
    assert (sched.loc[sched["step"] == 0, "bits"] == 32).all()  # the measured first step is fp32
    assert len(reference.changes) and set(reference.changes["reason"]) >= {"init"}


def test_resume_after_kill_gives_the_same_schedule(task, baseline, reference, tmp_path):
    ckpt = tmp_path / "adaptive.pt"

    class Killed(Exception):
        pass

    def kill_at(step):
        if step == 47:  # mid-epoch, 7 steps after the checkpoint of step 40
            raise Killed

    with pytest.raises(Killed):
        train_adaptive(task, OPTS, baseline, SETTINGS, checkpoint=ckpt, on_step=kill_at)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["finished"] is None and saved["snapshot"]["controller"]["step"] == 40
    resumed = train_adaptive(task, OPTS, baseline, SETTINGS, checkpoint=ckpt)
    pd.testing.assert_frame_equal(resumed.schedule, reference.schedule)
    pd.testing.assert_frame_equal(resumed.changes, reference.changes)
    assert resumed.outcome.metrics == reference.outcome.metrics
    assert resumed.outcome.loss_curve == pytest.approx(reference.outcome.loss_curve, rel=1e-6)
    # A finished run is reused from its checkpoint, not trained again.
    assert train_adaptive(task, OPTS, baseline, SETTINGS, checkpoint=ckpt,
                          on_step=lambda s: pytest.fail("retrained")).outcome.metrics == reference.outcome.metrics


def test_hand_written_loop_equals_mode_adaptive(task, baseline, reference):
    with torch.random.fork_rng():
        torch.manual_seed(OPTS.seed)
        model = task.build_model(OPTS.seed)
        model.load_state_dict(baseline.init_state_dict)
        ctl = PrecisionController(model, every=5, seed=OPTS.seed)
        opt = torch.optim.SGD(model.parameters(), lr=OPTS.lr, momentum=OPTS.momentum)
        for epoch in range(OPTS.epochs):
            model.train()
            for x, y in task.train_batches(OPTS.seed, epoch, batch_size=OPTS.batch_size):
                loss = TF.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                ctl.step()
        ctl.close()
    pd.testing.assert_frame_equal(ctl.schedule(), reference.schedule)
    pd.testing.assert_frame_equal(ctl.changes_frame(), reference.changes)


def test_diverging_run_backs_off_then_is_reported_not_raised(task, baseline):
    opts = TrialOptions(mode="train", epochs=1, lr=2.0, seed=3, diverge_factor=3.0)
    settings = AdaptiveSettings(every=5, checkpoint_every=10, backoff_bits=3, max_backoffs=1)
    run = train_adaptive(task, opts, baseline, settings)
    assert run.outcome.diverged and run.backoffs == 1
    assert "back to the checkpoint" in run.events[0] and "training stopped" in run.events[-1]
    backoff = run.changes[run.changes["reason"] == "backoff"]
    assert len(backoff) and (backoff["new_bits"] > backoff["old_bits"]).all()
    assert run.steps_trained > run.steps  # the steps replayed after the back-off were counted


# ----------------------------------------------------------------------------- config and CLI


def test_config_errors_all_at_once_and_exit_2(tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["mode=adaptive", "adaptive.every=0", "adaptive.gradient.raise_above=1.5",
                           "adaptive.weight={min_bits: 12, max_bits: 8}",
                           "adaptive.activation.lower_below=0.5", "adaptive.uniform=[1]"])
    errors = info.value.errors
    assert len(errors) == 5
    assert any("adaptive.weight: min_bits (12) must be <= max_bits (8)" in e for e in errors)
    assert any(e.startswith("adaptive.activation: lower_below must be a number in (0, raise_above") for e in errors)
    assert any(e.startswith("adaptive.gradient.raise_above: must be a number in (0, 1)") for e in errors)
    with pytest.raises(ConfigError, match="variants: not supported with mode 'adaptive'"):
        load_config(None, ["mode=adaptive", "variants={a: {train.lr: 0.1}}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"mode": "adaptive", "adaptive": {"gradient": {"min_bits": 30, "max_bits": 8}}}))
    assert main(["validate", str(bad)]) == 2
    assert "adaptive.gradient: min_bits (30) must be <= max_bits (8)" in capsys.readouterr().err


def test_mode_adaptive_end_to_end_writes_only_its_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs/adaptive_digits.yaml",
                      ["train.epochs=1", "adaptive.uniform=[8]", f"out={out}", "adaptive.static_plan=null"])
    outcome = run_config(cfg)
    result, paths = outcome.results[""]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing outside the run directory
    for name in (rd.SCHEDULE, rd.CHANGES, rd.ADAPTIVE, rd.REPORT_HTML, rd.CONFIG):
        assert (out / name).exists(), name
    summary = yaml.safe_load((out / rd.ADAPTIVE).read_text())
    plans = [row["plan"] for row in summary["comparison"]]
    assert plans == ["fp32", "adaptive", "uniform8"]
    assert 0 < summary["costs"]["train_bops_vs_fp32"] < 1 and summary["steps"] == summary["steps_per_run"]
    html = paths["html"].read_text()
    assert "The schedule: bits per site over training" in html and "No static joint plan" in html
    schedule = pd.read_csv(out / rd.SCHEDULE)
    assert list(schedule.columns) == ["step", "steps", "site", "kind", "format", "bits", "frac"]
    # Rerun: every run is reused from its checkpoint, the same schedule comes out.
    before = (out / rd.SCHEDULE).read_text()
    run_config(cfg)
    assert (out / rd.SCHEDULE).read_text() == before
