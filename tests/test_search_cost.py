"""A search that costs a handful of evaluations per pair: predictor-seeded search, early-stopped
evaluations, the cheaper joint step, and the per-trial cache (same outcomes, less overhead)."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import bitwidth as bw
from bitwidth.config import check_search_inputs, load_config
from bitwidth.criteria import make_criterion
from bitwidth.early_stop import EarlyStop, hoeffding_bound, looks, mean_bound, wilson_bound
from bitwidth.formats import IntFormat
from bitwidth.runner import STORE_FILE, run_search
from bitwidth.search import SearchSpace, Verdict, grid, joint, ordered_joint, predict, uniform
from bitwidth.store import TrialStore
from bitwidth.tasks import make_task
from bitwidth.tasks.text import sequence_cross_entropy
from bitwidth.trial import BASELINE_FILE, TrialCache, TrialOptions, _evaluate_early, run_trial, train_baseline

CANDS = (2, 3, 4, 5, 6, 8)


def int_space(names: str | list[str], cands: tuple[int, ...] = CANDS) -> SearchSpace:
    return SearchSpace([(n, "weight") for n in names], cands, lambda layer, kind, n: IntFormat(n))


def needs(need: dict[str, int | None]):
    """An evaluate where each layer passes alone from ``need[layer]`` bits on (None: never), counting plans."""
    calls: list[dict] = []

    def evaluate(plans):
        calls.extend(plans)
        out = []
        for p in plans:
            ok = all(need[k] is not None and s.weight.bits >= need[k] for k, s in p.items())
            out.append(Verdict(ok, 1.0 if ok else 0.0))
        return out

    return evaluate, calls


# ----------------------------------------------------------------------------- predict

@pytest.mark.parametrize("ascend", [False, True], ids=["gallop", "ascend"])
def test_predict_finds_grids_minima_whatever_the_estimates(ascend):
    rng = random.Random(0)
    names = [f"l{i}" for i in range(9)]
    space = int_space(names)
    for _ in range(40):
        need = {n: rng.choice([*CANDS, None]) for n in names}
        guess = {(n, "weight"): rng.choice([None, *range(1, 10)]) for n in names}
        by_grid = grid(needs(need)[0], space).as_dict()
        assert predict(needs(need)[0], space, guess, ascend=ascend).as_dict() == by_grid


def test_right_estimates_cost_two_evaluations_per_pair_and_one_at_the_bottom():
    need = {"a": 4, "b": 2, "c": 8, "d": 5}
    evaluate, calls = needs(need)
    res = predict(evaluate, int_space(list(need)), {(k, "weight"): n for k, n in need.items()})
    assert res.as_dict() == {(k, "weight"): n for k, n in need.items()}
    assert res.min_bits["evaluations"].tolist() == [2, 1, 2, 2]
    assert len(calls) == 7


def test_a_shared_bias_of_the_estimates_is_learned_from_a_first_wave():
    names = [f"l{i}" for i in range(9)]
    need = {n: CANDS[i % 3 + 1] for i, n in enumerate(names)}  # 3, 4, 5, ...
    too_high = {(n, "weight"): CANDS[CANDS.index(need[n]) + 2] for n in names}  # two candidates too high
    corrected = predict(needs(need)[0], int_space(names), too_high)
    plain = predict(needs(need)[0], int_space(names), too_high, correct=False)
    assert corrected.as_dict() == plain.as_dict() == {(n, "weight"): need[n] for n in names}
    first_wave = {"l0", "l3", "l6"}  # every third pair: sqrt(9)
    evals = dict(zip(corrected.min_bits["layer"], corrected.min_bits["evaluations"], strict=True))
    assert all(evals[n] == 2 for n in names if n not in first_wave)
    assert corrected.min_bits["evaluations"].sum() < plain.min_bits["evaluations"].sum()


def test_ascending_searches_pass_only_at_the_minimum_below_a_miss():
    need = {"a": 3, "b": 6}
    evaluate, calls = needs(need)
    predict(evaluate, int_space(list(need)), {("a", "weight"): 8, ("b", "weight"): 2}, ascend=True, correct=False)
    passes = [(k, s.weight.bits) for p in calls for k, s in p.items() if s.weight.bits >= need[k]]
    # a: 8 and 6 pass in the first round (the estimate and the one below), then 2 fails and 3 passes
    assert sorted(passes) == [("a", 3), ("a", 6), ("a", 8), ("b", 6)]


def test_predict_rejects_estimates_of_pairs_not_searched():
    with pytest.raises(ValueError, match="not searched"):
        predict(needs({"a": 2})[0], int_space(["a"]), {("zz", "weight"): 4})


# ----------------------------------------------------------------------------- uniform and joint

def test_uniform_skips_the_widths_the_minima_decide():
    need = {"a": 3, "b": 5}
    evaluate, calls = needs(need)
    res = uniform(evaluate, int_space(list(need)), minima={("a", "weight"): 3, ("b", "weight"): 5}, ascend=True)
    assert res.bits == 5 and len(calls) == 1
    evaluate, calls = needs({"a": 3, "b": None})
    res = uniform(evaluate, int_space(["a", "b"]), minima={("a", "weight"): 3, ("b", "weight"): None})
    assert res.bits is None and calls == []  # b passes at no width alone: no uniform width passes


def additive(drops: dict[tuple[str, int], float], limit: float):
    """Joint plans whose metric loses each pair's drop at its width; pass while the loss stays within ``limit``."""
    calls = []

    def evaluate(plans):
        calls.extend(plans)
        losses = [sum(drops.get((k, s.weight.bits), 0.0) for k, s in p.items()) for p in plans]
        return [Verdict(loss <= limit, 1.0 - loss) for loss in losses]

    return evaluate, calls


def test_ordered_joint_bisects_the_repair_path_in_log_trials():
    names = [f"l{i}" for i in range(16)]
    space = int_space(names, (2, 4, 8))
    drops = {(n, 2): 0.01 * (i + 1) for i, n in enumerate(names)}  # l15 loses the most
    evaluate, calls = additive(drops, limit=0.5)
    minima = {(n, "weight"): 2 for n in names}
    sens = {(n, "weight"): drops[(n, 2)] for n in names}
    res = ordered_joint(evaluate, space, minima, sensitivity=sens, cost=lambda p: len(p),
                        ceiling={(n, "weight"): 4 for n in names})
    # total loss 1.36 at 2 bits; raising l15, l14, ... (most sensitive first) until <= 0.5: 7 raises
    assert res.passed and {n for (n, _), b in res.bits.items() if b == 4} == set(names[-7:])
    assert len(calls) <= math.ceil(math.log2(17)) + 1
    exhaustive, ex_calls = additive(drops, limit=0.5)
    greedy = joint(exhaustive, space, minima, cost=lambda p: len(p), lazy=False)
    assert greedy.passed and len(ex_calls) > 5 * len(calls)


def early(passed: bool, metric: float) -> Verdict:
    return Verdict(passed, metric, {"early_stopped": True})


def test_final_joint_and_uniform_plans_are_confirmed_by_a_full_evaluation():
    """An early pass that a full evaluation refutes is not accepted: the searches go on above it."""
    space = int_space(["a", "b"], (2, 4, 8))
    full_calls = []

    def evaluate(plans):  # early stops say every plan with 4 bits or more everywhere passes (fp32: not in plan)
        return [early(all(s.weight.bits >= 4 for s in p.values()), 0.9) for p in plans]

    def full(plans):  # in truth only 8 bits everywhere does
        full_calls.extend(plans)
        return [Verdict(all(s.weight.bits >= 8 for s in p.values()), 0.95) for p in plans]

    same = uniform(evaluate, space, confirm=full)
    assert same.bits == 8 and [p["a"].weight.bits for p in full_calls] == [4, 8]
    minima = {("a", "weight"): 4, ("b", "weight"): 4}
    ceiling = {("a", "weight"): 8, ("b", "weight"): 8}
    res = ordered_joint(evaluate, space, minima, sensitivity={}, cost=lambda p: len(p), ceiling=ceiling, confirm=full)
    assert res.passed and res.bits == ceiling and res.outcome == {}
    greedy = joint(evaluate, space, minima, cost=lambda p: len(p), confirm=full)
    assert greedy.passed and greedy.outcome == {} and all(n in (8, None) for n in greedy.bits.values())


# ----------------------------------------------------------------------------- bounds

def test_bounds_are_exact_once_every_sample_is_in_and_shrink_with_more():
    assert wilson_bound(30, 40, 40, 0.01) == (0.75, 0.75)
    assert hoeffding_bound(0.75, 40, 40, 0.01) == (0.75, 0.75)
    assert mean_bound(2.0, 1.0, 40, 40, 0.01) == (2.0, 2.0)
    widths = [hi - lo for lo, hi in (wilson_bound(0.8 * n, n, 1000, 0.01) for n in (32, 128, 512))]
    assert widths[0] > widths[1] > widths[2] > 0
    assert looks(1000, 32) == [32, 64, 128, 256, 512, 1000]


@pytest.mark.parametrize("bad, match", [
    (dict(metric="f1", threshold=0.5), "metric must be one of"),
    (dict(metric="loss", threshold=math.nan), "threshold must be a finite number"),
    (dict(metric="loss", threshold=1.0, error_rate=0.0), r"error_rate must be in \(0, 0.5\]"),
    (dict(metric="loss", threshold=1.0, min_samples=0), "min_samples must be an integer >= 1"),
])
def test_bad_early_stop_settings_name_what_is_allowed(bad, match):
    with pytest.raises(ValueError, match=match):
        EarlyStop(**bad)


def classifier_logits(right: torch.Tensor, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and labels (N,) whose argmax is right exactly where ``right`` is True."""
    y = torch.arange(len(right)) % classes
    guess = torch.where(right, y, (y + 1) % classes)
    return TF.one_hot(guess, classes).float() * 4, y


class _Task:
    eval_batch_size = 64


def run_early(x: torch.Tensor, y: torch.Tensor, stop: EarlyStop, order: torch.Tensor,
              loss_fn=TF.cross_entropy) -> tuple[dict, dict]:
    return _evaluate_early(nn.Identity(), (x[order], y[order]), loss_fn, stop, _Task())


def full_verdict(metrics: dict, stop: EarlyStop) -> str:
    value = metrics[stop.metric]
    return "pass" if (value <= stop.threshold if stop.lower_is_better else value >= stop.threshold) else "fail"


def populations():
    """(name, inputs, targets, metric, loss): accuracy of a classifier (Wilson), of a sequence
    model (a share per sample: Hoeffding), and mean losses (normal bound; the sequence loss takes
    no ``reduction``, so each sample's loss comes from a call of its own)."""
    gen = torch.Generator().manual_seed(0)
    n = 1200
    right = torch.rand(n, generator=gen) < 0.9
    x, y = classifier_logits(right)
    yield "accuracy, one label per sample", x, y, "accuracy", TF.cross_entropy
    seq_right = torch.rand(n // 2, 8, generator=gen) < 0.9
    xs, ys = classifier_logits(seq_right.flatten())
    yield "accuracy, a label per position", xs.view(n // 2, 8, -1), ys.view(n // 2, 8), "accuracy", \
        sequence_cross_entropy
    logits = torch.randn(n, 10, generator=gen) * 2
    yield "loss", logits, torch.randint(10, (n,), generator=gen), "loss", TF.cross_entropy
    seq_logits = torch.randn(n // 8, 8, 10, generator=gen) * 2
    yield "loss, a label per position", seq_logits, torch.randint(10, (n // 8, 8), generator=gen), "loss", \
        sequence_cross_entropy


@pytest.mark.parametrize("name, x, y, metric, loss_fn", list(populations()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_the_bounds_error_rate_holds_near_the_threshold(name, x, y, metric, loss_fn):
    """Simulated: thresholds just beside the set's metric (the hardest cases) and random orders;
    early verdicts that differ from the full evaluation's stay within the stated error rate."""
    error_rate, sims = 0.1, 120
    total = run_early(x, y, EarlyStop(metric, 0.0, 0.5, len(y)), torch.arange(len(y)), loss_fn)[0][metric]
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for offset in (-0.02, -0.005, 0.005, 0.02):
        stop = EarlyStop(metric, total + offset * (5 if metric == "loss" else 1), error_rate)
        truth = full_verdict({metric: total}, stop)
        wrong = 0
        for _ in range(sims):
            _, info = run_early(x, y, stop, torch.randperm(len(y), generator=gen), loss_fn)
            wrong += info["decision"] is not None and info["decision"] != truth
        worst = max(worst, wrong / sims)
    assert worst <= error_rate + 3 * math.sqrt(error_rate * (1 - error_rate) / sims)


def test_early_stop_never_flips_a_verdict_far_from_the_threshold_and_stops_early_there():
    gen = torch.Generator().manual_seed(2)
    right = torch.rand(2000, generator=gen) < 0.8
    x, y = classifier_logits(right)
    accuracy = float(right.float().mean())
    for threshold in (accuracy - 0.1, accuracy + 0.1):
        stop = EarlyStop("accuracy", threshold)
        for _ in range(30):
            metrics, info = run_early(x, y, stop, torch.randperm(len(y), generator=gen))
            assert info["decision"] == full_verdict({"accuracy": accuracy}, stop)
            assert info["samples"] <= 512 and info["of"] == 2000
            lo, hi = info["bound"]
            assert lo <= metrics["accuracy"] <= hi


def test_an_undecided_evaluation_runs_to_the_end_with_the_exact_metric():
    right = torch.arange(500) % 10 != 0  # 0.9
    x, y = classifier_logits(right)
    metrics, info = run_early(x, y, EarlyStop("accuracy", 0.9), torch.arange(500))
    assert info["samples"] == 500 and info["decision"] is None and metrics["accuracy"] == pytest.approx(0.9)


# ----------------------------------------------------------------------------- trials and the cache

@pytest.fixture(scope="module")
def cnn():
    task = make_task("digits_cnn")
    options = TrialOptions(epochs=4)
    return task, options, train_baseline(task, options)


PLANS = [
    {"conv2": bw.QuantSpec(weight="int4", activation="int4")},
    {"conv2": bw.QuantSpec(activation=IntFormat(3, scale="percentile"))},
    {"conv1": bw.QuantSpec(activation=IntFormat(4, rounding="stochastic"))},
    {"conv1": "int3", "fc1": bw.QuantSpec(activation="int3")},
    {"*": "int4"},
]


def test_the_trial_cache_gives_the_same_outcome_bit_for_bit(cnn):
    task, options, base = cnn
    cache = TrialCache()
    for plan in PLANS + PLANS[::-1]:  # any order of trials in a worker
        assert run_trial(task, plan, options, base, cache=cache).metrics == run_trial(task, plan, options, base).metrics
    assert run_trial(task, PLANS[0], options, base, cache=cache).samples == 450


def test_early_stopped_trials_agree_with_full_ones_away_from_the_threshold(cnn):
    task, options, base = cnn
    cache = TrialCache()
    for plan, threshold in itertools.product([{"fc1": "int2"}, {"*": "int2"}, {"fc2": "int8"}], (0.5, 0.8)):
        full = run_trial(task, plan, options, base).metrics["accuracy"]
        out = run_trial(task, plan, options, base, early_stop=EarlyStop("accuracy", threshold), cache=cache)
        if abs(full - threshold) > 0.1:
            assert out.early_stop["decision"] == ("pass" if full >= threshold else "fail")
            assert out.samples < 450
    with pytest.raises(ValueError, match="post-training"):
        run_trial(task, {}, TrialOptions(mode="train", epochs=1), base, early_stop=EarlyStop("accuracy", 0.5))


# ----------------------------------------------------------------------------- the whole search

QUICKSTART = dict(mode="ptq", kinds=("weight", "activation"), candidates=CANDS,
                  criterion=make_criterion("accuracy", max_drop=0.01))


def search(task, options, base_dir, name, **kw):
    d = base_dir / name
    d.mkdir(exist_ok=True)
    shutil.copy(base_dir / BASELINE_FILE, d / BASELINE_FILE)
    return d, run_search(task, run_dir=d, trial_options=options, **QUICKSTART, **kw)


@pytest.fixture(scope="module")
def quickstart_runs(cnn, tmp_path_factory):
    """configs/quickstart.yaml, shorter baseline: grid, predict and predict with early stopping."""
    task, options, _ = cnn
    base_dir = tmp_path_factory.mktemp("qs")
    train_baseline(task, options, cache_dir=base_dir)
    return base_dir, {name: search(task, options, base_dir, name, **kw) for name, kw in {
        "grid": {"strategy": "grid"}, "predict": {"strategy": "predict"},
        "early": {"strategy": "predict", "early_stop": True}}.items()}


def test_predict_gives_grids_minima_on_the_quickstart_for_fewer_samples(quickstart_runs):
    _, runs = quickstart_runs
    cols = ["layer", "kind", "min_bits"]
    reference = runs["grid"][1]
    for name in ("predict", "early"):
        result = runs[name][1]
        assert result.min_bits[cols].equals(reference.min_bits[cols]), name
        assert result.summary["counts"]["samples_run"] < reference.summary["counts"]["samples_run"] / 2
    counts = runs["early"][1].summary["counts"]
    assert counts["samples_run"] < runs["predict"][1].summary["counts"]["samples_run"]
    assert counts["pairs"] == 8 and counts["validation_size"] == 450
    assert counts["full_evaluations_per_pair"] == pytest.approx(counts["samples_run"] / 450 / 8, abs=1e-3)
    assert counts["trials_per_pair"] == pytest.approx(len(runs["early"][1].trials) / 8, abs=1e-3)


def test_early_stopped_trials_record_samples_and_bound_and_final_plans_are_full(quickstart_runs):
    _, runs = quickstart_runs
    d, result = runs["early"]
    records = [json.loads(line)["record"]["outcome"] for line in (d / STORE_FILE).read_text().splitlines()]
    stopped = [o for o in records if o["early_stop"] and o["early_stop"]["decision"]]
    assert stopped and all(o["samples"] < 450 and len(o["early_stop"]["bound"]) == 2 for o in stopped)
    trials = result.trials
    final_joint = trials[trials["strategy"] == "joint"].iloc[-1]
    final_uniform = trials[(trials["strategy"] == "uniform") & (trials["bits"] == result.summary["uniform"]["bits"])]
    assert final_joint["samples"] == 450 and not final_joint["early_stopped"]
    assert (final_uniform["samples"] == 450).any() and result.summary["joint"]["passed"]


def test_early_and_full_trials_have_their_own_keys_and_a_killed_run_resumes(cnn, quickstart_runs):
    task, options, _ = cnn
    base_dir, runs = quickstart_runs
    d, first = runs["early"]
    again = run_search(task, run_dir=d, trial_options=options, strategy="predict", early_stop=True, **QUICKSTART)
    assert again.summary["counts"]["trials_run"] == 0 and again.min_bits.equals(first.min_bits)
    # A full search in the same directory reuses the full evaluations and reruns the early-stopped ones.
    decided_early = {row.plan for row in first.trials.itertuples() if row.early_stopped}
    full = run_search(task, run_dir=d, trial_options=options, strategy="predict", **QUICKSTART)
    records = {json.loads(line)["key"]: json.loads(line)["record"]["outcome"]
               for line in (d / STORE_FILE).read_text().splitlines()}
    reused = full.trials[full.trials["reused"]]
    assert len(reused) and not any((records[k].get("early_stop") or {}).get("decision") for k in reused["keys"])
    again_full = full.trials[full.trials["plan"].isin(decided_early)]
    assert len(again_full) and not again_full["reused"].any() and not again_full["early_stopped"].any()
    # A run killed after a few trials continues from the store.
    cut = base_dir / "cut"
    cut.mkdir()
    shutil.copy(base_dir / BASELINE_FILE, cut / BASELINE_FILE)
    lines = (d / STORE_FILE).read_text().splitlines(keepends=True)
    (cut / STORE_FILE).write_text("".join(lines[:10]) + lines[10][:25])  # the last line cut by the kill
    resumed = run_search(task, run_dir=cut, trial_options=options, strategy="predict", early_stop=True, **QUICKSTART)
    assert resumed.min_bits.equals(first.min_bits) and resumed.summary["counts"]["trials_reused"] >= 10


def test_the_store_flushes_every_trial_and_fsyncs_per_round(tmp_path):
    store = TrialStore(tmp_path / "trials.jsonl")
    store.put("k", {"outcome": {"metrics": {"accuracy": 0.5}, "samples": 32, "early_stop": {"decision": "fail"}}})
    assert TrialStore(tmp_path / "trials.jsonl", readonly=True).get("k")["outcome"]["samples"] == 32
    with pytest.raises(ValueError, match="'outcome.samples' is not an integer or null"):
        store.put("k2", {"outcome": {"metrics": {}, "samples": "many"}})
    store.close()


def test_config_switch_and_its_limits():
    cfg = load_config(None, ["search.strategy=predict", "search.early_stop=true"])
    assert cfg.search.strategy == "predict" and cfg.search.early_stop and cfg.search.early_stop_error == 0.01
    assert load_config(None, []).search.early_stop is False
    with pytest.raises(ValueError) as caught:
        check_search_inputs("train", [0, 1], early_stop=True, early_stop_error=0.7)
    message = str(caught.value)
    assert "only post-training trials (mode 'ptq') stop early" in message
    assert "needs one seed (found 2)" in message and "early_stop_error" in message


@pytest.mark.slow
def test_predict_gives_grids_minima_on_small_tiny_lm_and_digits_train(tmp_path):
    lm = make_task("tiny_lm", "pytext", train_bytes=65_536, val_bytes=8_192)
    lm_options = TrialOptions(epochs=2, lr=0.003, optimizer="adam", batch_size=32)
    lm_config = dict(mode="ptq", layers="blocks.0.*", kinds=("weight", "activation"), candidates=CANDS,
                     criterion=make_criterion("loss", max_rise=0.05), trial_options=lm_options)
    train_options = TrialOptions(mode="train", epochs=2, lr=0.05)
    train_config = dict(mode="train", layers=["conv2", "fc1"], kinds=("weight", "activation", "gradient"),
                        family="fixed", family_options={"rounding": "nearest"}, candidates=(2, 4, 8, 16),
                        criterion=make_criterion("converge", max_drop=0.02, loss_tol=0.5),
                        trial_options=train_options)
    for task, config in ((lm, lm_config), (make_task("digits_cnn"), train_config)):
        results = {}
        for strategy in ("grid", "predict"):
            d = tmp_path / f"{task.name}_{strategy}"
            results[strategy] = run_search(task, run_dir=d, strategy=strategy, **config)
        cols = ["layer", "kind", "min_bits"]
        assert results["predict"].min_bits[cols].equals(results["grid"].min_bits[cols]), task.name
