"""The MCKP solver: optimal on small instances (checked by enumeration), budgets held, and fast at Llama-3-8B size."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from compressor.plan import causal_window_density
from compressor.search import InfeasibleBudget, solve_mckp, solve_mckp_detailed


def brute_force(cost, weight, budget, allowed=None, groups=None, max_distinct=None):
    """The best feasible assignment by enumerating every one (tiny instances only)."""
    items, choices = cost.shape
    best, best_cost = None, np.inf
    for combo in itertools.product(range(choices), repeat=items):
        combo = np.array(combo)
        if allowed is not None and not allowed[np.arange(items), combo].all():
            continue
        if (weight[np.arange(items), combo].sum(axis=0) > budget + 1e-12).any():
            continue
        if max_distinct is not None and any(
            len(set(combo[groups == g])) > max_distinct for g in np.unique(groups)
        ):
            continue
        total = cost[np.arange(items), combo].sum()
        if total < best_cost - 1e-12:
            best, best_cost = combo, total
    return best, best_cost


def random_instance(rng, items, choices, constraints):
    cost = rng.uniform(0, 1, size=(items, choices))
    weight = rng.uniform(0, 1, size=(items, choices, constraints))
    lightest = weight.min(axis=1).sum(axis=0)
    heaviest = weight.max(axis=1).sum(axis=0)
    budget = lightest + rng.uniform(0.2, 0.6) * (heaviest - lightest)
    return cost, weight, budget


@pytest.mark.parametrize("seed", range(6))
def test_optimal_on_small_instances(seed):
    rng = np.random.default_rng(seed)
    cost, weight, budget = random_instance(rng, items=5, choices=4, constraints=2)

    choice = solve_mckp(cost, weight, budget, gap=0.0)

    _, best_cost = brute_force(cost, weight, budget)
    assert cost[np.arange(5), choice].sum() == pytest.approx(best_cost, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_optimal_with_allowed_mask_and_distinct_cap(seed):
    rng = np.random.default_rng(100 + seed)
    cost, weight, budget = random_instance(rng, items=6, choices=4, constraints=1)
    allowed = rng.uniform(size=cost.shape) > 0.2
    allowed[:, 0] = True
    groups = np.array([0, 0, 0, 1, 1, 1])

    best, best_cost = brute_force(cost, weight, budget, allowed, groups, 1)
    if best is None:  # one rule per group cannot meet this budget: the solver must say so
        with pytest.raises(InfeasibleBudget):
            solve_mckp(cost, weight, budget, allowed, groups=groups, max_distinct=1, gap=0.0)
        return

    choice = solve_mckp(cost, weight, budget, allowed, groups=groups, max_distinct=1, gap=0.0)

    assert allowed[np.arange(6), choice].all()
    assert len(set(choice[:3])) == 1 and len(set(choice[3:])) == 1
    assert cost[np.arange(6), choice].sum() == pytest.approx(best_cost, abs=1e-9)


def test_budget_held_exactly():
    rng = np.random.default_rng(7)
    cost, weight, budget = random_instance(rng, items=40, choices=6, constraints=3)

    solution = solve_mckp_detailed(cost, weight, budget)

    assert (weight[np.arange(40), solution.choice].sum(axis=0) <= budget).all()
    assert np.allclose(solution.load, weight[np.arange(40), solution.choice].sum(axis=0))


def test_unreachable_budget_is_reported_with_the_lightest_load():
    cost = np.zeros((3, 2))
    weight = np.ones((3, 2, 1))

    with pytest.raises(InfeasibleBudget, match="lightest choices already weigh 3"):
        solve_mckp(cost, weight, np.array([2.0]))


def test_shape_errors_name_the_expected_shape():
    with pytest.raises(ValueError, match=r"weight must be \[items, choices, constraints\]"):
        solve_mckp(np.zeros((3, 2)), np.zeros((3, 4, 1)), np.array([1.0]))


def synthetic_window_problem(layers=32, heads=32, lengths=(2048, 4096, 6144, 8192), seed=0):
    """A Llama-3-8B-sized window search: power-law influence per head, 48 rules + dense, 4 lengths."""
    rng = np.random.default_rng(seed)
    alphas = np.arange(-2048, 8193, 512)
    rules = [(a, b) for a in alphas for b in np.arange(9) / 8 if all(1 <= a + b * n <= n for n in lengths)]
    rules = rules[:48]
    items = layers * heads
    exponent = rng.uniform(0.3, 2.0, size=items)
    cost = np.zeros((items, len(rules) + 1))
    weight = np.zeros((items, len(rules) + 1, len(lengths)))
    for k, n in enumerate(lengths):
        for c, (a, b) in enumerate(rules):
            w = int(min(max(np.floor(a + b * n), 1), n))
            cost[:, c] += (np.power(w, 1 - exponent) - np.power(n, 1 - exponent)) / (1 - exponent + 1e-9)
            weight[:, c, k] = causal_window_density(64, w, n) / items
        weight[:, -1, k] = 1.0 / items  # dense
    cost *= rng.uniform(0.9, 1.1, size=cost.shape)
    return np.abs(cost), weight, np.full(len(lengths), 0.5), np.repeat(np.arange(layers), heads)


@pytest.mark.slow
def test_llama3_8b_sized_problem_solves_within_a_minute():
    cost, weight, budget, _ = synthetic_window_problem()

    start = time.perf_counter()
    solution = solve_mckp_detailed(cost, weight, budget, time_limit=60.0)
    seconds = time.perf_counter() - start

    assert seconds < 60.0
    assert (solution.load <= budget).all()
    if solution.bound is not None:  # within the default 0.1% gap of the best possible
        assert solution.cost <= solution.bound * (1 + 1e-3) + 1e-9


@pytest.mark.slow
def test_llama3_8b_sized_problem_with_two_rules_per_layer():
    cost, weight, budget, groups = synthetic_window_problem()

    solution = solve_mckp_detailed(cost, weight, budget, groups=groups, max_distinct=2, time_limit=60.0, gap=1e-2)

    assert solution.seconds < 65.0
    assert (solution.load <= budget).all()
    assert max(len(set(solution.choice[groups == g])) for g in range(32)) <= 2
