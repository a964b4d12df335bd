"""Integer grids: per-group scale and zero point, rounding and its inverse.

For a group of weights w (one output row, one input group):

* symmetric, zero z = 2^(b−1) and codes q ∈ [0, 2^b − 1], so q − z ∈ [−2^(b−1), 2^(b−1) − 1]:
  s = max(max(w⁺) / (2^(b−1) − 1), max(w⁻) / 2^(b−1)), which puts the largest positive
  weight on the top level and the most negative one on the bottom level without clipping
  either (the plain absmax / (2^(b−1) − 1) rule wastes the bottom level);
* asymmetric: s = (max(w, 0) − min(w, 0)) / (2^b − 1), z = round(−min(w, 0) / s);

and q = clamp(round(w / s) + z, 0, 2^b − 1), ŵ = s · (q − z).

With ``mse_grid`` > 0 the range is shrunk by factors 1, 1 − 1/n, … down to
``mse_min_shrink`` and each row keeps the factor whose rounding error Σ|w − ŵ|^p is
least (p = 2.4, as GPTQ's reference search).

Scales are rounded to float16 before the codes are computed, so every format that
stores fp16 scales carries exactly these numbers.
"""

from __future__ import annotations

import torch

from strata_quant.workers.result import QuantSpec

FP16_MAX = 65504.0


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value ≥ scale (so the grid still spans the group and nothing
    clips), never zero: an all-zero group gets scale 1, a vanishing one the least fp16."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(max=FP16_MAX)
    half = scale.half()
    below = half.float() < scale
    half = torch.where(below, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    half = torch.where(half > 0, half, torch.full_like(half, 2.0**-24))
    return half.float()


def minmax_params(
    w: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp32 holding fp16 values) and integer zero (float) per row of w [N, g]."""
    w = w.float()
    wmax = w.max(dim=1).values.clamp(min=0) * shrink
    wmin = w.min(dim=1).values.clamp(max=0) * shrink
    if spec.sym:
        zero_level = spec.sym_zero
        scale = torch.maximum(wmax / (zero_level - 1), -wmin / zero_level)
        scale = round_scale(scale)
        zero = torch.full_like(scale, float(zero_level))
    else:
        scale = round_scale((wmax - wmin) / spec.maxq)
        zero = torch.round(-wmin / scale).clamp(0, spec.maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes q = clamp(round(w / s) + z, 0, maxq) for w [N, g], s and z [N]."""
    return torch.clamp(torch.round(w / scale.unsqueeze(1)) + zero.unsqueeze(1), 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """ŵ = s · (q − z)."""
    return scale.unsqueeze(1) * (q - zero.unsqueeze(1))


def group_params(
    w: torch.Tensor,
    spec: QuantSpec,
    mse_grid: int = 0,
    mse_min_shrink: float = 0.75,
    norm: float = 2.4,
    col_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row for the group w [N, g]; min/max, or the best shrink of it, the shrink
    minimising Σ_k c_k·|ŵ_k − w_k|^norm per row, c = ``col_weight`` [g] (None: c_k = 1). With c the
    input's H diagonal (mean x²) this is the importance-weighted search llama.cpp's imatrix runs."""
    scale, zero = minmax_params(w, spec)
    if mse_grid <= 0:
        return scale, zero
    w = w.float()
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_scale, best_zero = scale, zero
    steps = int(round((1.0 - mse_min_shrink) * mse_grid))
    for i in range(steps + 1):
        shrink = 1.0 - i / mse_grid
        s, z = minmax_params(w, spec, shrink)
        err = (dequantize(quantize(w, s, z, spec.maxq), s, z) - w).abs().pow(norm)
        err = err.sum(dim=1) if col_weight is None else err @ col_weight
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
        best_zero = torch.where(better, z, best_zero)
    return best_scale, best_zero


def group_slices(in_features: int, spec: QuantSpec) -> list[tuple[int, int]]:
    """[start, end) of each input group; the last one is partial when K % G ≠ 0."""
    g = spec.group_len(in_features)
    return [(start, min(start + g, in_features)) for start in range(0, in_features, g)]
