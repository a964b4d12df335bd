"""Mixed precision by sensitivity: per-linear bit widths under an average bits-per-weight budget.

Sensitivity of linear i at bit width b is the Hessian-weighted output error of its quantized
weight, e_i(b) = tr((W − Ŵ_b) H (W − Ŵ_b)ᵀ) (H = 2·XᵀX/n, so e = 2·mean ‖(W − Ŵ_b) x‖²).
With p_i parameters and c(b) stored bits per weight at width b (codes plus scale overhead,
e.g. 4.25 for 4-bit with fp16 scales per 64), choose b_i to

    minimise Σ_i e_i(b_i)   subject to   Σ_i p_i · c(b_i) ≤ target · Σ_i p_i,

a multiple-choice knapsack. :func:`choose_bits_dp` solves it exactly by dynamic programming
over integer costs (costs made integer with exact fractions, divided by their gcd);
:func:`choose_bits_greedy` starts every linear at its cheapest width and repeatedly takes the
upgrade with the largest error reduction per extra bit (on each linear's lower convex hull),
which is optimal for the Lagrangian relaxation but may leave budget unused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from fractions import Fraction

import numpy as np
import torch


def hessian_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ), in float64."""
    err = weight.double() - approx.double()
    return float(((err @ hessian.double()) * err).sum())


def sensitivity(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    bits: tuple[int, ...] = (2, 3, 4, 8),
) -> dict[int, float]:
    """e(b) for each b, with ``quantizer(W, H, b)`` returning the dequantized Ŵ_b (RTN or GPTQ)."""
    return {b: hessian_error(weight, quantizer(weight, hessian, b), hessian) for b in bits}


def _total(choice: Mapping[str, int], errors: Mapping[str, Mapping[int, float]]) -> float:
    return sum(errors[n][b] for n, b in choice.items())


def average_bits(choice: Mapping[str, int], params: Mapping[str, int], cost: Mapping[int, float]) -> float:
    """Σ p_i c(b_i) / Σ p_i."""
    return sum(params[n] * cost[b] for n, b in choice.items()) / sum(params[n] for n in choice)


def choose_bits_dp(
    errors: Mapping[str, Mapping[int, float]],
    params: Mapping[str, int],
    target_bpw: float,
    cost: Mapping[int, float],
    max_states: int = 4_000_000,
) -> dict[str, int]:
    """Exact minimum of Σ e_i(b_i) with Σ p_i c(b_i) ≤ target · Σ p_i (see the module docstring).

    Costs p_i · c(b) are made integers exactly (``Fraction`` of c, limited to denominator 1024)
    and divided by their gcd. If the budget still has more than ``max_states`` units, costs are
    rounded *up* to a coarser unit, so the result stays feasible (possibly not optimal).
    Raises ValueError when even the cheapest choice exceeds the budget.
    """
    names = list(errors)
    fr = {b: Fraction(c).limit_denominator(1024) for b, c in cost.items()}
    denom = math.lcm(*(f.denominator for f in fr.values()))
    item_costs = {n: {b: int(params[n] * fr[b] * denom) for b in errors[n]} for n in names}
    budget_exact = Fraction(target_bpw).limit_denominator(1 << 20) * sum(params[n] for n in names) * denom
    g = 0
    for c in itertools.chain.from_iterable(d.values() for d in item_costs.values()):
        g = math.gcd(g, c)
    unit = max(g, 1)
    budget = int(budget_exact // unit)
    if budget > max_states:
        unit = math.ceil(budget_exact / max_states)
        budget = int(budget_exact // unit)
    units = {n: {b: -(-c // unit) for b, c in item_costs[n].items()} for n in names}
    inf = float("inf")
    best = np.full(budget + 1, inf)
    best[0] = 0.0
    picks = np.zeros((len(names), budget + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(budget + 1, inf)
        for b, c in units[n].items():
            if c > budget:
                continue
            cand = np.full(budget + 1, inf)
            cand[c:] = best[: budget + 1 - c] + errors[n][b]
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = b
        best = new
    end = int(np.argmin(best))
    if not math.isfinite(best[end]):
        raise ValueError(f"no assignment fits {target_bpw} bits per weight")
    choice: dict[str, int] = {}
    for i in range(len(names) - 1, -1, -1):
        b = int(picks[i, end])
        choice[names[i]] = b
        end -= units[names[i]][b]
    return {n: choice[n] for n in names}


def choose_bits_greedy(
    errors: Mapping[str, Mapping[int, float]],
    params: Mapping[str, int],
    target_bpw: float,
    cost: Mapping[int, float],
) -> dict[str, int]:
    """Greedy by marginal error reduction per extra stored bit (see the module docstring)."""
    budget = target_bpw * sum(params.values())
    hulls: dict[str, list[int]] = {}
    for n in errors:
        pts = sorted(errors[n], key=lambda b: (cost[b], errors[n][b]))
        hull: list[int] = []
        for b in pts:
            if hull and errors[n][b] >= errors[n][hull[-1]]:
                continue  # dominated: costs more, errs no less
            while len(hull) >= 2:
                a, m = hull[-2], hull[-1]
                s1 = (errors[n][a] - errors[n][m]) / (cost[m] - cost[a])
                s2 = (errors[n][m] - errors[n][b]) / (cost[b] - cost[m])
                if s2 >= s1:
                    hull.pop()  # m is not on the lower convex hull
                else:
                    break
            hull.append(b)
        hulls[n] = hull
    level = dict.fromkeys(errors, 0)
    spent = sum(params[n] * cost[hulls[n][0]] for n in errors)
    if spent > budget + 1e-9:
        raise ValueError(f"no assignment fits {target_bpw} bits per weight")
    while True:
        best, best_gain = None, 0.0
        for n, hull in hulls.items():
            if level[n] + 1 >= len(hull):
                continue
            a, b = hull[level[n]], hull[level[n] + 1]
            extra = params[n] * (cost[b] - cost[a])
            if spent + extra > budget + 1e-9:
                continue
            gain = (errors[n][a] - errors[n][b]) / extra
            if best is None or gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            break
        a, b = hulls[best][level[best]], hulls[best][level[best] + 1]
        spent += params[best] * (cost[b] - cost[a])
        level[best] += 1
    return {n: hulls[n][level[n]] for n in errors}


def choose_bits_brute_force(
    errors: Mapping[str, Mapping[int, float]],
    params: Mapping[str, int],
    target_bpw: float,
    cost: Mapping[int, float],
) -> dict[str, int]:
    """Exhaustive search (tests only: |bits|^|linears| assignments)."""
    names = list(errors)
    budget = target_bpw * sum(params.values())
    best, best_err = None, float("inf")
    for combo in itertools.product(*(sorted(errors[n]) for n in names)):
        if sum(params[n] * cost[b] for n, b in zip(names, combo)) > budget + 1e-9:
            continue
        err = sum(errors[n][b] for n, b in zip(names, combo))
        if err < best_err:
            best, best_err = dict(zip(names, combo)), err
    if best is None:
        raise ValueError(f"no assignment fits {target_bpw} bits per weight")
    return best
