"""GPTQ on llama.cpp's block grids: K-quants (Q2_K … Q6_K) and the legacy types (Q4_0 … Q8_0).

Every ggml type dequantizes one row of W [N, K] block by block; within a sub-block j of
``sub`` consecutive columns all values share one affine grid

    ŵ = a_j · (q − z) − b_j,        q ∈ [0, 2^bits − 1] the stored code, z a fixed offset,

where (a_j, b_j) are made of a block's stored numbers (d, dmin fp16; sc_j, m_j small ints):

    Q4_0 / Q5_0 / Q8_0   a = d,          b = 0,           z = 8 / 16 / 128, sub = block = 32
    Q4_1 / Q5_1          a = d,          b = −m,          z = 0,            sub = block = 32
    Q2_K / Q4_K / Q5_K   a = d·sc_j,     b = dmin·m_j,    z = 0,  sub = 16 / 32 / 32, block 256
    Q3_K / Q6_K          a = d·sc_j,     b = 0,           z = 4 / 32, sub = 16, block = 256

(sc_j, m_j unsigned 4-bit (Q2_K) or 6-bit (Q4_K, Q5_K); signed 6-bit (Q3_K) or 8-bit (Q6_K)).
In float32, d·sc_j and dmin·m_j are exact and a·(q − z) − b rounds as ggml's dequantizers do,
so :meth:`GGMLQuantized.dequantize` is what llama.cpp and gguf-py read back, bit for bit.

The solver fits each block's grid first and then chooses its codes with GPTQ's error feedback
(:mod:`strata_quant.workers.gptq`): with F the unit upper factor of the damped Hessian
(:func:`damped_cholesky_feedback`), column j is rounded from

    w̃_j = w_j + Σ_{i<j} (w_i − ŵ_i) · F[i, j],     q_j = clamp(round((w̃_j + b)/a) + z, 0, 2^bits − 1).

A block's grid is fitted when the column loop reaches it, on the optimally compensated weights
of its columns (W_{≥t} + D_{<t} H_{<t,≥t} H_{≥t,≥t}⁻¹, as GPTQ's groups), by llama.cpp's own
importance-weighted searches (ggml-quants.c: make_qkx3_quants for affine sub-blocks,
make_qx_quants for symmetric ones, make_qp_quants / make_qx_quants for the sub-scales) with
importance diag(H)_k · sqrt(σ² + w_k²), σ² = 2·mean(w²) over the block: the weights
llama.cpp derives from an importance matrix, whose entries are diag(XᵀX)/n ∝ diag(H).

A row whose length is not a multiple of the block cannot be stored in that type (llama.cpp
falls back to another type; choosing it is the mix's job): such a call is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from strata_quant.workers.gptq import _compensated, damped_cholesky_feedback, shrink_to_diagonal

GGML_SCHEMA_VERSION = 1
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a block whose largest |w| is below this is all zero


@dataclass(frozen=True)
class GGMLGrid:
    """One ggml type's grid as data: values per block and per sub-block, code bits, code offset
    z, whether it has an offset b, and the sub-scales (bits, signed) of a K-quant (0: legacy)."""

    name: str
    block: int
    sub: int
    bits: int
    zero: int
    affine: bool
    scale_bits: int = 0
    signed_scales: bool = False
    sigma_factor: float = 2.0  # σ² = factor · mean(w²) over the block in the importance (llama.cpp's)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def k_quant(self) -> bool:
        return self.scale_bits > 0

    @property
    def subs_per_block(self) -> int:
        return self.block // self.sub


GRIDS: dict[str, GGMLGrid] = {
    g.name: g
    for g in (
        GGMLGrid("Q4_0", 32, 32, 4, 8, False, sigma_factor=1.0),
        GGMLGrid("Q4_1", 32, 32, 4, 0, True, sigma_factor=1.0),
        GGMLGrid("Q5_0", 32, 32, 5, 16, False, sigma_factor=1.0),
        GGMLGrid("Q5_1", 32, 32, 5, 0, True, sigma_factor=1.0),
        GGMLGrid("Q8_0", 32, 32, 8, 128, False, sigma_factor=1.0),
        GGMLGrid("Q2_K", 256, 16, 2, 0, True, 4, sigma_factor=1.0),
        GGMLGrid("Q3_K", 256, 16, 3, 4, False, 6, True),
        GGMLGrid("Q4_K", 256, 32, 4, 0, True, 6),
        GGMLGrid("Q5_K", 256, 32, 5, 0, True, 6),
        GGMLGrid("Q6_K", 256, 16, 6, 32, False, 8, True),
    )
}


@dataclass
class GGMLQuantized:
    """One linear on a ggml grid, in the stored numbers of its blocks (row-major, column order).

    ``codes`` uint8 [N, K] ∈ [0, 2^bits − 1]; ``d`` fp16 [N, K/block]; ``dmin`` fp16 [N, K/block]
    (K-quant mins' scale, or a legacy type's m), None without an offset; ``sc`` / ``mins`` int16
    [N, K/sub], the K-quants' sub-scales and sub-mins as stored (signed for Q3_K, Q6_K), else None.
    """

    grid: GGMLGrid
    codes: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mins: torch.Tensor | None = None
    params: dict | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def sub_grids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) float32 [N, K/sub]: ŵ = a·(q − z) − b in each sub-block (see the module docstring)."""
        return sub_grid(self.grid, self.d, self.dmin, self.sc, self.mins)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ŵ [N, K], rounded (in float32) as ggml's dequantizers round it, then cast to ``dtype``."""
        a, b = self.sub_grids()
        n, k = self.codes.shape
        sub = self.grid.sub
        q = (self.codes.float() - self.grid.zero).view(n, k // sub, sub)
        return (a.unsqueeze(2) * q - b.unsqueeze(2)).view(n, k).to(dtype)

    def rows(self, start: int, end: int) -> GGMLQuantized:
        """Rows ``start:end`` (whole rows: every stored number is per row)."""
        cut = {k: (v[start:end] if v is not None else None) for k, v in self._fields().items()}
        return GGMLQuantized(self.grid, **cut, params=self.params)

    def _fields(self) -> dict[str, torch.Tensor | None]:
        return {k: getattr(self, k) for k in ("codes", "d", "dmin", "sc", "mins")}

    @property
    def method(self) -> str:
        return str((self.params or {}).get("method", "gptq"))

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Its stored numbers as tensors and one JSON metadata entry (``kind`` "ggml", the type's name)."""
        tensors = {k: v.contiguous() for k, v in self._fields().items() if v is not None}
        meta = {"schema": GGML_SCHEMA_VERSION, "kind": "ggml", "ggml_type": self.grid.name, "params": self.params or {}}
        return tensors, {"strata_result": json.dumps(meta, sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> GGMLQuantized:
        meta = json.loads(metadata["strata_result"])
        if meta.get("kind") != "ggml" or meta.get("schema") != GGML_SCHEMA_VERSION:
            raise ValueError("not a ggml result of a known schema")
        fields = {k: tensors.get(k) for k in ("dmin", "sc", "mins")}
        return cls(GRIDS[meta["ggml_type"]], tensors["codes"], tensors["d"], **fields, params=meta["params"])


def sub_grid(grid: GGMLGrid, d, dmin, sc, mins) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) per sub-block from a block's stored numbers: a = d·sc (d for legacy types),
    b = dmin·m (K-quants), −m (Q4_1, Q5_1) or 0."""
    per = grid.subs_per_block
    d32 = d.float().repeat_interleave(per, dim=1)
    a = d32 * sc.float() if grid.k_quant else d32
    if not grid.affine:
        b = torch.zeros_like(a)
    elif grid.k_quant:
        b = dmin.float().repeat_interleave(per, dim=1) * mins.float()
    else:
        b = -dmin.float()
    return a, b


def check_row_length(grid: GGMLGrid, n_cols: int) -> None:
    """Refuse a row length the type cannot store (llama.cpp picks a fallback type for it)."""
    if n_cols % grid.block:
        raise ValueError(
            f"{grid.name} stores rows in blocks of {grid.block} values; a row of {n_cols} is not a multiple "
            f"(llama.cpp uses a fallback type for such a tensor)"
        )


# ---- llama.cpp's searches, vectorised over rows and blocks (x, w [..., n]) -------------------


def fit_affine(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin=-0.9, rdelta=0.05, nstep=36):
    """make_qkx3_quants: scale s ≥ 0 and offset m ≥ 0 with x ≈ s·l − m, l ∈ [0, nmax], minimising
    Σ w (s·l − m − x)² over the codes of nstep+1 trial scales (nmax + rmin + rdelta·i)/(max − min),
    each followed by the weighted least-squares (s, m) for its codes (m clamped to ≥ 0)."""
    xmin = x.amin(-1).clamp(max=0)
    xmax = x.amax(-1)
    rng = xmax - xmin
    ok = rng > 0
    rng = torch.where(ok, rng, torch.ones_like(rng))
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)
    shifted = x - xmin.unsqueeze(-1)
    scale, lo = rng / nmax, xmin
    lv = (shifted * (nmax / rng).unsqueeze(-1)).round().clamp(0, nmax)
    best = (w * (scale.unsqueeze(-1) * lv + lo.unsqueeze(-1) - x).square()).sum(-1)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / rng
        lv = (shifted * iscale.unsqueeze(-1)).round().clamp(0, nmax)
        sl, sl2, sxl = (w * lv).sum(-1), (w * lv * lv).sum(-1), (w * lv * x).sum(-1)
        det = sum_w * sl2 - sl * sl
        det_safe = torch.where(det > 0, det, torch.ones_like(det))
        s = (sum_w * sxl - sum_x * sl) / det_safe
        m = (sl2 * sum_x - sl * sxl) / det_safe
        pos = m > 0
        s = torch.where(pos, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        err = (w * (s.unsqueeze(-1) * lv + m.unsqueeze(-1) - x).square()).sum(-1)
        better = (det > 0) & (err < best)
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        lo = torch.where(better, m, lo)
    return torch.where(ok, scale, torch.zeros_like(scale)), torch.where(ok, -lo, -xmin)


def fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants (rmse_type 1, importance w): signed s with x ≈ s·l, l ∈ [−nmax, nmax − 1],
    the largest |x| on −nmax's side; of the trial scales −(nmax + 0.1·i)/max, |i| ≤ steps, the
    one whose codes' least-squares s maximises (Σ w x l)² / Σ w l² (= the least Σ w (x − s l)²).
    Returns (s, l)."""
    idx = x.abs().argmax(-1, keepdim=True)
    top = x.gather(-1, idx).squeeze(-1)
    ok = top.abs() >= GROUP_MAX_EPS
    top = torch.where(ok, top, torch.ones_like(top))
    scale = torch.zeros_like(top)
    levels = torch.zeros_like(x)
    best = torch.full_like(top, -1.0)
    for i in range(-steps, steps + 1):
        iscale = -(nmax + 0.1 * i) / top
        lv = (x * iscale.unsqueeze(-1)).round().clamp(-nmax, nmax - 1)
        slx, sl2 = (w * x * lv).sum(-1), (w * lv * lv).sum(-1)
        s = slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2))
        better = (sl2 > 0) & (s * slx > best)
        best = torch.where(better, s * slx, best)
        scale = torch.where(better, s, scale)
        levels = torch.where(better.unsqueeze(-1), lv, levels)
    return torch.where(ok, scale, torch.zeros_like(scale)), levels


def fit_positive_levels(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: x ≥ 0 ≈ s·l, l ∈ [0, nmax]: the best of 9 trial scales (nmax + 0.1·i)/max
    by Σ w (x − s l)², then 5 sweeps of one-level moves that raise (Σ w x l)² / Σ w l²; returns
    (s, l) with s = Σ w x l / Σ w l² the least-squares scale of the final levels."""
    top = x.amax(-1)
    ok = top >= GROUP_MAX_EPS
    top = torch.where(ok, top, torch.ones_like(top))
    best_is = nmax / top
    best_mse = (w * (x - (x * best_is.unsqueeze(-1)).round().clamp(0, nmax) / best_is.unsqueeze(-1)).square()).sum(-1)
    for i in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale = (0.1 * i + nmax) / top
        lv = (x * iscale.unsqueeze(-1)).round().clamp(max=nmax)
        mse = (w * (x - lv / iscale.unsqueeze(-1)).square()).sum(-1)
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        best_is = torch.where(better, iscale, best_is)
    lv = (x * best_is.unsqueeze(-1)).round().clamp(0, nmax)
    slx, sl2 = (w * x * lv).sum(-1), (w * lv * lv).sum(-1)
    for _ in range(5):
        changed = torch.zeros_like(ok)
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i], x[..., i], lv[..., i]
            s1, s2 = slx - wi * xi * li, sl2 - wi * li * li
            valid = (s1 > 0) & (s2 > 0)
            new = (xi * s2 / torch.where(valid, s1, torch.ones_like(s1))).round().clamp(0, nmax)
            s1n, s2n = s1 + wi * xi * new, s2 + wi * new * new
            take = valid & (new != li) & (s1n * s1n * sl2 > slx * slx * s2n)
            lv[..., i] = torch.where(take, new, li)
            slx, sl2 = torch.where(take, s1n, slx), torch.where(take, s2n, sl2)
            changed |= take
        if not bool(changed.any()):
            break
    s = slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2))
    return torch.where(ok & (sl2 > 0), s, torch.zeros_like(s)), torch.where(ok.unsqueeze(-1), lv, torch.zeros_like(lv))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-65504.0, 65504.0).half()


def importance_weights(x: torch.Tensor, hdiag: torch.Tensor, sigma_factor: float = 2.0) -> torch.Tensor:
    """llama.cpp's per-value importance from an importance matrix: h_k · sqrt(σ² + x_k²),
    σ² = sigma_factor·mean(x²) over the block (x [..., block], h broadcast over it)."""
    sigma2 = sigma_factor * x.square().mean(-1, keepdim=True)
    return hdiag * (sigma2 + x.square()).sqrt()


def fit_blocks(grid: GGMLGrid, x: torch.Tensor, hdiag: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The stored numbers of blocks x [R, nb, block] under importance hdiag [nb, block] (diag H):
    d, dmin fp16 [R, nb]; sc, mins int16 [R, nb·subs]. Sub-block grids by llama.cpp's searches,
    then (K-quants) their scales and mins on the 4/6/8-bit sub-scale grid as llama.cpp does."""
    r, nb, _ = x.shape
    w = importance_weights(x, hdiag, grid.sigma_factor)
    out: dict[str, torch.Tensor | None] = {"dmin": None, "sc": None, "mins": None}
    if not grid.k_quant:
        if grid.affine:
            s, the_min = fit_affine(x, w, grid.qmax)
            out["d"], out["dmin"] = _fp16(s), _fp16(-the_min)
        else:
            out["d"] = _fp16(fit_symmetric(x, w, 2 ** (grid.bits - 1))[0])
        return out
    per = grid.subs_per_block
    xs, ws = x.reshape(r, nb, per, grid.sub), w.reshape(r, nb, per, grid.sub)
    sw = ws.sum(-1)
    smax = 2**grid.scale_bits - 1
    if grid.affine:  # Q2_K, Q4_K, Q5_K: unsigned sub-scales and sub-mins under d and dmin
        s, the_min = fit_affine(xs, ws, grid.qmax)
        dd, ls = fit_positive_levels(s, sw, smax)
        mm, lm = fit_positive_levels(the_min, sw, smax)
        out["d"], out["dmin"] = _fp16(dd), _fp16(mm)
        out["sc"], out["mins"] = ls.reshape(r, -1).to(torch.int16), lm.reshape(r, -1).to(torch.int16)
    elif grid.name == "Q3_K":  # signed 6-bit sub-scales: make_qx_quants(16, 32) over the scales
        s, _ = fit_symmetric(xs, ws, 2 ** (grid.bits - 1))
        dd, ls = fit_symmetric(s, sw, 2 ** (grid.scale_bits - 1))
        out["d"], out["sc"] = _fp16(dd), ls.reshape(r, -1).to(torch.int16)
    else:  # Q6_K: int8 sub-scales, the largest |scale| on −128 (llama.cpp weighs by h alone here)
        s, _ = fit_symmetric(xs, hdiag.reshape(1, nb, per, grid.sub).expand_as(xs), 2 ** (grid.bits - 1))
        idx = s.abs().argmax(-1, keepdim=True)
        top = s.gather(-1, idx).squeeze(-1)
        ok = top.abs() >= GROUP_MAX_EPS
        iscale = -128.0 / torch.where(ok, top, torch.ones_like(top))
        out["d"] = _fp16(torch.where(ok, 1.0 / iscale, torch.zeros_like(top)))
        sc = (s * iscale.unsqueeze(-1)).round().clamp(-128, 127)
        out["sc"] = torch.where(ok.unsqueeze(-1), sc, torch.zeros_like(sc)).reshape(r, -1).to(torch.int16)
    return out


def _codes_on(grid: GGMLGrid, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Nearest codes of w on the grid ŵ = a·(q − z) − b (any code where a = 0: ŵ = −b there)."""
    a_safe = torch.where(a == 0, torch.ones_like(a), a)
    return ((w + b) / a_safe).round_().add_(grid.zero).clamp_(0, grid.qmax)


def rtn_ggml(weight: torch.Tensor, grid_name: str, importance: torch.Tensor | None = None) -> GGMLQuantized:
    """Round to nearest on the grid fitted to W itself (importance [K], e.g. diag H; None: 1):
    what llama-quantize does with (or without) an importance matrix, in strata's searches."""
    grid = GRIDS[grid_name]
    n, k = weight.shape
    check_row_length(grid, k)
    w = weight.float()
    h = torch.ones(k) if importance is None else importance.float()
    nb = k // grid.block
    f = fit_blocks(grid, w.reshape(n, nb, grid.block), h.reshape(nb, grid.block))
    a, b = sub_grid(grid, f["d"], f["dmin"], f["sc"], f["mins"])
    sub = grid.sub
    codes = _codes_on(grid, w.view(n, k // sub, sub), a.unsqueeze(2), b.unsqueeze(2)).view(n, k)
    return GGMLQuantized(grid, codes.to(torch.uint8), f["d"], f["dmin"], f["sc"], f["mins"], {"method": "rtn"})


_SUB_BATCH = 32  # columns per rank-1 sub-batch; a legacy block is one sub-batch
_BATCH = 256  # columns per lazy batch; a K-quant super-block is one batch


def gptq_ggml(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid_name: str,
    *,
    damp: float = 0.01,
    static_grids: bool = False,
    diag_shrink: float = 0.0,
    refine_passes: int = 0,
) -> GGMLQuantized:
    """GPTQ of W [N, K] with H [K, K] on a ggml type's grid (see the module docstring): each
    block's grid fitted (:func:`fit_blocks`, importance diag H) when the column loop reaches it,
    from the compensated weights (``static_grids``: from W itself), then every column rounded
    on it from w̃_j and its error fed forward through F. Dead inputs (diag H = 0) get weight 0.
    ``diag_shrink`` α: the feedback from H_α = (1 − α)·H + α·diag(H) (gptq.shrink_to_diagonal),
    the grids' importance diag H unchanged; α = 1 is importance-weighted rounding on the grid.
    ``refine_passes``: that many passes of :func:`refine_codes` over the codes afterwards, on the
    damped H_α the feedback was factored from (the grids kept)."""
    grid = GRIDS[grid_name]
    n, k = weight.shape
    check_row_length(grid, k)
    if diag_shrink:
        hessian = shrink_to_diagonal(hessian, diag_shrink)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as gptq_quantize: one thread keeps the factor's bits the same everywhere
    params = {"method": "gptq", "damp": damp, "damp_used": damp, "dead_inputs": 0, "static_grids": static_grids}
    if diag_shrink:  # only when set: the results of α = 0 keep the params they had
        params["diag_shrink"] = diag_shrink
    try:
        with torch.inference_mode():
            out, params["damp_used"], params["dead_inputs"] = _solve_ggml(weight, hessian, grid, damp, static_grids)
            result = GGMLQuantized(grid, out["codes"], out["d"], out["dmin"], out["sc"], out["mins"], params)
            if refine_passes:
                result = refine_ggml(weight, hessian, result, refine_passes)
    finally:
        torch.set_num_threads(threads)
    # out of inference mode: the caller may use the tensors anywhere
    fields = {key: (v.clone() if v is not None else None) for key, v in result._fields().items()}
    return GGMLQuantized(grid, **fields, params=result.params)


def refine_ggml(weight: torch.Tensor, hessian: torch.Tensor, q: GGMLQuantized, passes: int) -> GGMLQuantized:
    """``q`` (:func:`gptq_ggml`'s result of W with H, H already shrunk where the solve shrank it) with its codes
    refined by :func:`refine_codes` on the damped H the feedback was factored from, H + λ·mean(diag H)·I with the
    solve's λ (``damp_used``), dead inputs (diag H = 0) at weight 0 as in the solve; the grids kept."""
    damped = hessian.float().clone()
    damped.diagonal().add_(q.params["damp_used"] * float(torch.diag(hessian).double().mean()))
    w = weight.float().clone()
    w[:, torch.diag(hessian) == 0] = 0.0
    codes, moved = refine_codes(w, damped, q, passes)
    params = q.params | {"refine_passes": passes, "refine_moves": moved}
    return GGMLQuantized(q.grid, codes, q.d, q.dmin, q.sc, q.mins, params)


def refine_codes(
    weight: torch.Tensor, hessian: torch.Tensor, q: GGMLQuantized, passes: int, block: int = 64
) -> tuple[torch.Tensor, int]:
    """Coordinate descent on ``q``'s codes for the objective GPTQ minimises, every grid (a, b) kept:

        L(Ŵ) = Σ_r e_r H e_rᵀ,     e_r = w_r − ŵ_r,     ŵ_rj = a_rj·(q_rj − z) − b_rj.

    Moving one code by δ = ±1 moves ŵ_rj by a_rj·δ and changes row r's term by

        ΔL_r = −2·δ·a_rj·g_rj + a_rj²·H_jj,     g = E H,

    so column j in turn takes δ = sign(a_rj·g_rj) in every row where ΔL_r < 0 and the code stays
    in [0, 2^bits − 1]; g is kept current (rank one inside a block of ``block`` columns, one GEMM
    for the rest after the block, computed afresh each pass). Every move lowers L, so L never rises
    above GPTQ's; GPTQ fixes each code once, from the columns before it, and a pass lets a code
    answer the columns after it too (the descent QuantEase, Behdin et al. 2023, runs on uniform
    grids). Returns the codes (uint8 [N, K]) and how many moves were made; the new ŵ is computed
    as :meth:`GGMLQuantized.dequantize` rounds it, so the result stays bit-exact."""
    grid = q.grid
    n, k = q.codes.shape
    a, b = q.sub_grids()
    a, b = a.repeat_interleave(grid.sub, 1), b.repeat_interleave(grid.sub, 1)
    w = weight.float()
    codes = q.codes.float()
    h = hessian.float()
    hdiag = torch.diag(h)
    err = w - (a * (codes - grid.zero) - b)
    moved = 0
    for _ in range(passes):
        g = err @ h
        for c1 in range(0, k, block):
            c2 = min(c1 + block, k)
            delta = torch.zeros(n, c2 - c1)
            for j in range(c1, c2):
                step = torch.sign(a[:, j] * g[:, j])
                new = codes[:, j] + step
                gain = 2 * (a[:, j] * g[:, j]).abs() - a[:, j].square() * hdiag[j]
                ok = (step != 0) & (gain > 0) & (new >= 0) & (new <= grid.qmax)
                if not bool(ok.any()):
                    continue
                moved += int(ok.sum())
                codes[:, j] = torch.where(ok, new, codes[:, j])
                e = w[:, j] - (a[:, j] * (codes[:, j] - grid.zero) - b[:, j])
                delta[:, j - c1] = e - err[:, j]
                err[:, j] = e
                g[:, c1:c2].addr_(delta[:, j - c1], h[j, c1:c2])
            if c1 > 0:
                g[:, :c1].addmm_(delta, h[c1:c2, :c1])
            if c2 < k:
                g[:, c2:].addmm_(delta, h[c1:c2, c2:])
    return codes.to(torch.uint8), moved


def _solve_ggml(weight, hessian, grid: GGMLGrid, damp: float, static_grids: bool):
    """The column loop of :func:`gptq_ggml`: (stored numbers, λ, dead inputs)."""
    from strata_quant.workers.gptq import _reversed_hessian

    n, k = weight.shape
    dev = weight.device
    hdiag = torch.diag(hessian).to(torch.float32)
    dead = hdiag == 0
    rev = torch.arange(k, device=dev).flip(0)

    def reversed_hessian() -> torch.Tensor:
        return _reversed_hessian(hessian, rev, dead)

    feedback, lam = damped_cholesky_feedback(reversed_hessian(), damp, reversed_order=True, rebuild=reversed_hessian)
    w = weight.float().clone()
    w[:, dead] = 0.0
    w0t = w.t().contiguous()
    del w
    wt = w0t.clone()
    resid_t = torch.zeros_like(w0t)
    codes_t = torch.zeros_like(w0t)
    nb, nsub = k // grid.block, k // grid.sub
    out = {"d": torch.zeros(n, nb, dtype=torch.float16, device=dev), "dmin": None, "sc": None, "mins": None}
    if grid.affine:
        out["dmin"] = torch.zeros(n, nb, dtype=torch.float16, device=dev)
    if grid.k_quant:
        out["sc"] = torch.zeros(n, nsub, dtype=torch.int16, device=dev)
        out["mins"] = torch.zeros(n, nsub, dtype=torch.int16, device=dev) if grid.affine else None
    a_t = torch.zeros(nsub, n, device=dev)
    b_t = torch.zeros(nsub, n, device=dev)
    for i1 in range(0, k, _BATCH):
        i2 = min(i1 + _BATCH, k)
        for j1 in range(i1, i2, _SUB_BATCH):
            j2 = min(j1 + _SUB_BATCH, i2)
            if j1 % grid.block == 0:  # the block starting here gets its grid
                end = j1 + grid.block
                cur = w0t[j1:end] if static_grids else _compensated(wt, w0t, resid_t, feedback, j1, end, i1, i2, j1, j1)
                fit = fit_blocks(grid, cur.t().reshape(n, 1, grid.block), hdiag[j1:end].view(1, grid.block))
                bi, s0, s1 = j1 // grid.block, j1 // grid.sub, end // grid.sub
                for key in ("d", "dmin"):
                    if out[key] is not None:
                        out[key][:, bi] = fit[key][:, 0]
                for key in ("sc", "mins"):
                    if out[key] is not None:
                        out[key][:, s0:s1] = fit[key]
                a, b = sub_grid(grid, fit["d"], fit["dmin"], fit["sc"], fit["mins"])
                a_t[s0:s1], b_t[s0:s1] = a.t(), b.t()
            for j in range(j1, j2):
                a, b = a_t[j // grid.sub], b_t[j // grid.sub]
                q = _codes_on(grid, wt[j], a, b)
                codes_t[j] = q
                # ŵ = a·(q − z) − b exactly as dequantize rounds it; the residual is w0 − ŵ
                torch.sub(w0t[j], a * (q - grid.zero) - b, out=resid_t[j])
                if j + 1 < j2:
                    wt[j + 1 : j2].addr_(feedback[j, j + 1 : j2], resid_t[j])
            if j2 < i2:
                wt[j2:i2].addmm_(feedback[j1:j2, j2:i2].t(), resid_t[j1:j2])
        if i2 < k:
            wt[i2:].addmm_(feedback[i1:i2, i2:].t(), resid_t[i1:i2])
    out["codes"] = codes_t.t().to(torch.uint8)
    return out, lam, int(dead.sum())
