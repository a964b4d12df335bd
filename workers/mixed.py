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

In a run the sizes are exact stored bits (:func:`gptq_stored_bits`, solved by
:func:`choose_bits_by_cost`) and e_i is not the bare output error — that one ranks linears of
different depths and roles on incomparable scales (on SmolLM2 it chooses *worse* than uniform
4-bit) — but :func:`linear_sensitivity`: the output error weighted per output channel by its
block-local Fisher (:func:`output_fisher`) and divided by the scale of the residual stream the block writes
(:func:`residual_scale`), all computable by the worker that owns the block.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
    and solved by :func:`choose_bits_by_cost`. Raises ValueError when even the cheapest choice
    exceeds the budget.
    """
    names = list(errors)
    fr = {b: Fraction(c).limit_denominator(1024) for b, c in cost.items()}
    denom = math.lcm(*(f.denominator for f in fr.values()))
    item_costs = {n: {b: int(params[n] * fr[b] * denom) for b in errors[n]} for n in names}
    budget = Fraction(target_bpw).limit_denominator(1 << 20) * sum(params[n] for n in names) * denom
    try:
        return choose_bits_by_cost(errors, item_costs, math.floor(budget), max_states=max_states)
    except ValueError:
        raise ValueError(f"no assignment fits {target_bpw} bits per weight") from None


def choose_bits_by_cost(
    errors: Mapping[str, Mapping[int, float]],
    costs: Mapping[str, Mapping[int, int]],
    budget: int,
    max_states: int = 4_000_000,
) -> dict[str, int]:
    """Minimum of Σ e_i(b_i) subject to Σ c_i(b_i) ≤ budget, with integer costs c_i(b) (e.g. the exact
    stored bits of linear i at width b: :func:`gptq_stored_bits`): a multiple-choice knapsack,
    solved by dynamic programming over the budget.

    Costs and budget are divided by the gcd of all costs (exact). If the budget still has more than
    ``max_states`` units, every cost is rounded *up* to a coarser unit, so the result always fits
    the budget (it may then miss the optimum by at most one unit per linear). Raises ValueError
    when even the cheapest choice exceeds the budget.
    """
    names = list(errors)
    g = 0
    for c in itertools.chain.from_iterable((costs[n][b] for b in errors[n]) for n in names):
        g = math.gcd(g, int(c))
    unit = max(g, 1)
    states = budget // unit
    if states > max_states:
        unit = -(-budget // max_states)
        states = budget // unit
    units = {n: {b: -(-int(costs[n][b]) // unit) for b in errors[n]} for n in names}
    inf = float("inf")
    best = np.full(states + 1, inf)
    best[0] = 0.0
    picks = np.zeros((len(names), states + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(states + 1, inf)
        for b, c in units[n].items():
            if c > states:
                continue
            cand = np.full(states + 1, inf)
            cand[c:] = best[: states + 1 - c] + errors[n][b]
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = b
        best = new
    end = int(np.argmin(best))
    if not math.isfinite(best[end]):
        raise ValueError(f"no assignment fits a budget of {budget}")
    choice: dict[str, int] = {}
    for i in range(len(names) - 1, -1, -1):
        b = int(picks[i, end])
        choice[names[i]] = b
        end -= units[names[i]][b]
    return {n: choice[n] for n in names}


def gptq_stored_bits(bits: int, rows: int, cols: int, group_size: int) -> int:
    """Bits one linear W [N = rows, K = cols] takes in a GPTQ checkpoint (pipeline/formats/gptq.py):
    qweight K·N·b, qzeros n_G·N·b, scales n_G·N·16 (fp16), g_idx 32·K (int32), n_G = ⌈K / g⌉
    (1 for g = -1). Biases are not counted (they do not depend on b)."""
    n_groups = 1 if group_size == -1 else -(-cols // group_size)
    return cols * rows * bits + n_groups * rows * (bits + 16) + 32 * cols


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


# ------------------------------------------------------------------------- the sensitivity recorded in a run


def channel_energy(hiddens: list[torch.Tensor]) -> torch.Tensor:
    """Σ_t h_{t,c}² per channel c of the residual stream over all tokens of ``hiddens`` (each [..., d]),
    float64, with the token count appended (shape [d + 1]): summable across workers (all-reduce)."""
    d = hiddens[0].shape[-1]
    out = torch.zeros(d + 1, dtype=torch.float64, device=hiddens[0].device)
    for h in hiddens:
        flat = h.reshape(-1, d).double()
        out[:d] += (flat * flat).sum(0)
        out[d] += flat.shape[0]
    return out


def residual_scale(energy: torch.Tensor) -> float:
    """ē = median_c E[h_c²] of the residual stream (from :func:`channel_energy`): its typical channel's
    mean square. The median ignores the few "massive activation" channels that carry most of ‖h‖²
    in deep layers but which the blocks' RMSNorm weights largely mute."""
    count = float(energy[-1])
    if count <= 0:
        raise ValueError("no tokens in the residual-stream energy")
    return float(torch.median(energy[:-1] / count))


@dataclass
class BlockProbe:
    """What the probe measures of one float block, every tensor a sum over tokens (all-reduced across workers).

    ``fisher``: {linear: float64 [out + 1]}, Σ_t (J_tᵀ u_t)_r² then the token count (:func:`output_fisher`);
    ``energy``: :func:`channel_energy` of the block's outputs; ``rest``: {linear: float64 [K, K]} Σ x xᵀ of the
    linear's inputs over every position but each sequence's first, and ``rest_rows`` {linear: float64 [1]} their
    count (linears that read one input share both tensors; a linear fed flattened tokens [rows, K], as a
    shared expert behind a router, has no positions to tell apart: all its rows). The Grams are as large as
    the block's H (one K×K per distinct input: 8 GB at Llama-70B's widths), held by a probe run only."""

    fisher: dict[str, torch.Tensor]
    energy: torch.Tensor
    rest: dict[str, torch.Tensor]
    rest_rows: dict[str, torch.Tensor]

    def tensors(self) -> list[torch.Tensor]:
        """Every sum once (a shared input's Gram once), for an all-reduce in place."""
        every = [*self.fisher.values(), self.energy, *self.rest.values(), *self.rest_rows.values()]
        return list({id(t): t for t in every}.values())

    def rest_hessian(self, name: str) -> torch.Tensor:
        """H' = 2·Σ x xᵀ / n' of ``name``'s inputs past each sequence's first position."""
        return self.rest[name] * (2.0 / float(self.rest_rows[name]))


def output_fisher(
    layer: torch.nn.Module, batches: list[tuple[torch.Tensor, dict]], names: list[str], seed: int = 0
) -> BlockProbe:
    """How much each output channel of each linear moves the block's output: for linear i with output
    z_i and the block output y, F̂_i[r] = Σ_t (J_tᵀ u_t)_r² with J_t = ∂y_t/∂z_{i,t} and u_t ~ N(0, I) —
    an unbiased estimate of Σ_t (J_tᵀ J_t)_rr, i.e. the row Fisher of the linear under a loss whose
    gradient at the block output is isotropic. One forward and one backward of the float block per
    batch (``batches``: (hidden [B, T, d], forward kwargs)). The same forward also sums each linear's input
    Gram over positions 1… of every sequence (:class:`BlockProbe` ``rest``): position 0 is the attention
    sink, whose inputs to some linears (SmolLM2's block-11 down projection: ~500× any other token's norm, up
    to 97 % of H's trace) outweigh every other token in H while its output barely reaches the loss."""
    modules = dict(layer.named_modules())
    grads: dict[str, torch.Tensor] = {}
    device = next(layer.parameters()).device
    sums = {n: torch.zeros(modules[n].out_features + 1, dtype=torch.float64, device=device) for n in names}
    rest: dict[str, torch.Tensor] = {}
    rest_rows: dict[str, torch.Tensor] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # this batch's inputs (held, so no id is reused) by leader
    hooks = []
    for n in names:

        def keep(_m, args, out, n=n):
            x = args[0]
            if id(x) in seen:  # another linear read this very tensor: one Gram for both
                leader = seen[id(x)][1]
                rest.setdefault(n, rest[leader])
                rest_rows.setdefault(n, rest_rows[leader])
            else:
                seen[id(x)] = (x, n)
                tail = x.detach()[:, 1:] if x.dim() >= 3 else x.detach()  # [B, T, …, K]: past position 0
                tail = tail.reshape(-1, x.shape[-1]).float()
                if n not in rest:
                    rest[n] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
                    rest_rows[n] = torch.zeros(1, dtype=torch.float64, device=x.device)
                rest[n] += (tail.t() @ tail).double()
                rest_rows[n] += tail.shape[0]
            out.register_hook(lambda g: grads.__setitem__(n, g.detach()))

        hooks.append(modules[n].register_forward_hook(keep))
    gen = torch.Generator().manual_seed(seed)
    energy = None
    try:
        with torch.enable_grad():
            for hidden, kwargs in batches:
                x = hidden.detach().float().requires_grad_(True)
                seen.clear()
                y = layer(x, **kwargs)
                y = y[0] if isinstance(y, tuple) else y
                energy = channel_energy([y.detach()]) if energy is None else energy + channel_energy([y.detach()])
                grads.clear()
                # drawn on the CPU generator on every device, so a GPU run draws the same u_t
                u = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
                torch.autograd.backward(y, u)
                for n in names:
                    g = grads[n].reshape(-1, grads[n].shape[-1]).double()
                    sums[n][:-1] += (g * g).sum(0)
                    sums[n][-1] += g.shape[0]
    finally:
        seen.clear()
        for h in hooks:
            h.remove()
    return BlockProbe(sums, energy, rest, rest_rows)


# What a probe's recorded sensitivities mean; a probe run's fingerprint holds it, so a probe begun under
# another definition is not resumed into a record whose blocks were measured two ways.
SENSITIVITY_MEASURE = "fisher-weighted run's solve on H past the sink / residual scale of the block's output"


def linear_sensitivity(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec,
    bits: list[int],
    scale: float,
    *,
    method: str = "rtn",
    options: dict | None = None,
    row_weight: torch.Tensor | None = None,
    measure: torch.Tensor | None = None,
) -> dict[str, float]:
    """The sensitivity of one linear at each width b in ``bits``, as recorded in a probe run:

        s(b) = Σ_r F̂_r · ((W − Ŵ_b) H' (W − Ŵ_b)ᵀ)_rr / ē

    Ŵ_b is W quantized by ``method`` (rtn or gptq, with ``options``) on ``spec``'s grid at b bits, solved on H =
    2·XᵀX/n, the Hessian of the linear's input; the error is weighed by H' (``measure``; H when None), in a probe
    H over every position but each sequence's first (:class:`BlockProbe`), so row r's term is 2·mean (ΔW_r x)²
    over those tokens, the error of output channel r. The first position is the attention sink: in some of
    SmolLM2's down projections its input is ~500× any other token's and makes up to 97 % of H, so on H a type that
    happens to round the sink's channels well (Q2_K on block 11's, 15× below Q3_K) looked better than one a bit
    wider, while the loss says the opposite (docs/quality.md, "What the measure missed"); the solve keeps H;
    F̂_r (``row_weight``, :func:`output_fisher` divided by its count; 1 when None) is how much channel r moves
    the block's output; ē = :func:`residual_scale` of the block's *output*, the residual stream the error is
    written into. Together this is a block-local estimate of the loss increase ½·Σ_r F_r (ΔW H ΔWᵀ)_rr (the
    K-FAC form of a diagonal-output Fisher F): the gradient at a block's output is taken as isotropic with
    variance ∝ 1/ē of that output, because every later block reads it through an RMSNorm. The input's ē would
    misjudge a block that grows the stream: SmolLM2's block 0 reads the embeddings (ē 0.011) and writes a
    stream of ē 1.03, so by its input its FFN weighed 100× too much and took the bytes of a GGUF mix of
    strata's own (docs/quality.md). On SmolLM2 the empirical Fisher of the residual writers (o_proj,
    down_proj) times the input's ē stays within 2.5× across blocks 1–29 while each alone moves ~200×
    (benchmarks/mixed.py); by the output's ē the width plan wins at both sizes it was measured at.
    Returns {str(b): s(b)} (JSON keys).
    """
    from dataclasses import replace

    from strata_quant.workers.methods import quantize_group

    if scale <= 0:
        raise ValueError(f"residual scale must be positive, got {scale}")
    out = {}
    for b in sorted(set(bits)):
        approx = quantize_group(method, weight, hessian, replace(spec, bits=int(b)), options or {}).dequantize()
        out[str(int(b))] = _weighted_error(weight, approx, hessian if measure is None else measure, scale, row_weight)
    return out


def _weighted_error(weight, approx, hessian, scale: float, row_weight: torch.Tensor | None) -> float:
    """Σ_r F̂_r · ((W − Ŵ) H (W − Ŵ)ᵀ)_rr / ē (F̂_r = 1 when ``row_weight`` is None)."""
    err = weight.double() - approx.double()
    rows = ((err @ hessian.double()) * err).sum(1)  # (ΔW H ΔWᵀ)_rr
    if row_weight is not None:
        rows = rows * row_weight.double()
    return float(rows.sum()) / scale


def ggml_sensitivity(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    types: list[str],
    scale: float,
    *,
    method: str = "rtn",
    options: dict | None = None,
    row_weight: torch.Tensor | None = None,
    measure: torch.Tensor | None = None,
    max_rows: int = 512,
) -> dict[str, float]:
    """The sensitivity of one linear on each of llama.cpp's types in ``types`` that can hold its rows
    (a row of K values needs K divisible by the type's block), as :func:`linear_sensitivity` defines it

        s(t) = Σ_r F̂_r · ((W − Ŵ_t) H' (W − Ŵ_t)ᵀ)_rr / ē

    with Ŵ_t what ``method`` makes of W on type t's grid from H, weighed by H' (``measure``; H when None): ``gptq`` the solve the run itself would make
    (:func:`workers.ggml.gptq_ggml` with ``options``' damp and diag_shrink), ``rtn`` importance-weighted
    rounding (:func:`workers.ggml.rtn_ggml`, importance diag H: what llama-quantize makes with an
    importance matrix). The solve is the error the file will have, at 2–3.5× the cost of rounding on
    SmolLM2's shapes; its plans differed little from rounding's there (docs/quality.md, "A mix of strata's
    own"). GPTQ's rows are independent given H (the feedback runs along a row), so
    the sum over the N rows is estimated from n = ``max_rows`` evenly spaced rows as N/n times their sum,
    for either method (exact when N ≤ n): a wide FFN's 8960 rows on six types would cost minutes per linear.
    Returns {type: s(t)}; a type that cannot hold the rows is absent (the plan never offers it)."""
    from strata_quant.workers.ggml import GRIDS
    from strata_quant.workers.methods import GGML_METHODS, quantize_ggml

    if scale <= 0:
        raise ValueError(f"residual scale must be positive, got {scale}")
    if method not in GGML_METHODS:
        raise ValueError(f"ggml sensitivity by method {method!r}: one of {', '.join(GGML_METHODS)}")
    n, cols = weight.shape
    if n > max_rows:
        rows = torch.linspace(0, n - 1, max_rows).round().long().to(weight.device)
        weight = weight[rows]
        row_weight = row_weight[rows] if row_weight is not None else None
        scale = scale * max_rows / n
    out = {}
    for t in dict.fromkeys(types):
        if cols % GRIDS[t].block:
            continue
        approx = quantize_ggml(method, weight, hessian, t, options or {}).dequantize()
        out[t] = _weighted_error(weight, approx, hessian if measure is None else measure, scale, row_weight)
    return out
