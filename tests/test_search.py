"""Strategies against deterministic fake evaluators: no tensors, no training."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bitwidth.formats import IntFormat
from bitwidth.search import SearchResult, SearchSpace, Verdict, bisect, grid, joint, plan_label, uniform
from bitwidth.wrap import QuantSpec, plan_from_dict


def _space(pairs, candidates):
    return SearchSpace(pairs, candidates, lambda layer, kind, n: IntFormat(n))


def _bits(plan):
    return {(layer, kind): getattr(spec, kind).bits for layer, spec in plan.items()
            for kind in ("weight", "activation", "gradient") if getattr(spec, kind) is not None}


class Fake:
    """Each pair drops the metric by ``drop(pair, bits)``; drops add up; passes within ``tol``.

    Counts plans it really evaluated (a repeated plan is answered from its memo and
    marked reused, like the trial store) and the size of every round.
    """

    def __init__(self, drop, tol=0.01, base=0.95):
        self.drop, self.tol, self.base = drop, tol, base
        self.memo: dict[str, Verdict] = {}
        self.runs = 0
        self.rounds: list[int] = []
        self.busy_rounds = 0  # rounds that ran at least one new plan (the ones that cost time)

    def __call__(self, plans):
        self.rounds.append(len(plans))
        self.busy_rounds += any(plan_label(p) not in self.memo for p in plans)
        out = []
        for plan in plans:
            key = plan_label(plan)
            if key in self.memo:
                out.append(Verdict(**{**self.memo[key].__dict__, "reused": True}))
                continue
            self.runs += 1
            total = sum(self.drop(pair, n) for pair, n in _bits(plan).items())
            self.memo[key] = Verdict(total <= self.tol, self.base - total, {"diverged": False})
            out.append(self.memo[key])
        return out


def _threshold_drop(thresholds):
    return lambda pair, n: 0.0 if n >= thresholds[pair] else 0.5


PAIRS = [("conv1", "weight"), ("conv1", "activation"), ("fc1", "weight"), ("fc1", "activation")]


CANDIDATE_SETS = [(2, 3, 4, 5, 6, 7, 8), (2, 3, 4, 5, 6, 8), (2, 3, 4, 6, 8, 12, 16), (4,), (2, 8)]


@pytest.mark.parametrize("candidates", CANDIDATE_SETS, ids=lambda c: "c" + "-".join(map(str, c)))
@pytest.mark.parametrize("thresholds", [(2, 5, 8, 3), (9, 4, 6, 1), (17, 1, 12, 7)],
                         ids=lambda t: "t" + "-".join(map(str, t)))
def test_bisect_finds_grid_minima_with_fewer_evaluations(candidates, thresholds):
    space = _space(PAIRS, candidates)
    drop = _threshold_drop(dict(zip(PAIRS, thresholds, strict=False)))
    g, b = Fake(drop), Fake(drop)
    by_grid, by_bisect = grid(g, space), bisect(b, space)
    cols = ["layer", "kind", "min_bits", "metric_at_min"]
    pd.testing.assert_frame_equal(by_grid.min_bits[cols], by_bisect.min_bits[cols])
    bound = math.ceil(math.log2(len(candidates))) + 1
    assert (by_bisect.min_bits["evaluations"] <= bound).all()
    assert (by_grid.min_bits["evaluations"] == len(candidates)).all()
    if len(candidates) > 2:
        assert b.runs < g.runs
    assert by_grid.min_bits["monotone"].all()
    assert len(by_bisect.trials) == b.runs == by_bisect.min_bits["evaluations"].sum()


@pytest.mark.parametrize("n", range(1, 17))
def test_bisect_evaluation_bound_and_rounds(n):
    candidates = tuple(range(2, 2 + n))
    space = _space(PAIRS, candidates)
    fake = Fake(_threshold_drop(dict(zip(PAIRS, (2, 2 + n // 2, 2 + n - 1, 99), strict=False))))
    res = bisect(fake, space)
    assert res.min_bits["evaluations"].max() <= math.ceil(math.log2(n)) + 1
    # Every round carries one plan per pair still searching: rounds never exceed the per-pair bound.
    assert fake.rounds[0] == len(PAIRS)
    assert len(fake.rounds) <= math.ceil(math.log2(n + 1))
    assert res.min_bits["min_bits"].tolist()[-1] is pd.NA


def test_grid_runs_one_round():
    fake = Fake(_threshold_drop(dict(zip(PAIRS, (2, 3, 4, 5), strict=False))))
    grid(fake, _space(PAIRS, (2, 4, 8)))
    assert fake.rounds == [len(PAIRS) * 3]


def test_non_monotone_layer_is_flagged():
    pair = ("fc1", "weight")
    # 3 bits passes, 4 fails, 5+ passes: the kind of layer grid shows and bisect cannot see.
    drop = lambda p, n: 0.5 if n in (2, 4) else 0.0  # noqa: E731
    space = _space([pair, ("fc2", "weight")], (2, 3, 4, 5, 6))
    by_grid = grid(Fake(drop), space)
    assert by_grid.min_bits["monotone"].tolist() == [False, False]
    assert by_grid.min_bits["min_bits"].tolist() == [5, 5]  # the smallest width from which all larger pass
    alone = bisect(Fake(drop), space)
    assert alone.min_bits["monotone"].isna().all()  # unknown without grid data
    reference = {p: dict(zip(by_grid.trials.query("layer == @p[0]")["bits"], by_grid.trials.query(
        "layer == @p[0]")["passed"], strict=False)) for p in space.pairs}
    informed = bisect(Fake(drop), space, reference=reference)
    assert informed.min_bits["monotone"].tolist() == [False, False]
    monotone_ref = {p: {n: n >= 3 for n in space.candidates} for p in space.pairs}
    assert bisect(Fake(lambda p, n: 0.5 if n < 3 else 0.0), space, reference=monotone_ref).min_bits[
        "monotone"].tolist() == [True, True]


def _additive(thresholds):
    # At its isolated minimum each pair costs 0.008 (passes alone with tol 0.01), a width
    # more costs 0.002: four pairs at their minima fail together, and each raise recovers 0.006.
    def drop(pair, n):
        t = thresholds[pair]
        return 0.5 if n < t else 0.008 * 4.0 ** -(n - t)
    return drop


def _relative_cost(sizes):
    # A pair left at full precision costs 32 bits.
    return lambda plan: sum(size * _bits(plan).get(pair, 32) for pair, size in sizes.items())


def test_joint_repairs_errors_that_add_up():
    thresholds = dict(zip(PAIRS, (3, 4, 2, 5), strict=True))
    fake = Fake(_additive(thresholds))
    space = _space(PAIRS, (2, 3, 4, 5, 6, 8))
    minima = bisect(fake, space).as_dict()
    assert minima == thresholds
    assert not fake([space.plan(minima)])[0].passed  # each passes alone, together they fail
    res = joint(fake, space, minima, cost=_relative_cost(dict.fromkeys(PAIRS, 1.0)))
    assert res.passed and res.steps > 0
    assert all(res.bits[p] >= minima[p] for p in PAIRS)
    assert fake([res.plan])[0].passed
    # The first round tries every raise; later steps measure lazily, about one trial each.
    assert res.trials["round"].value_counts().sort_index().tolist()[:2] == [1, len(PAIRS)]
    assert len(res.trials) <= 1 + len(PAIRS) + 2 * res.steps


def _eager_greedy(fake, space, bits, cost, cheapest_passing_every_step=False):
    """The textbook greedy: measure every raise at every step, take the best recovery per
    cost until the plan passes; the cheapest passing raise at the first (or every) step."""
    levels = [*space.candidates, None]
    (v,) = fake([space.plan(bits)])
    first = True
    while not v.passed:
        raised = [{**bits, p: levels[levels.index(bits[p]) + 1]} for p in space.pairs if bits[p] is not None]
        verdicts = fake([space.plan(b) for b in raised])
        added = [cost(space.plan(b)) - cost(space.plan(bits)) for b in raised]
        look = first or cheapest_passing_every_step
        passing = [i for i, w in enumerate(verdicts) if w.passed] if look else []
        i = min(passing, key=added.__getitem__) if passing else max(
            range(len(raised)), key=lambda i: (verdicts[i].metric - v.metric) / added[i])
        bits, v, first = raised[i], verdicts[i], False
    return bits


def _joint_problem() -> tuple[dict, object, object]:
    """Per-pair thresholds, a shared candidate space and relative costs for the joint-step tests."""
    thresholds = dict(zip(PAIRS, (3, 4, 2, 5), strict=True))
    cost = _relative_cost(dict(zip(PAIRS, (1.0, 3.0, 0.5, 2.0), strict=True)))
    return thresholds, _space(PAIRS, (2, 3, 4, 5, 6, 8)), cost


@pytest.mark.parametrize("tol", [0.004, 0.008, 0.012])
def test_lazy_joint_matches_the_eager_greedy_with_fewer_trials(tol):
    thresholds, space, cost = _joint_problem()
    lazy_fake, eager_fake = Fake(_additive(thresholds), tol=tol), Fake(_additive(thresholds), tol=tol)
    res = joint(lazy_fake, space, thresholds, cost=cost)
    assert res.passed and res.bits == _eager_greedy(eager_fake, space, thresholds, cost)
    assert lazy_fake.runs <= eager_fake.runs
    eager = joint(Fake(_additive(thresholds), tol=tol), space, thresholds, cost=cost, lazy=False)
    assert eager.passed and eager.bits == _eager_greedy(Fake(_additive(thresholds), tol=tol), space, thresholds,
                                                        cost, cheapest_passing_every_step=True)
    assert cost(eager.plan) <= cost(res.plan)


def test_joint_raises_where_recovery_is_cheapest():
    pairs = [("big", "weight"), ("small", "weight")]
    thresholds = dict.fromkeys(pairs, 4)
    # Two pairs at their minima drop 0.016; one raise (to 0.010) is enough with tol 0.0105.
    fake = Fake(_additive(thresholds), tol=0.0105)
    space = _space(pairs, (2, 4, 6, 8))
    res = joint(fake, space, thresholds, cost=_relative_cost({pairs[0]: 100.0, pairs[1]: 1.0}))
    assert res.passed and res.steps == 1
    assert res.bits == {("big", "weight"): 4, ("small", "weight"): 6}


def test_joint_measures_interactions_instead_of_assuming_them():
    a, b, c = ("a", "weight"), ("b", "weight"), ("c", "weight")

    def drop(plan_bits):
        # a and b break the model only together; c costs a little on its own.
        return (0.5 if plan_bits.get(a) == 4 and plan_bits.get(b) == 4 else 0.0) + (0.004 if plan_bits.get(c) else 0)

    def evaluate(plans):
        return [Verdict(drop(_bits(p)) <= 0.01, 0.95 - drop(_bits(p))) for p in plans]

    space = _space([a, b, c], (4, 8))
    res = joint(evaluate, space, {a: 4, b: 4, c: 4}, cost=_relative_cost({a: 3.0, b: 2.0, c: 1.0}))
    assert res.passed and res.bits == {a: 4, b: 8, c: 4}  # the cheaper of the two that matter


def test_ceiling_keeps_noise_from_raising_one_pair_past_need():
    first = PAIRS[0]

    def evaluate(plans):
        out = []
        for plan in plans:
            bits = _bits(plan)
            drop = sum(0.004 for n in bits.values() if n < 6)
            # A tiny gain that has nothing to do with passing: noise the greedy would chase.
            luck = 0.0001 * (bits.get(first) or 32)
            out.append(Verdict(drop <= 0.005, 0.95 - drop + luck))
        return out

    space = _space(PAIRS, (2, 4, 6, 8, 12, 16))
    minima = dict.fromkeys(PAIRS, 2)
    sizes = _relative_cost(dict.fromkeys(PAIRS, 1.0))
    chased = joint(evaluate, space, minima, cost=sizes)
    assert chased.passed and chased.bits[first] is None  # raised to full precision for nothing
    capped = joint(evaluate, space, minima, cost=sizes, ceiling=dict.fromkeys(PAIRS, 6))
    assert capped.passed and max(capped.bits.values()) <= 6
    assert sizes(capped.plan) < sizes(chased.plan)
    with pytest.raises(ValueError, match="ceiling"):
        joint(evaluate, space, minima, cost=sizes, ceiling={PAIRS[0]: 6})


def test_joint_passing_at_minima_takes_no_step_and_unrepairable_fails():
    space = _space(PAIRS, (2, 4))
    ok = joint(Fake(_threshold_drop(dict.fromkeys(PAIRS, 2))), space, dict.fromkeys(PAIRS, 2),
               cost=_relative_cost(dict.fromkeys(PAIRS, 1.0)))
    assert ok.passed and ok.steps == 0 and len(ok.trials) == 1
    hopeless = Fake(lambda pair, n: 0.5)
    # Raises pairs up to full precision (an empty plan passes) rather than giving up.
    repaired = joint(hopeless, space, dict.fromkeys(PAIRS, 4), cost=_relative_cost(dict.fromkeys(PAIRS, 1.0)))
    assert repaired.passed and all(n is None for n in repaired.bits.values())
    never = joint(lambda plans: [Verdict(False, float("nan")) for _ in plans], space, dict.fromkeys(PAIRS, 4),
                  cost=lambda p: 0.0)
    assert not never.passed and all(n is None for n in never.bits.values())
    with pytest.raises(ValueError, match="candidate"):
        joint(hopeless, space, dict.fromkeys(PAIRS, 3), cost=lambda p: 0.0)


def test_uniform_finds_smallest_common_width():
    fake = Fake(_threshold_drop(dict(zip(PAIRS, (2, 5, 3, 4), strict=False))))
    res = uniform(fake, _space(PAIRS, (2, 3, 4, 5, 6, 8)))
    assert res.bits == 5 and res.passed
    assert set(_bits(res.plan).values()) == {5}
    assert len(res.trials) <= 3
    assert uniform(Fake(lambda pair, n: 0.5), _space(PAIRS, (2, 4))).bits is None


@pytest.mark.parametrize("bad", [dict(pairs=[("a", "bias")]), dict(candidates=()), dict(pairs=[]),
                                 dict(candidates=(2, 2.5))], ids=["kind", "no-candidates", "no-pairs", "float"])
def test_space_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="allowed|must be"):
        SearchSpace(**{"pairs": [("a", "weight")], "candidates": (2, 4), "build": None, **bad})


def test_search_result_save_load_roundtrip(tmp_path):
    space = _space(PAIRS, (2, 4, 8))
    fake = Fake(_threshold_drop(dict(zip(PAIRS, (2, 4, 8, 9), strict=False))))
    found = grid(fake, space)
    plan = space.plan({PAIRS[0]: 4, PAIRS[1]: 8})
    costs = pd.DataFrame({"memory_bits": [10.0, 5.0]}, index=pd.Index(["fp32", "joint"], name="plan"))
    res = SearchResult(found.trials, found.min_bits, plan, costs, {"joint": {"passed": True}, "uniform": {"bits": 8}})
    res.save(tmp_path)
    back = SearchResult.load(tmp_path)
    pd.testing.assert_frame_equal(back.min_bits, res.min_bits)
    assert back.joint_plan == plan
    assert back.min_bits_dict()[PAIRS[3]] is None
    assert back.joint_passed and back.uniform_bits == 8
    assert back.trials["passed"].tolist() == res.trials["passed"].tolist()
    import yaml

    assert plan_from_dict(yaml.safe_load((tmp_path / "joint_plan.yaml").read_text())) == plan
    assert back.joint_plan["conv1"] == QuantSpec(weight="int4", activation="int8")


@pytest.mark.parametrize("tol", [0.003, 0.0])
def test_prefetch_gives_the_same_joint_plan_in_fewer_rounds(tol):
    thresholds, space, cost = _joint_problem()
    plain, ahead = Fake(_additive(thresholds), tol=tol), Fake(_additive(thresholds), tol=tol)
    base = joint(plain, space, thresholds, cost=cost)
    fast = joint(ahead, space, thresholds, cost=cost, prefetch=1)
    assert fast.bits == base.bits and fast.passed == base.passed and fast.steps == base.steps
    assert base.steps >= 3
    assert ahead.busy_rounds < 0.7 * plain.busy_rounds  # guesses that came true saved rounds
    assert ahead.runs <= plain.runs + 3  # and cost few trials that were not needed
