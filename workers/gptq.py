"""GPTQ: round one input column at a time and push the error onto the columns not yet rounded.

Minimises ‖W X − Ŵ X‖² over the codes, with H = 2·XᵀX / n the Hessian of that loss
in each row of W. With U the upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹,
column j is rounded to q_j and the rest of the row is corrected by

    e_j = (w_j − ŵ_j) / U[j, j],      W[:, j:] −= e_j · U[j, j:],

applied lazily in blocks of ``block_size`` columns (Frantar et al., 2022). Rows are
independent given H, so linears that share an input (q/k/v, gate/up) can be stacked
and solved as one matrix with the same result.

Options: act-order (columns in decreasing diag(H)), with static groups (group
parameters from the original weights, g_idx = k // G) or without (groups along the
processing order, g_idx non-monotone); group scales from min/max or an MSE shrink
search; a partial last group when K % G ≠ 0. Dead inputs (diag(H) = 0) get weight 0.
When the Cholesky fails, the damping λ is multiplied by 10 and retried.
"""

from __future__ import annotations

import torch

from workers.grids import group_params, group_slices
from workers.result import QuantizedLinear, QuantSpec


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper U with UᵀU = (H + λ·mean(diag H)·I)⁻¹; returns U (float32) and the λ used.

    Factorised in float32 (as GPTQ's reference; float64 costs 2–4× on CPUs), retried in
    float64 when float32 fails, and with λ × 10 when both fail.
    """
    mean_diag = torch.diag(hessian).to(torch.float64).mean().clamp(min=1e-12).item()
    lam = damp
    for _ in range(max_tries):
        for dtype in (torch.float32, torch.float64):
            h = hessian.to(dtype)
            h = h + torch.diag(torch.full((h.shape[0],), lam * mean_diag, dtype=dtype, device=h.device))
            # With J the exchange matrix and L L^T = J H J: H = R R^T for the upper R = J L J,
            # so H^-1 = (R^-1)^T R^-1 and U = R^-1 = J L^-1 J. One Cholesky and one triangular
            # inverse instead of Cholesky, inverse and a second Cholesky.
            chol, info = torch.linalg.cholesky_ex(torch.flip(h, (0, 1)))
            if int(info) != 0:
                continue
            eye = torch.eye(h.shape[0], dtype=dtype, device=h.device)
            upper = torch.flip(torch.linalg.solve_triangular(chol, eye, upper=False), (0, 1))
            if torch.isfinite(upper).all():
                return upper.to(torch.float32), lam
        lam *= 10.0
    raise ValueError(f"Hessian is not positive definite even with damping {lam / 10:g}")


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ): the relative error of the layer's output on X."""
    h = hessian.float()
    err = weight.float() - approx.float()
    num = ((err @ h) * err).sum()
    den = ((weight.float() @ h) * weight.float()).sum().clamp(min=1e-30)
    return float(num / den)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    mse_grid: int = 0,
) -> QuantizedLinear:
    """Quantize W [N, K] with the Hessian H [K, K] of its input; see the module docstring."""
    w = weight.float().clone()
    n_rows, n_cols = w.shape
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    group_len = spec.group_len(n_cols)
    n_groups = len(group_slices(n_cols, spec))
    scales = torch.zeros(n_rows, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.zeros(n_rows, n_groups, dtype=torch.float32, device=w.device)
    ready = [False] * n_groups

    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    else:
        perm = torch.arange(n_cols, device=w.device)
    col_group = torch.arange(n_cols, device=w.device) // group_len
    if act_order and not static_groups:
        pos_group = col_group  # groups follow the processing order
    else:
        pos_group = col_group[perm]
    if act_order and static_groups:
        for g, (start, end) in enumerate(group_slices(n_cols, spec)):
            scales[:, g], zeros[:, g] = group_params(w[:, start:end], spec, mse_grid=mse_grid)
            ready[g] = True

    # work on Wᵀ so that each column is a contiguous row and every update is in place
    wt = w[:, perm].t().contiguous()  # [K, N] in processing order
    upper, lam = damped_inverse_cholesky(h[perm][:, perm], damp)
    codes_t = torch.empty(n_cols, n_rows, dtype=torch.float32, device=w.device)
    pos_group_list = pos_group.tolist()
    maxq = float(spec.maxq)

    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        w_blk = wt[i1:i2]  # a view: updated in place
        err_blk = torch.empty_like(w_blk)
        u_blk = upper[i1:i2, i1:i2]
        inv_diag = (1.0 / torch.diag(u_blk)).tolist()
        for i in range(i2 - i1):
            pos = i1 + i
            g = pos_group_list[pos]
            if not ready[g]:
                # first column of a group along the processing order: params from the
                # error-compensated weights of its columns (the last group may be partial)
                end = min((g + 1) * group_len, n_cols)
                scales[:, g], zeros[:, g] = group_params(wt[pos:end].t(), spec, mse_grid=mse_grid)
                ready[g] = True
            s, z = scales[:, g], zeros[:, g]
            col = w_blk[i]
            q = torch.div(col, s).round_().add_(z).clamp_(0.0, maxq)
            codes_t[pos] = q
            err = torch.sub(col, q.sub_(z).mul_(s)).mul_(inv_diag[i])
            err_blk[i] = err
            w_blk[i:].addr_(u_blk[i, i:], err, alpha=-1.0)
        wt[i2:].addmm_(upper[i1:i2, i2:].t(), err_blk, alpha=-1.0)
    codes_p = codes_t.t()

    codes = torch.empty(n_rows, n_cols, dtype=torch.uint8, device=w.device)
    codes[:, perm] = codes_p.to(torch.uint8)
    g_idx = torch.empty(n_cols, dtype=torch.int32, device=w.device)
    g_idx[perm] = pos_group.to(torch.int32)
    result = QuantizedLinear(
        spec=spec,
        codes=codes,
        scales=scales.half(),
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx,
        method="gptq",
        perm=perm.to(torch.int64) if act_order else None,
        params={
            "damp": damp,
            "damp_used": lam,
            "block_size": block_size,
            "act_order": act_order,
            "static_groups": static_groups,
            "mse_grid": mse_grid,
            "dead_inputs": int(dead.sum()),
        },
    )
    return result
