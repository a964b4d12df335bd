"""AWQ: activation-aware per-input-channel scales, folded into the op before the linears.

For linears that read one input x ∈ ℝᴷ (q/k/v after the input norm, gate/up after the
post-attention norm, o after v, down after up) AWQ multiplies the weights' input
columns by s > 0 and divides the input by s, which the preceding op absorbs (a norm's
weight, or the rows of the linear that produces x), so the float block computes the
same function:

    y = W x = (W · diag(s)) (x / s).

Rounding W · diag(s) instead of W protects the columns of large activations. The
scales are searched (Lin et al., 2023) over

    s(α) = mean|x|^α · mean|ŵ|^(−β),   s ← s / sqrt(max(s) · min(s)),   α = i / n, i = 0 … n − 1,

with β = 0, or β = 1 − α with ``duo`` scaling (ŵ: each weight over its group's absmax,
averaged over the output rows of all linears in the group). Each candidate quantizes
W · diag(s) on the grid (round-to-nearest, with the job's QuantSpec), dequantizes, divides
the columns by s again, and is scored by the output error of the whole module group
(q, k, v stacked; gate, up stacked) on the calibration inputs:

    ‖Y − Ŷ‖² = ‖X (W − Ŵ)ᵀ‖² = tr((W − Ŵ) · XᵀX · (W − Ŵ)ᵀ).

So the search needs only the Gram matrix S = XᵀX (the statistic GPTQ accumulates anyway)
and the per-channel sums Σ|x|, never the activations: both are sums over calibration
rows, so workers reduce them and the owner's search is exactly the single-worker one.
(The original AWQ scores q/k/v by the attention output and gate/up by the MLP output;
here the group's own outputs are the target.)

Clipping: after scaling, each (output row, input group) may clip its range to
m = f · max|w|, f ∈ {1, …, ``clip_min``} (``clip_grid`` + 1 steps); weights are clamped
to [−m, m] and rounded on the min/max grid of the clamped group. :func:`search_clip`
("block") keeps per (row, group) the f with the least error of its *partial* output
x_g · w_gᵀ, i.e. e_g S_gg e_gᵀ with S_gg the diagonal block of the Gram for the group's
columns. That drops the cross terms e_g S_gh e_hᵀ between groups — the same
approximation the original AWQ makes (it scores per-group partial sums) — and makes the
search separable. :func:`search_clip_full` ("full") starts there and minimises the whole
row's output error e S eᵀ by coordinate descent over the groups (each step exact for its
group, so the loss never rises); "two_sided" also clips the min and the max side of an
asymmetric group apart, [f_lo · min(w, 0), f_hi · max(w, 0)]. On SmolLM2-135M W4 g64 the
cross terms are worth most of AWQ's gap to GPTQ (README, the peer table).

AWQ then GPTQ: the folded weights W' = W · diag(s) see inputs x' = x / s, whose Hessian is
H' = diag(1/s) · H · diag(1/s); GPTQ rounds W' with H' (:func:`scale_gram`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from strata_quant.workers.gptq import gptq_quantize
from strata_quant.workers.grids import dequantize as grid_dequantize
from strata_quant.workers.grids import group_slices, minmax_params, quantize
from strata_quant.workers.result import QuantizedLinear, QuantSpec
from strata_quant.workers.rtn import rtn_quantize


class AbsMeanAccumulator:
    """Running Σ|x| per input channel over rows x ∈ ℝᴷ and their count; mean|x| = Σ|x| / n.

    Each batch is summed in float64, so sums split across workers add up to the
    single-worker sum (up to fp64 rounding, far below the fp32 the search works in).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        self.sum += rows.double().abs().sum(dim=0)
        self.count += rows.shape[0]

    def mean(self, total_sum: torch.Tensor | None = None, total_count: int | None = None) -> torch.Tensor:
        """mean|x| in float32 (from this accumulator, or from sums reduced across workers)."""
        s = self.sum if total_sum is None else total_sum
        n = self.count if total_count is None else total_count
        if n == 0:
            raise ValueError("no calibration rows reached this linear")
        return (s / n).float()


def scale_gram(gram: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The Gram (or Hessian) of the scaled inputs x / s: diag(1/s) · G · diag(1/s)."""
    inv = 1.0 / scales.to(gram.dtype)
    return gram * inv.unsqueeze(0) * inv.unsqueeze(1)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((W − Ŵ) G (W − Ŵ)ᵀ) = ‖X Wᵀ − X Ŵᵀ‖² for G = XᵀX."""
    err = weight.float() - approx.float()
    return float(((err @ gram.float()) * err).sum())


def weight_group_mean(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """mean over rows of |w| / max|w of its (row, input group)| — AWQ's per-channel weight magnitude."""
    w = weight.float().abs()
    out = torch.empty_like(w)
    for start, end in group_slices(w.shape[1], spec):
        part = w[:, start:end]
        out[:, start:end] = part / (part.amax(dim=1, keepdim=True) + 1e-6)
    return out.mean(dim=0)


def _tied_mean(values: torch.Tensor, expand: torch.Tensor | None, size: int) -> torch.Tensor:
    """Mean of per-input-channel values over the channels that share one scale (expand[c] = its slot)."""
    if expand is None:
        return values
    total = torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, expand, values)
    count = torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, expand, torch.ones_like(values))
    return total / count.clamp(min=1)


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float, duo: bool = False
) -> torch.Tensor:
    """s = mean|x|^α (· mean|ŵ|^−(1−α) with duo), clamped at 1e-4, normalised by sqrt(max·min)."""
    if duo:
        if w_mean is None:
            raise ValueError("duo scaling needs the weight magnitudes")
        s = x_mean.pow(alpha) / (w_mean.pow(1.0 - alpha) + 1e-4)
    else:
        s = x_mean.pow(alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def fake_quantize_scaled(weight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Ŵ = RTN(W · diag(s)) · diag(1/s): what the output sees after scaling, rounding and folding."""
    scaled = weight.float() * scales.unsqueeze(0)
    return rtn_dequantized(scaled, spec) / scales.unsqueeze(0)


def rtn_dequantized(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN(W) dequantized, as :func:`workers.rtn.rtn_quantize` gives it, all groups at once."""
    n_rows, n_cols = weight.shape
    g = spec.group_len(n_cols)
    if n_cols % g:
        return rtn_quantize(weight, spec).dequantize()
    flat = weight.float().reshape(n_rows * (n_cols // g), g)
    scale, zero = minmax_params(flat, spec)
    return grid_dequantize(quantize(flat, scale, zero, spec.maxq), scale, zero).reshape(n_rows, n_cols)


@dataclass
class ScaleSearch:
    """The chosen scales (one per slot of the preceding op) and what the search saw."""

    scales: torch.Tensor  # [R] float32, one per output channel of the preceding op
    alpha: float  # the chosen α; -1.0 when s = 1 (plain RTN) won
    loss: float  # Gram loss of the chosen scales
    loss_identity: float  # Gram loss of s = 1 (plain RTN)
    losses: list[float]  # Gram loss per α on the grid (plain, then duo with duo="both")
    duo: bool = False  # whether the chosen scales are duo scales


def search_scales(
    weight: torch.Tensor,
    gram: torch.Tensor,
    x_mean: torch.Tensor,
    spec: QuantSpec,
    *,
    grid: int = 20,
    duo: bool | str = False,
    expand: torch.Tensor | None = None,
) -> ScaleSearch:
    """The α on the grid i/grid, i = 0 … grid − 1, whose scales minimise the group's Gram loss.

    ``weight`` [N, K] stacks the linears that read the input (q/k/v, gate/up …); ``gram`` is
    Σ xᵀx [K, K] of that input (any positive multiple gives the same choice) and ``x_mean``
    mean|x| [K]. With ``expand`` [K] (int64) several input channels share one scale: channel
    c gets the scale of slot expand[c] (o_proj under GQA, whose columns of one v row must
    share a scale); mean|x| and mean|ŵ| are averaged over each slot's channels. The
    returned scales are per slot; s = 1 (plain RTN) is always a candidate, so the result
    is never worse than RTN on this loss. ``duo="both"`` searches the plain and the duo grid
    and keeps the better (never worse than either alone).
    """
    w = weight.float()
    g = gram.to(w.device, torch.float32)
    g = g / g.diagonal().mean().clamp(min=1e-30)  # a positive multiple: same argmin, tame magnitudes
    expand = None if expand is None else expand.to(w.device)
    size = int(expand.max()) + 1 if expand is not None else w.shape[1]
    x_slot = _tied_mean(x_mean.to(w.device, torch.float32), expand, size)
    w_slot = _tied_mean(weight_group_mean(w, spec), expand, size) if duo else None
    kinds = (False, True) if duo == "both" else (bool(duo),)

    def loss_of(slot_scales: torch.Tensor) -> float:
        s = slot_scales if expand is None else slot_scales[expand]
        return output_error(w, fake_quantize_scaled(w, s, spec), g)

    ones = torch.ones(size, device=w.device)
    best_scales, best_alpha, best_duo = ones, -1.0, False
    best = loss_identity = loss_of(ones)
    losses = []
    for kind in kinds:
        for i in range(grid):
            alpha = i / grid
            s = candidate_scales(x_slot, w_slot, alpha, kind)
            loss = loss_of(s)
            losses.append(loss)
            if loss < best:
                best, best_scales, best_alpha, best_duo = loss, s, alpha, kind
    return ScaleSearch(best_scales, best_alpha, best, loss_identity, losses, best_duo)


def search_clip(
    weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, *, grid: int = 20, clip_min: float = 0.5
) -> torch.Tensor:
    """Per (row, input group) clip ratio f ∈ {1 − i·(1 − clip_min)/grid}, minimising e_g S_gg e_gᵀ.

    ``weight`` [N, K] is the (already scaled) weight and ``gram`` the Gram of its input. A
    candidate clamps the group to [−f·max|w|, f·max|w|] and rounds it on the min/max grid of
    the clamped values; e_g is the rounding error of the group against the unclamped
    weights. Only the diagonal Gram block of each group is used (module docstring). Returns
    f [N, nG] (float32).
    """
    w = weight.float()
    g = gram.float()
    g = g / g.diagonal().mean().clamp(min=1e-30)
    slices = group_slices(w.shape[1], spec)
    best_f = torch.ones(w.shape[0], len(slices), device=w.device)
    for j, (start, end) in enumerate(slices):
        wg = w[:, start:end]
        block = g[start:end, start:end]
        absmax = wg.abs().amax(dim=1, keepdim=True)
        best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
        for i in range(grid + 1):
            f = 1.0 - i * (1.0 - clip_min) / grid
            clamped = torch.maximum(torch.minimum(wg, absmax * f), -absmax * f)
            scale, zero = minmax_params(clamped, spec)
            err = wg - grid_dequantize(quantize(clamped, scale, zero, spec.maxq), scale, zero)
            loss = ((err @ block) * err).sum(dim=1)
            better = loss < best_err
            best_err = torch.where(better, loss, best_err)
            best_f[:, j] = torch.where(better, torch.full_like(loss, f), best_f[:, j])
    return best_f


def apply_clip(weight: torch.Tensor, ratios: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """W with each (row, group) clamped to [−f·max|w|, f·max|w|] for the ratios f [N, nG].

    Ratios [N, nG, 2] clip the two sides apart (:func:`search_clip_full` with ``two_sided``):
    the group is clamped to [f_lo · min(w, 0), f_hi · max(w, 0)].
    """
    w = weight.float().clone()
    for j, (start, end) in enumerate(group_slices(w.shape[1], spec)):
        part = w[:, start:end]
        if ratios.dim() == 3:
            lo = part.amin(dim=1, keepdim=True).clamp(max=0) * ratios[:, j, 0:1]
            hi = part.amax(dim=1, keepdim=True).clamp(min=0) * ratios[:, j, 1:2]
        else:
            hi = part.abs().amax(dim=1, keepdim=True) * ratios[:, j : j + 1]
            lo = -hi
        w[:, start:end] = torch.maximum(torch.minimum(part, hi), lo)
    return w


def _clip_errors(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Rounding errors w − ŵ [C, N, g] of the group wg [N, g] clamped to [lo, hi] ([C, N, 1] each)
    and rounded on the min/max grid of the clamped values."""
    c, n, g = lo.shape[0], wg.shape[0], wg.shape[1]
    clamped = torch.maximum(torch.minimum(wg.unsqueeze(0), hi), lo).reshape(c * n, g)
    scale, zero = minmax_params(clamped, spec)
    approx = grid_dequantize(quantize(clamped, scale, zero, spec.maxq), scale, zero)
    return wg.unsqueeze(0) - approx.reshape(c, n, g)


def _delta(e: torch.Tensor, rest: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """2 · e_g · restᵀ + e_g S_gg e_gᵀ per candidate and row: [C, N, g] → [C, N]."""
    return 2.0 * (e * rest).sum(-1) + ((e @ block) * e).sum(-1)


def search_clip_full(
    weight: torch.Tensor,
    gram: torch.Tensor,
    spec: QuantSpec,
    *,
    grid: int = 20,
    clip_min: float = 0.5,
    sweeps: int = 2,
    two_sided: bool = False,
) -> torch.Tensor:
    """Clip ratios per (row, group) minimising each row's whole output error e S eᵀ (cross terms kept).

    Coordinate descent over the groups, starting from :func:`search_clip`'s choice. With the
    other groups' errors e_h fixed, a candidate error e_g of group g changes the row's loss by

        2 · e_g · (Σ_{h≠g} S_gh e_hᵀ) + e_g S_gg e_gᵀ   (up to a constant),

    so each step is exact for its group and the loss never increases (a ratio changes only
    when it lowers the loss); ``sweeps`` passes over the groups. Rows are independent.

    ``two_sided`` (asymmetric grids): the candidates clamp to [f_lo · min(w, 0), f_hi · max(w, 0)],
    f_lo, f_hi on the same grid, searched one side at a time within each step; returns
    ratios [N, nG, 2] (:func:`apply_clip`), else [N, nG] as :func:`search_clip`.
    """
    w = weight.float()
    g = gram.to(w.device, torch.float32)
    g = g / g.diagonal().mean().clamp(min=1e-30)
    slices = group_slices(w.shape[1], spec)
    ratios = search_clip(w, gram, spec, grid=grid, clip_min=clip_min)
    steps = torch.tensor([1.0 - i * (1.0 - clip_min) / grid for i in range(grid + 1)], device=w.device)
    if two_sided:  # the symmetric choice as (lo, hi) ratios: same clamp, so the same start
        sided = torch.ones(*ratios.shape, 2, device=w.device)
        for j, (start, end) in enumerate(slices):
            part = w[:, start:end]
            m = part.abs().amax(dim=1) * ratios[:, j]
            wmin, wmax = part.amin(dim=1).clamp(max=0), part.amax(dim=1).clamp(min=0)
            sided[:, j, 0] = torch.where(wmin < 0, (m / -wmin).clamp(max=1), torch.ones_like(m))
            sided[:, j, 1] = torch.where(wmax > 0, (m / wmax).clamp(max=1), torch.ones_like(m))
        ratios = sided
    err = w - rtn_dequantized(apply_clip(w, ratios, spec), spec)
    for _ in range(sweeps):
        for j, (start, end) in enumerate(slices):
            wg, block = w[:, start:end], g[start:end, start:end]
            rest = err @ g[:, start:end] - err[:, start:end] @ block  # Σ_{h≠g} e_h S_hg, [N, g]
            best = _delta(err[:, start:end].unsqueeze(0), rest, block)[0]
            if two_sided:
                wmin = wg.amin(dim=1, keepdim=True).clamp(max=0)
                wmax = wg.amax(dim=1, keepdim=True).clamp(min=0)
                for side in (1, 0):  # the max side, then the min side
                    fixed = ratios[:, j, 1 - side].view(1, -1, 1).expand(len(steps), -1, 1)
                    moving = steps.view(-1, 1, 1).expand(-1, w.shape[0], 1)
                    lo, hi = (moving, fixed) if side == 0 else (fixed, moving)
                    cand = _clip_errors(wg, lo * wmin, hi * wmax, spec)
                    loss, idx = _delta(cand, rest, block).min(dim=0)
                    better = loss < best
                    best = torch.where(better, loss, best)
                    ratios[:, j, side] = torch.where(better, steps[idx], ratios[:, j, side])
                    pick = cand.gather(0, idx.view(1, -1, 1).expand(1, -1, end - start))[0]
                    err[:, start:end] = torch.where(better.unsqueeze(1), pick, err[:, start:end])
            else:
                m = wg.abs().amax(dim=1, keepdim=True)
                bound = steps.view(-1, 1, 1) * m.unsqueeze(0)
                cand = _clip_errors(wg, -bound, bound, spec)
                loss, idx = _delta(cand, rest, block).min(dim=0)
                better = loss < best
                ratios[:, j] = torch.where(better, steps[idx], ratios[:, j])
                pick = cand.gather(0, idx.view(1, -1, 1).expand(1, -1, end - start))[0]
                err[:, start:end] = torch.where(better.unsqueeze(1), pick, err[:, start:end])
    return ratios


def clip_ratios(
    weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, mode: str = "two_sided", *, grid: int = 20
) -> torch.Tensor:
    """The clip ratios of ``mode``: "block" (:func:`search_clip`), "full" or "two_sided"
    (:func:`search_clip_full`); [N, nG], or [N, nG, 2] for two_sided."""
    if mode == "block":
        return search_clip(weight, gram, spec, grid=grid)
    if mode not in ("full", "two_sided"):
        raise ValueError(f"unknown AWQ clip search {mode!r}")
    return search_clip_full(weight, gram, spec, grid=grid, two_sided=mode == "two_sided")


def awq_quantize(
    weight: torch.Tensor,
    gram: torch.Tensor,
    x_mean: torch.Tensor,
    spec: QuantSpec,
    *,
    grid: int = 20,
    duo: bool = False,
    clip: bool = True,
    clip_search: str = "two_sided",
    solver: str = "rtn",
    **gptq_options,
) -> tuple[QuantizedLinear, torch.Tensor, ScaleSearch]:
    """AWQ for one group of linears that share an input, without folding (tests, measurements).

    Returns the quantized *scaled* weight W · diag(s), the per-channel scales s (the caller
    folds 1/s into the preceding op) and the search record. ``solver`` "rtn" rounds to
    nearest after the clip search; "gptq" runs GPTQ on W · diag(s) with the Hessian of the
    scaled inputs, 2·diag(1/s) G diag(1/s) / n (no clip search: GPTQ picks the rounding).
    ``clip_search``: "block" (:func:`search_clip`), "full" or "two_sided" (:func:`search_clip_full`).
    ``gram`` is Σ xᵀx; its scale does not matter here.
    """
    found = search_scales(weight, gram, x_mean, spec, grid=grid, duo=duo)
    s = found.scales
    scaled = weight.float() * s.unsqueeze(0)
    gram_s = scale_gram(gram.float(), s)
    if solver == "gptq":
        result = gptq_quantize(scaled, gram_s, spec, **gptq_options)
    elif solver == "rtn":
        if clip:
            scaled = apply_clip(scaled, clip_ratios(scaled, gram_s, spec, clip_search), spec)
        result = rtn_quantize(scaled, spec)
    else:
        raise ValueError(f"unknown solver {solver!r}")
    return result, s, found


# -- folding: the relations found from the block's own code -------------------------------


@dataclass
class ScaleGroup:
    """Linears whose shared input is scaled, and the op before them that absorbs 1/s.

    ``prev`` is a module path in the block: a norm (its weight, and bias if any, is divided
    by s; a norm computing x̂ · (c + w) has ``offset`` c and its weight becomes (c + w)/s − c)
    or a linear (its output rows ``rows`` — all of them when None, a slice of a fused
    qkv_proj / gate_up_proj otherwise — and their bias are divided by s). ``expand`` maps
    each input channel of the linears to its slot among those rows (None: identity).
    """

    prev: str
    linears: list[str]
    expand: torch.Tensor | None = None
    rows: tuple[int, int] | None = None
    offset: float = 0.0

    def to_dict(self) -> dict:
        """Plain data (the plan sends the relations it found to every worker)."""
        return {
            "prev": self.prev,
            "linears": list(self.linears),
            "expand": None if self.expand is None else self.expand.tolist(),
            "rows": None if self.rows is None else list(self.rows),
            "offset": self.offset,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ScaleGroup:
        expand = None if d["expand"] is None else torch.tensor(d["expand"], dtype=torch.int64)
        rows = None if d["rows"] is None else (int(d["rows"][0]), int(d["rows"][1]))
        return cls(d["prev"], list(d["linears"]), expand, rows, float(d["offset"]))

    def slots(self, block: nn.Module) -> int:
        if self.rows is not None:
            return self.rows[1] - self.rows[0]
        prev = block.get_submodule(self.prev)
        return prev.out_features if isinstance(prev, nn.Linear) else prev.weight.shape[0]


# a fold holds when the block's branch output moves by less than this (relative): fp32 rounding
# of an exact fold is ~1e-6, a fold that changes the function moves it by ~1e-2 or more
FOLD_TOLERANCE = 1e-4


def _branch(layer: nn.Module, sample: torch.Tensor, kwargs: dict, hooks=(), capture: str | None = None):
    """The block's output minus its input (what the block adds to the residual stream) with
    temporary ``hooks`` ((module, kind, fn) with kind "pre" or "post"), and the input of
    linear ``capture`` when asked."""
    seen: list[torch.Tensor] = []
    handles = []
    for module, kind, fn in hooks:
        handles.append(module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn))
    if capture is not None:
        handles.append(layer.get_submodule(capture).register_forward_pre_hook(lambda _m, a: seen.append(a[0])))
    try:
        with torch.no_grad():
            out = layer(sample, **kwargs)
    finally:
        for h in handles:
            h.remove()
    out = out[0] if isinstance(out, tuple) else out
    return out - sample, (seen[0] if seen else None)


def _moved(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _scale_inputs(cols: torch.Tensor):
    """A pre-hook multiplying a linear's input channels by ``cols`` (the columns' side of a fold)."""
    return lambda _m, args: (args[0] * cols, *args[1:])


def _fold_holds(layer, sample, kwargs, ref, linears: list[str], prev_hooks: list, cols: torch.Tensor) -> bool:
    hooks = prev_hooks + [(layer.get_submodule(n), "pre", _scale_inputs(cols)) for n in linears]
    return _moved(_branch(layer, sample, kwargs, hooks)[0], ref) < FOLD_TOLERANCE


def _test_scales(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.rand(n, generator=g) * 2.0 - 1.0)  # e^±1, every one different


def _norm_fold(layer, sample, kwargs, ref, name: str, linears: list[str]) -> float | None:
    """The offset c with which norm ``name`` absorbs 1/s ((c + w)/s − c), or None."""
    norm = layer.get_submodule(name)
    weight = getattr(norm, "weight", None)
    width = layer.get_submodule(linears[0]).in_features
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != width:
        return None
    s = _test_scales(width, 1).to(weight.device, weight.dtype)
    bias = getattr(norm, "bias", None)
    probe = torch.randn(4, width, generator=torch.Generator().manual_seed(2)).to(weight.device, weight.dtype)
    original = weight.data
    try:
        with torch.no_grad():
            norm.weight.data = torch.zeros_like(original)
            y0 = norm(probe)
            norm.weight.data = torch.ones_like(original)
            y1 = norm(probe)
        d = y1 - y0
        c = float((y0 * d).sum() / (d * d).sum().clamp(min=1e-30))
        if bias is not None or _moved(c * d, y0) > FOLD_TOLERANCE:
            c = 0.0  # y = x̂ · w + b: the plain fold, tried below like any other
        c = round(c, 6)
        norm.weight.data = (original + c) / s - c if c else original / s
        hooks = []
        if bias is not None:
            hooks.append((norm, "post", lambda _m, _a, out: out - bias + bias / s))
        holds = _fold_holds(layer, sample, kwargs, ref, linears, hooks, s)
    finally:
        norm.weight.data = original
    return c if holds else None


def _row_segments(rows: int, width: int) -> list[tuple[int, int]]:
    """The rows of a linear that may feed an input of ``width`` channels: all of them, then
    the tail and the head slices whose size divides ``width`` (a fused qkv_proj's v rows, a
    fused gate_up_proj's up rows), largest first."""
    sizes = [d for d in range(min(rows - 1, width), 15, -1) if width % d == 0][:8]
    return [(0, rows)] + [seg for d in sizes for seg in ((rows - d, rows), (0, d))]


def _channel_map(x: torch.Tensor, moved: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """expand with moved[..., c] = x[..., c] / t[expand[c]] for every channel c, or None."""
    x, moved = x.reshape(-1, x.shape[-1]).double(), moved.reshape(-1, moved.shape[-1]).double()
    energy = (x * x).sum(0)
    if bool((energy == 0).any()):
        return None
    ratio = (moved * x).sum(0) / energy  # 1 / t of the slot, when the channel is a slot scaled
    resid = (moved - ratio * x).norm(dim=0) / energy.sqrt()
    if float(resid.max()) > FOLD_TOLERANCE:
        return None
    inv = 1.0 / t.double()
    expand = (ratio.unsqueeze(1) - inv.unsqueeze(0)).abs().argmin(dim=1)
    if float((inv[expand] / ratio - 1).abs().max()) > FOLD_TOLERANCE:
        return None
    return expand


def _linear_fold(layer, sample, kwargs, ref, x, prev: str, linears: list[str]):
    """(rows, expand) with which linear ``prev``'s output rows absorb the group's scales, or None.

    Each candidate slice of ``prev``'s rows is scaled by 1/t (t all different) through a
    hook; when every input channel of the group moves by exactly 1/t of one row, that map is
    the expand, and the fold is accepted when fresh scales folded both ways leave the
    block's function unchanged."""
    p = layer.get_submodule(prev)
    width = x.shape[-1]
    for a, b in _row_segments(p.out_features, width):
        t = torch.linspace(1.0, 4.0, b - a, dtype=torch.float32, device=x.device)

        def scale_rows(vec, a=a, b=b):
            def fn(_m, _args, out):
                out = out.clone()
                out[..., a:b] = out[..., a:b] / vec
                return out

            return fn

        moved = _branch(layer, sample, kwargs, [(p, "post", scale_rows(t))], capture=linears[0])[1]
        if _moved(moved, x) < 1e-7:
            return None  # prev does not feed this input at all
        expand = _channel_map(x, moved, t)
        if expand is None:
            continue
        s = _test_scales(b - a, 3).to(x.device)
        if _fold_holds(layer, sample, kwargs, ref, linears, [(p, "post", scale_rows(s))], s[expand]):
            identity = b - a == width and bool((expand == torch.arange(width, device=expand.device)).all())
            return (None if (a, b) == (0, p.out_features) else (a, b)), (None if identity else expand.cpu())
    return None


def find_scale_groups(
    layer: nn.Module, trace, sample: torch.Tensor, kwargs: dict
) -> tuple[list[ScaleGroup], dict[tuple[str, ...], str]]:
    """The AWQ relations of a block, found from its own code: per shared-input group of
    ``trace`` (:func:`workers.block.trace_block`), the op before it that absorbs 1/s.

    * The module that produced the group's input (the trace's feeder) when it is a norm
      whose output scales with its weight: y = x̂ · (c + w) (c = 0 for Llama's RMSNorm,
      1 for Gemma's), measured on the module and checked on the block.
    * Otherwise the nearest earlier linear whose output rows the input is a per-channel
      multiple of (v_proj → o_proj, with grouped-query attention's expand; up_proj →
      down_proj; the v / up rows of a fused qkv_proj / gate_up_proj): found by scaling the
      candidate's rows and watching the input move.

    Every relation is accepted only when folding random scales leaves the block's function
    unchanged (:data:`FOLD_TOLERANCE`). Returns the groups that have a relation, in block
    order, and {group: why not} for those that have none (their linears are quantized
    without scales).
    """
    ref, _ = _branch(layer, sample, kwargs)
    found, missing = [], {}
    for names, feeder in zip(trace.groups, trace.feeders):
        names = list(names)
        _, x = _branch(layer, sample, kwargs, capture=names[0])
        if feeder is not None and not isinstance(layer.get_submodule(feeder), nn.Linear):
            c = _norm_fold(layer, sample, kwargs, ref, feeder, names)
            if c is not None:
                found.append(ScaleGroup(feeder, names, offset=c))
            else:
                missing[tuple(names)] = f"{feeder} (which computes their input) cannot absorb a per-channel scale"
            continue
        earlier = [n for n in trace.order[: trace.order.index(names[0])] if n not in names]
        candidates = ([feeder] if feeder is not None else []) + list(reversed(dict.fromkeys(earlier)))
        for prev in candidates:
            hit = _linear_fold(layer, sample, kwargs, ref, x, prev, names)
            if hit is not None:
                found.append(ScaleGroup(prev, names, expand=hit[1], rows=hit[0]))
                break
        else:
            tried = ", ".join(candidates) or "none"
            missing[tuple(names)] = f"no earlier op absorbs a per-channel scale of their input (tried: {tried})"
    return found, missing


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, scales: torch.Tensor) -> list[str]:
    """Divide ``group.prev``'s output channels by s and multiply the linears' input columns by s.

    The block computes the same function afterwards (exactly in real arithmetic). Returns
    the names (in the block) of the float tensors of ``prev`` that changed.
    """
    prev = block.get_submodule(group.prev)
    s = scales.to(prev.weight.dtype)
    changed = []
    if isinstance(prev, nn.Linear):
        if group.rows is None:
            prev.weight.data = prev.weight.data / s.unsqueeze(1)
        else:
            a, b = group.rows
            weight = prev.weight.data.clone()
            weight[a:b] = weight[a:b] / s.unsqueeze(1)
            prev.weight.data = weight
    elif group.offset:  # y = x̂ · (c + w): (c + w') = (c + w) / s
        prev.weight.data = (prev.weight.data + group.offset) / s - group.offset
    else:
        prev.weight.data = prev.weight.data / s
    changed.append(f"{group.prev}.weight")
    if getattr(prev, "bias", None) is not None:
        if group.rows is None:
            prev.bias.data = prev.bias.data / s
        else:
            bias = prev.bias.data.clone()
            bias[group.rows[0] : group.rows[1]] = bias[group.rows[0] : group.rows[1]] / s
            prev.bias.data = bias
        changed.append(f"{group.prev}.bias")
    cols = s if group.expand is None else s[group.expand.to(s.device)]
    for name in group.linears:
        lin = block.get_submodule(name)
        lin.weight.data = lin.weight.data * cols.to(lin.weight.dtype).unsqueeze(0)
    return changed


def column_scales(group: ScaleGroup, scales: torch.Tensor) -> torch.Tensor:
    """The per-input-channel scales of the group's linears (slot scales expanded)."""
    return scales if group.expand is None else scales[group.expand.to(scales.device)]
