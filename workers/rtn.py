"""Round-to-nearest: each group rounded on its own grid, no error feedback."""

from __future__ import annotations

import torch

from strata_quant.workers.grids import group_params, group_slices, quantize
from strata_quant.workers.result import QuantizedLinear, QuantSpec


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, mse_grid: int = 0) -> QuantizedLinear:
    """q[n, k] = clamp(round(W[n, k] / s[n, g]) + z[n, g], 0, 2^b − 1) for g = k // G.

    Scales and zeros come from :func:`workers.grids.group_params` (min/max, or the
    best shrink of it when ``mse_grid`` > 0). A last partial group is handled as a group.
    """
    w = weight.float()
    n_rows, n_cols = w.shape
    slices = group_slices(n_cols, spec)
    codes = torch.empty(n_rows, n_cols, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n_rows, len(slices), dtype=torch.float16, device=w.device)
    zeros = torch.empty(n_rows, len(slices), dtype=torch.uint8, device=w.device)
    g_idx = torch.empty(n_cols, dtype=torch.int32, device=w.device)
    for g, (start, end) in enumerate(slices):
        scale, zero = group_params(w[:, start:end], spec, mse_grid=mse_grid)
        codes[:, start:end] = quantize(w[:, start:end], scale, zero, spec.maxq).to(torch.uint8)
        scales[:, g] = scale.half()
        zeros[:, g] = zero.to(torch.uint8)
        g_idx[start:end] = g
    return QuantizedLinear(
        spec=spec, codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, method="rtn", params={"mse_grid": mse_grid}
    )
