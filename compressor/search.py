"""Budgeted choice: the multiple-choice knapsack (MCKP) that every plan search reduces to.

Each *item* (a head, a KV group, a linear layer) takes exactly one *choice* (a window rule, a precision); a choice
costs an estimated loss increase and weighs something against each of a few budgets (density at each length,
average bits). :func:`solve_mckp` picks one choice per item minimising the summed cost with every budget held,
optionally with at most ``max_distinct`` different choices inside each group of items (e.g. rules per layer).

It is solved exactly (up to ``gap``) as a 0/1 program by HiGHS through :func:`scipy.optimize.milp`: no commercial
solver. With few budgets the LP relaxation is almost integral (at most one fractional item per budget), so
Llama-3-8B-sized problems (1024 heads x ~48 rules x 4 lengths) solve in seconds.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from compressor.errors import CompressorError


class InfeasibleBudget(CompressorError):
    """No choice per item meets the budgets (the message gives the smallest reachable weights)."""


@dataclass
class MCKPSolution:
    """What :func:`solve_mckp_detailed` found. ``choice: [items]``; ``load: [constraints]`` = summed weights."""

    choice: np.ndarray
    cost: float
    load: np.ndarray
    status: str
    seconds: float
    bound: float | None = None  # the solver's lower bound on the cost (None: not reported)
    stats: dict[str, float] = field(default_factory=dict)


def _check_inputs(
    cost: np.ndarray, weight: np.ndarray, budget: np.ndarray, allowed: np.ndarray | None, groups: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    cost = np.asarray(cost, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    budget = np.atleast_1d(np.asarray(budget, dtype=np.float64))
    if cost.ndim != 2:
        raise ValueError(f"cost must be [items, choices], got shape {cost.shape}")
    items, choices = cost.shape
    if weight.ndim == 2:
        weight = weight[:, :, None]
    if weight.shape != (items, choices, budget.shape[0]):
        raise ValueError(
            f"weight must be [items, choices, constraints] = {(items, choices, budget.shape[0])}, got {weight.shape}"
        )
    allowed = np.ones(cost.shape, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if allowed.shape != cost.shape:
        raise ValueError(f"allowed must have the shape of cost {cost.shape}, got {allowed.shape}")
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        raise ValueError(f"items {empty[:10].tolist()} have no allowed choice")
    if not (np.isfinite(cost[allowed]).all() and np.isfinite(weight[allowed]).all() and np.isfinite(budget).all()):
        raise ValueError("cost, weight and budget must be finite where choices are allowed")
    if groups is not None:
        groups = np.asarray(groups, dtype=np.int64)
        if groups.shape != (items,):
            raise ValueError(f"groups must be [items] = ({items},), got {groups.shape}")
    return cost, weight, budget, allowed, groups


def _check_reachable(weight: np.ndarray, budget: np.ndarray, allowed: np.ndarray) -> None:
    """Raise InfeasibleBudget when even the lightest choice per item (constraint by constraint) is over budget."""
    lightest = np.where(allowed[:, :, None], weight, np.inf).min(axis=1).sum(axis=0)  # [constraints]
    over = np.flatnonzero(lightest > budget + 1e-12 * np.maximum(1.0, np.abs(budget)))
    if over.size:
        k = int(over[0])
        raise InfeasibleBudget(
            f"budget {k} is {budget[k]:.6g} but the lightest choices already weigh {lightest[k]:.6g}; "
            f"raise the budget or add lighter choices"
        )


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 for the solver call: scipy's HiGHS build prints debug lines from C++ there."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real descriptor (e.g. some notebooks): leave it be
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve_mckp_detailed(
    cost: np.ndarray,
    weight: np.ndarray,
    budget: np.ndarray,
    allowed: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    max_distinct: int | None = None,
    *,
    time_limit: float = 60.0,
    gap: float = 1e-3,
) -> MCKPSolution:
    """Like :func:`solve_mckp`, returning the choice with its cost, loads, solver status and time."""
    start = time.perf_counter()
    cost, weight, budget, allowed, groups = _check_inputs(cost, weight, budget, allowed, groups)
    items, choices = cost.shape
    _check_reachable(weight, budget, allowed)
    if max_distinct is not None and max_distinct < 1:
        raise ValueError(f"max_distinct must be >= 1, got {max_distinct}")
    use_groups = groups is not None and max_distinct is not None
    if use_groups and max_distinct >= choices:
        use_groups = False  # the cap cannot bind

    # Variables x[i, c] for allowed pairs only, then (with a cap) y[g, c] = "group g uses choice c".
    item_of, choice_of = np.nonzero(allowed)
    nx = item_of.size
    scale = float(np.abs(cost[allowed]).max()) or 1.0  # HiGHS tolerances are absolute: keep costs O(1)
    c_vec = cost[item_of, choice_of] / scale
    rows: list[sp.spmatrix] = []
    lower: list[np.ndarray] = []
    upper: list[np.ndarray] = []

    one = sp.csr_matrix((np.ones(nx), (item_of, np.arange(nx))), shape=(items, nx))
    w = weight[item_of, choice_of, :]  # [nx, constraints]
    # Tighten the budget a hair so solver tolerance never leaves the emitted plan over it.
    slack = 1e-9 * np.maximum(1.0, np.abs(budget))
    knap = sp.csr_matrix(w.T)
    ny = 0
    if use_groups:
        labels, group_idx = np.unique(groups, return_inverse=True)
        ny = labels.size * choices
        y_of = group_idx[item_of] * choices + choice_of  # the y each x links to
        # x[i, c] <= y[g(i), c]: one row per x (strong; the LP relaxation stays tight).
        link = sp.hstack([sp.identity(nx, format="csr"), sp.csr_matrix((-np.ones(nx), (np.arange(nx), y_of)), shape=(nx, ny))])
        cap = sp.csr_matrix(
            (np.ones(ny), (np.repeat(np.arange(labels.size), choices), np.arange(ny))), shape=(labels.size, ny)
        )
        pad = lambda m: sp.hstack([m, sp.csr_matrix((m.shape[0], ny))])  # noqa: E731
        rows += [pad(one), pad(knap), link, sp.hstack([sp.csr_matrix((labels.size, nx)), cap])]
        lower += [np.ones(items), np.full(budget.size, -np.inf), np.full(nx, -np.inf), np.zeros(labels.size)]
        upper += [np.ones(items), budget - slack, np.zeros(nx), np.full(labels.size, float(max_distinct))]
        c_vec = np.concatenate([c_vec, np.zeros(ny)])
    else:
        rows += [one, knap]
        lower += [np.ones(items), np.full(budget.size, -np.inf)]
        upper += [np.ones(items), budget - slack]

    a = sp.vstack(rows, format="csr")
    with _quiet_stdout():
        result = milp(
            c_vec,
            integrality=np.ones(nx + ny),
            bounds=Bounds(0, 1),
            constraints=LinearConstraint(a, np.concatenate(lower), np.concatenate(upper)),
            options={"time_limit": float(time_limit), "mip_rel_gap": float(gap), "disp": False},
        )
    if result.x is None:
        if result.status == 2:
            raise InfeasibleBudget(
                f"no choice per item meets the budgets {budget.tolist()}"
                + (f" with at most {max_distinct} distinct choices per group" if use_groups else "")
                + "; raise the budget or the cap"
            )
        raise CompressorError(
            f"the MCKP solver stopped without a solution ({result.message}); raise time_limit (was {time_limit} s)"
        )
    x = result.x[:nx]
    chosen = np.full(items, -1, dtype=np.int64)
    best = np.full(items, -np.inf)
    np.maximum.at(best, item_of, x)
    pick = x >= best[item_of] - 1e-9  # the (near-)1 entry of each item
    chosen[item_of[pick]] = choice_of[pick]
    load = weight[np.arange(items), chosen].sum(axis=0)
    status = {0: "optimal", 1: "time limit (best found)"}.get(result.status, str(result.message))
    bound = getattr(result, "mip_dual_bound", None)
    return MCKPSolution(
        choice=chosen,
        cost=float(cost[np.arange(items), chosen].sum()),
        load=load,
        status=status,
        seconds=time.perf_counter() - start,
        bound=None if bound is None or not math.isfinite(bound) else float(bound) * scale,
        stats={"variables": float(nx + ny), "rows": float(a.shape[0])},
    )


def solve_mckp(
    cost: np.ndarray,
    weight: np.ndarray,
    budget: np.ndarray,
    allowed: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    max_distinct: int | None = None,
    *,
    time_limit: float = 60.0,
    gap: float = 1e-3,
) -> np.ndarray:
    """One choice per item minimising ``sum cost[i, choice[i]]`` subject to ``sum_i weight[i, choice[i], k] <=
    budget[k]`` for every constraint k, only ``allowed[i, c]`` choices, and at most ``max_distinct`` distinct choices
    among the items sharing a ``groups`` label. cost: [items, choices]; weight: [items, choices, constraints]
    (or [items, choices] for one constraint); budget: [constraints]. Returns ``choice: [items]`` int64.

    Raises InfeasibleBudget when no assignment meets the budgets. ``gap`` is the relative optimality gap at which
    HiGHS may stop (0: prove optimality); at ``time_limit`` seconds it returns the best assignment found.
    """
    return solve_mckp_detailed(
        cost, weight, budget, allowed, groups, max_distinct, time_limit=time_limit, gap=gap
    ).choice
