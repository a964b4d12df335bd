"""GPTQ: round one input column at a time and push the error onto the columns not yet rounded.

Minimises ‖W X − Ŵ X‖² over the codes, with H = 2·XᵀX / n the Hessian of that loss
in each row of W. With U the upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹,
column j is rounded to q_j and the rest of the row is corrected by

    e_j = (w_j − ŵ_j) / U[j, j],      W[:, j:] −= e_j · U[j, j:],

applied lazily in blocks of ``block_size`` columns (Frantar et al., 2022). Rows are
independent given H, so linears that share an input (q/k/v, gate/up) can be stacked
and solved as one matrix with the same result.

The solver computes the same ŵ_j without U: with R = U⁻¹ (H_λ = R Rᵀ, R upper, one
Cholesky of the reversed H and no inverse), W − Ŵ = E·U gives E = (W − Ŵ)·R, so
column j is rounded from w̃_j = w_j + Σ_{i<j} (w_i − ŵ_i)·R[i, j] / R[j, j] (see
:func:`gptq_quantize`). When a group's parameters come from the error-compensated
weights, those are the optimal ones given the columns already rounded,
W_{≥t} + D_{<t} R_{<t,≥t} R_{≥t,≥t}⁻¹ — exactly what the U form holds at that point.

Options: act-order (columns in decreasing diag(H)), with static groups (group
parameters from the original weights, g_idx = k // G) or without (groups along the
processing order, g_idx non-monotone); group scales from min/max or an MSE shrink
search; a partial last group when K % G ≠ 0. Dead inputs (diag(H) = 0) get weight 0.
When the Cholesky fails, the damping λ is multiplied by 10 and retried.

``diag_shrink`` α (:func:`shrink_to_diagonal`) solves with H_α = (1 − α)·H + α·diag(H): the
off-diagonal correlations of the calibration inputs, which the error feedback exploits and
which carry the calibration text's style, count (1 − α); the per-channel importance stays.

``mse_weight`` "hessian": the MSE scale search minimises Σ_k H[k, k]·|ŵ_k − w_k|^p per row and
group instead of the unweighted sum (the importance-weighted search of llama.cpp's imatrix),
from the original weights with static groups, from the compensated ones otherwise. Note that
``diag_shrink`` changes H's off-diagonal only, so it does not change these weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from strata_quant.workers.grids import group_params, group_slices
from strata_quant.workers.result import QuantizedLinear, QuantSpec


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


def shrink_to_diagonal(hessian: torch.Tensor, alpha: float) -> torch.Tensor:
    """H_α = (1 − α)·H + α·diag(H), a new tensor: the off-diagonal entries scaled by (1 − α), the
    diagonal unchanged. α = 0 is GPTQ's H; α = 1 leaves only the per-input importance (no error
    feedback between columns: importance-weighted rounding). Positive definite whenever H is."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"diag_shrink must lie in [0, 1], got {alpha}")
    out = hessian * (1.0 - alpha)
    out.diagonal().copy_(hessian.diagonal())
    return out


def output_error_terms(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per output row r: [(E H Eᵀ)_rr, (W H Wᵀ)_rr] with E = W − Ŵ, in fp32 ([N, 2]); their
    column sums over any set of rows are the two traces of :func:`relative_output_error`."""
    h = hessian.float()
    w = weight.float()
    err = w - approx.float()
    return torch.stack([((err @ h) * err).sum(1), ((w @ h) * w).sum(1)], dim=1)


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ): the relative error of the layer's output on X."""
    num, den = output_error_terms(weight, approx, hessian).sum(0)
    return float(num / den.clamp(min=1e-30))


def damped_cholesky_feedback(
    hessian: torch.Tensor,
    damp: float,
    max_tries: int = 6,
    *,
    reversed_order: bool = False,
    rebuild: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """Upper unit-diagonal F with F[i, j] = R[i, j] / R[j, j], where R is the upper factor of
    H + λ·mean(diag H)·I = R Rᵀ; returns F (float32) and the λ used.

    With J the exchange matrix and L Lᵀ = J H J, R = J L J: one Cholesky, no inverse. R is
    the inverse of :func:`damped_inverse_cholesky`'s U (UᵀU = H⁻¹ ⇔ H = U⁻¹U⁻ᵀ), which is
    what lets :func:`gptq_quantize` skip the triangular inverse. Float32 first, float64 when
    that fails, λ × 10 when both fail. ``reversed_order``: ``hessian`` is given as J H J
    already (saves a copy when the caller permutes H anyway); in float32 it is then damped in
    place and its diagonal restored exactly afterwards (one K² copy less: 3.3 GB at K = 28672).

    ``rebuild`` (with ``reversed_order``): ``hessian`` is the caller's to spend, and
    ``rebuild()`` makes J H J afresh. The first factorisation of that dtype then runs in the
    matrix's own storage: once its upper triangle is mirrored from the lower one (a Gram matrix
    from a small GEMM is not always symmetric bit for bit), its row-major bytes are the
    column-major matrix LAPACK factorises in place, reading the triangle the copied path reads,
    and the factor comes out in the same layout as a copied one, bit for bit on any CPU, without
    a second K² matrix. A retry starts from ``rebuild()``.
    """
    mean_diag = torch.diag(hessian).to(torch.float64).mean().clamp(min=1e-12).item()
    lam = damp
    for _ in range(max_tries):
        for dtype in (torch.float32, torch.float64):
            if hessian is None:  # spent by a failed factorisation in place
                hessian = rebuild()
            in_place = reversed_order and hessian.dtype == dtype
            if in_place and rebuild is not None and hessian.is_contiguous():
                # LAPACK reads the view's lower triangle, which is the matrix's upper one; a Gram
                # matrix from a small GEMM need not be symmetric bit for bit, so mirror the lower
                # triangle (what the copied path reads) over it first
                _mirror_lower_in_place(hessian)
                hessian.diagonal().add_(lam * mean_diag)
                chol = hessian.t()  # the column-major view of the same symmetric matrix
                info = torch.empty((), dtype=torch.int32, device=chol.device)
                torch.linalg.cholesky_ex(chol, out=(chol, info))
                hessian = None
            else:
                if in_place:
                    h, diagonal = hessian, hessian.diagonal().clone()
                else:
                    h = hessian.to(dtype, copy=True) if reversed_order else torch.flip(hessian.to(dtype), (0, 1))
                h.diagonal().add_(lam * mean_diag)
                chol, info = torch.linalg.cholesky_ex(h)
                if in_place:
                    h.diagonal().copy_(diagonal)
                del h
            if int(info) != 0:
                continue
            # F = J (L / diag(L) column-wise) J
            chol.div_(torch.diag(chol).clone())
            feedback = _flip_both_in_place(chol).to(torch.float32)
            del chol
            # NaN propagates; read through the contiguous view (LAPACK's factor is column-major),
            # which a reduction does not copy first
            lo, hi = torch.aminmax(feedback.t() if feedback.t().is_contiguous() else feedback)
            if bool(torch.isfinite(lo) & torch.isfinite(hi)):
                return feedback, lam
        lam *= 10.0
    raise ValueError(f"Hessian is not positive definite even with damping {lam / 10:g}")


def _mirror_lower_in_place(matrix: torch.Tensor, band: int = 512) -> torch.Tensor:
    """M[i, j] ← M[j, i] for i < j: the upper triangle replaced by the lower one's
    transpose, in M's own storage, a band of rows at a time (a band × K copy at most). Makes a
    row-major M the same matrix read from either triangle."""
    k = matrix.shape[0]
    for r0 in range(0, k, band):
        r1 = min(r0 + band, k)
        if r1 < k:
            matrix[r0:r1, r1:] = matrix[r1:, r0:r1].t()
        square = matrix[r0:r1, r0:r1]
        square.copy_(square.tril() + square.tril(-1).t())
    return matrix


def _flip_both_in_place(matrix: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """J M J (both axes reversed) in M's own storage: for a dense row- or column-major matrix
    that is the reversed flat array, swapped a chunk from each end at a time. torch.flip would allocate a
    second K² matrix (3.3 GB at K = 28672) while the Cholesky factor is still held."""
    if matrix.is_contiguous():
        flat = matrix.view(-1)
    elif matrix.t().is_contiguous():  # LAPACK's column-major factor: reversing storage is the same
        flat = matrix.t().view(-1)
    else:
        return torch.flip(matrix, (0, 1))
    n = flat.numel()
    for i in range(0, n // 2, chunk):
        c = min(chunk, n // 2 - i)
        head = flat[i : i + c].flip(0)
        flat[i : i + c] = flat[n - i - c : n - i].flip(0)
        flat[n - i - c : n - i] = head
    return matrix


_SUB_BATCH = 32  # columns per rank-1 sub-batch inside a lazy batch
# cuda_graphs=None means this for a CUDA weight (benchmarks turn it off to compare)
CUDA_GRAPHS_DEFAULT = True
_CPU_WORKING_BYTES = 2 << 30  # bound on the solver's four K × rows working matrices on a CPU


def _compensated(wt, w0t, resid_t, feedback, t, end, i1, i2, j1, j2) -> torch.Tensor:
    """Rows [t, end) of the optimally compensated weights once columns < t are rounded:
    W_{≥t} + D_{<t} H_{<t,≥t} H_{≥t,≥t}⁻¹ = W_{≥t} + D_{<t} R_{<t,≥t} R_{≥t,≥t}⁻¹ (H = R Rᵀ),
    which is what the U form holds in its working copy at that moment.

    ``wt`` holds w_j + Σ_{i<t} d_i F[i, j] for rows that have seen every column < t; rows at
    or past the current sub-batch end ``j2`` (batch end ``i2``) still lack the columns from
    ``j1`` (``i1``) on, which are added to a copy here. Then, with F_t = F[t:end, t:end]
    unit upper triangular, the compensated rows are W0 + F_tᵀ⁻¹ (that − W0).
    """
    x = wt[t:end].clone()
    a, b = max(j2, t), min(i2, end)
    if a < b and j1 < t:
        x[a - t : b - t].addmm_(feedback[j1:t, a:b].t(), resid_t[j1:t])
    c = max(i2, t)
    if c < end and i1 < t:
        x[c - t :].addmm_(feedback[i1:t, c:end].t(), resid_t[i1:t])
    x -= w0t[t:end]
    delta = torch.linalg.solve_triangular(feedback[t:end, t:end].t(), x, upper=False, unitriangular=True)
    return delta.add_(w0t[t:end])


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
    max_rows: int | None = None,
    cuda_graphs: bool | None = None,
    diag_shrink: float = 0.0,
    mse_weight: str = "uniform",
) -> QuantizedLinear:
    """Quantize W [N, K] with the Hessian H [K, K] of its input; see the module docstring.

    The error feedback is applied in the equivalent form that needs only the Cholesky factor
    R of H (no inverse): from W − Ŵ = E·U (E the matrix of the e_j) follows E = (W − Ŵ)·R,
    so the weight that column j is rounded from is

        w̃_j = w_j + Σ_{i<j} (w_i − ŵ_i) · F[i, j],      F[i, j] = R[i, j] / R[j, j],

    with w_i the original weights: the same w̃_j, ŵ_j as the U form in exact arithmetic,
    one O(K³/3) factorisation instead of three. Within a lazy batch of ``block_size``
    columns the feedback runs in sub-batches of 32 columns (rank-1 updates inside a
    sub-batch, one matrix product per sub-batch for the rest of the batch, one per batch
    for the columns after it). Per column the work is four in-place torch calls: x/s,
    round, clamp to the code range shifted by −z, and d = w − s·q.

    ``max_rows``: solve at most that many rows at a time (one factorisation for all): the
    working memory is about 4·K·max_rows floats instead of 4·K·N, the result the same. None:
    on a CPU, as many rows as keep that under 2 GiB (gate+up at Llama-70B width: 4 chunks);
    on a GPU all at once (there the per-column calls, not the memory, set the cost).

    ``cuda_graphs`` (None: on for a CUDA weight): each full 32-column sub-batch whose grids
    are known when it starts runs as one replay of a captured CUDA graph of its per-column
    calls, over copies of its rows, instead of ~190 kernel launches; the same kernels on the
    same values, so the same result (checked on an H100/H200 by benchmarks/gpu_solve.py).
    """
    if cuda_graphs and weight.device.type != "cuda":
        raise ValueError("cuda_graphs needs the weight on a CUDA device")
    if max_rows is None and weight.device.type == "cpu":
        max_rows = max(64, _CPU_WORKING_BYTES // (16 * weight.shape[1]))
    if mse_weight not in ("uniform", "hessian"):
        raise ValueError(f"mse_weight must be uniform or hessian, got {mse_weight!r}")
    if diag_shrink:
        hessian = shrink_to_diagonal(hessian, diag_shrink)
    # One intra-op thread: LAPACK's Cholesky rounds differently with 1 and 2 threads (K ≥ 352),
    # which flipped a few codes between a 1-worker run (2 threads) and a 2-worker run (1 each);
    # the per-column ops are too small to gain from threads anyway.
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():  # no autograd bookkeeping on the many small views below
            codes, scales, zeros, g_idx, perm, lam, dead = _solve(
                weight, hessian, spec, damp, block_size, act_order, static_groups, mse_grid, max_rows,
                (weight.device.type == "cuda" and CUDA_GRAPHS_DEFAULT) if cuda_graphs is None else cuda_graphs,
                mse_weight,
            )  # fmt: skip
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
    # plain tensors out (clones made outside inference mode)
    codes, scales, zeros, g_idx, perm = (t.clone() for t in (codes, scales, zeros, g_idx, perm))
    result = QuantizedLinear(
        spec=spec,
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        method="gptq",
        perm=perm if act_order else None,
        params={
            "damp": damp,
            "damp_used": lam,
            "block_size": block_size,
            "act_order": act_order,
            "static_groups": static_groups,
            "mse_grid": mse_grid,
            "diag_shrink": diag_shrink,
            "mse_weight": mse_weight,
            "dead_inputs": dead,
        },
    )
    return result


def _reversed_hessian(hessian: torch.Tensor, rev: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """J Pᵀ H P J in float32, dead inputs' diagonal set to 1: gathered a band of rows at a time
    into one new matrix (the permutation and the cast are exact in either order; whole-matrix
    gathers were two more K² temporaries beside the caller's Hessian)."""
    k = hessian.shape[0]
    out = torch.empty(k, k, dtype=torch.float32, device=hessian.device)
    step = max(1, (1 << 22) // k)
    for r0 in range(0, k, step):
        band = hessian.index_select(0, rev[r0 : r0 + step]).to(torch.float32)
        out[r0 : r0 + step] = band.index_select(1, rev)
    out.diagonal()[dead[rev]] = 1.0
    return out


def _solve(
    weight,
    hessian,
    spec,
    damp,
    block_size,
    act_order,
    static_groups,
    mse_grid,
    max_rows,
    graphs=False,
    mse_weight="uniform",
):
    """The body of :func:`gptq_quantize`: (codes, fp16 scales, uint8 zeros, g_idx, perm, λ, dead)."""
    n_rows, n_cols = weight.shape
    dev = weight.device
    diag_h = torch.diag(hessian).to(torch.float32)
    dead = diag_h == 0

    group_len = spec.group_len(n_cols)
    col_group = torch.arange(n_cols, device=dev) // group_len
    if act_order:
        perm = torch.argsort(diag_h, descending=True, stable=True)
        # groups follow the processing order, or (static) the original column order
        pos_group = col_group[perm] if static_groups else col_group
    else:
        perm = torch.arange(n_cols, device=dev)
        pos_group = col_group
    # J Pᵀ H P J (processing order, reversed); dead inputs get H[k, k] = 1
    rev = perm.flip(0)

    # factorised in its own storage: one K² matrix beside the caller's H
    def reversed_hessian() -> torch.Tensor:
        return _reversed_hessian(hessian, rev, dead)

    feedback, lam = damped_cholesky_feedback(reversed_hessian(), damp, reversed_order=True, rebuild=reversed_hessian)

    n_groups = len(group_slices(n_cols, spec))
    codes = torch.empty(n_rows, n_cols, dtype=torch.uint8, device=dev)
    scales = torch.zeros(n_rows, n_groups, dtype=torch.float32, device=dev)
    zeros = torch.zeros(n_rows, n_groups, dtype=torch.float32, device=dev)
    # rows are independent given H: chunks of rows share the one factorisation and bound the
    # working copies (four K × rows fp32 matrices) without changing a bit of the result
    step = n_rows if max_rows is None else max(1, max_rows)
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        codes_t, scales[r0:r1], zeros[r0:r1] = _solve_rows(
            weight[r0:r1],
            feedback,
            dead,
            perm if act_order else None,
            pos_group,
            spec,
            block_size,
            act_order and static_groups,
            mse_grid,
            graphs,
            diag_h if mse_weight == "hessian" else None,
        )
        codes[r0:r1, perm] = codes_t.t().to(torch.uint8)
        del codes_t
    g_idx = torch.empty(n_cols, dtype=torch.int32, device=dev)
    g_idx[perm] = pos_group.to(torch.int32)
    return codes, scales.half(), zeros.to(torch.uint8), g_idx, perm.to(torch.int64), lam, int(dead.sum())


def _round_column(w, w0, later, f_later, s, lo, hi, q, d) -> None:
    """One column of a sub-batch, given as rows of Wᵀ: q = clamp(round(w̃/s), lo, hi),
    d = w0 − s·q, and d's rank-1 feedback into the sub-batch's later columns
    (``later`` += ``f_later`` ⊗ d; both None for the last column). The column loop and its
    CUDA graph (:class:`_SubBatchGraph`) both run this, so they launch the same kernels on
    the same values."""
    torch.div(w, s, out=q).round_().clamp_(lo, hi)
    torch.addcmul(w0, q, s, value=-1.0, out=d)
    if later is not None:
        later.addr_(f_later, d)


class _SubBatchGraph:
    """The per-column calls of one full sub-batch (the column loop of :func:`_solve_rows`),
    captured once as a CUDA graph over static buffers: per sub-batch, its rows of Wᵀ (with
    feedback so far) and W0ᵀ, its block of F, and each column's grid are copied in, the graph
    replayed, and codes, residuals and the updated rows copied out. The kernels are the
    column loop's, on the same values; F keeps its column-major layout. On a CPU device
    (tests of the staging) the body runs directly, with nothing captured."""

    def __init__(self, sub: int, n_rows: int, dev: torch.device, sym_bounds: tuple[float, float] | None, maxq: float):
        def buf(*shape):
            return torch.zeros(*shape, dtype=torch.float32, device=dev)

        self.sub, self.maxq, self.sym_bounds = sub, maxq, sym_bounds
        self.wt, self.w0t, self.q, self.d = buf(sub, n_rows), buf(sub, n_rows), buf(sub, n_rows), buf(sub, n_rows)
        self.f = buf(sub, sub).t()  # column-major, as the factor
        self.s = torch.ones(sub, n_rows, dtype=torch.float32, device=dev)
        self.lo, self.hi = buf(sub, n_rows), buf(sub, n_rows)
        self.graph = None
        if dev.type != "cuda":
            return
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the capture, as CUDA graphs ask
            self._body()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()

    def _body(self) -> None:
        for k in range(self.sub):
            lo, hi = self.sym_bounds if self.sym_bounds is not None else (self.lo[k], self.hi[k])
            last = k + 1 == self.sub
            later, f_later = (None, None) if last else (self.wt[k + 1 :], self.f[k, k + 1 :])
            _round_column(self.wt[k], self.w0t[k], later, f_later, self.s[k], lo, hi, self.q[k], self.d[k])

    def run(self, wt, w0t, f_sub, scales, zeros, groups, codes_t, resid_t, j1: int, j2: int) -> None:
        self.wt.copy_(wt[j1:j2])
        self.w0t.copy_(w0t[j1:j2])
        self.f.copy_(f_sub)
        self.s.copy_(scales.index_select(1, groups).t())
        if self.sym_bounds is None:
            torch.neg(zeros.index_select(1, groups).t(), out=self.lo)
            torch.add(self.lo, self.maxq, out=self.hi)  # maxq − z: a − b is a + (−b), bit for bit
        if self.graph is None:
            self._body()
        else:
            self.graph.replay()
        codes_t[j1:j2].copy_(self.q)
        resid_t[j1:j2].copy_(self.d)
        wt[j1:j2].copy_(self.wt)


def _solve_rows(
    weight, feedback, dead, perm, pos_group, spec, block_size, static_params, mse_grid, graphs=False, col_weight=None
):
    """One chunk of rows through the column loop: (codes ᵀ [K, rows] in processing order as
    fp32, scales [rows, nG], zeros [rows, nG]). ``perm`` None: the original column order.
    ``col_weight`` [K] (original order): the scale search's per-input weights (None: uniform)."""
    n_rows, n_cols = weight.shape
    dev = weight.device
    n_groups = len(group_slices(n_cols, spec))
    group_len = spec.group_len(n_cols)
    scales = torch.zeros(n_rows, n_groups, dtype=torch.float32, device=dev)
    zeros = torch.zeros(n_rows, n_groups, dtype=torch.float32, device=dev)
    ready = [False] * n_groups
    w = weight.float().clone()
    w[:, dead] = 0.0
    # W0ᵀ in processing order: each column a contiguous row
    w0t = (w if perm is None else w[:, perm]).t().contiguous()
    if static_params:
        for g, (start, end) in enumerate(group_slices(n_cols, spec)):
            c = None if col_weight is None else col_weight[start:end]
            scales[:, g], zeros[:, g] = group_params(w[:, start:end], spec, mse_grid=mse_grid, col_weight=c)
            ready[g] = True
    del w  # W0ᵀ (processing order) is the copy kept from here on
    wt = w0t.clone()  # accumulates the feedback: row j ends as w̃_j
    # codes minus zero point while solving (q − z ∈ [−z, maxq − z]); z is added at the end
    codes_t = torch.empty(n_cols, n_rows, dtype=torch.float32, device=dev)
    resid_t = torch.empty(n_cols, n_rows, dtype=torch.float32, device=dev)  # w − ŵ
    pos_group_list = pos_group.tolist()
    weight_p = None if col_weight is None else (col_weight if perm is None else col_weight[perm])
    maxq = float(spec.maxq)
    sym_zero = float(spec.sym_zero) if spec.sym else None
    sub = _SUB_BATCH
    replay = None
    if graphs and n_cols >= 4 * sub:
        replay = _SubBatchGraph(sub, n_rows, dev, (-sym_zero, maxq - sym_zero) if sym_zero is not None else None, maxq)

    def grid_at(g: int, pos: int, i1: int, i2: int, j1: int, j2: int) -> None:
        """Group g's grid at its first column along the processing order, from the
        error-compensated weights of its columns (the last group may be partial)."""
        end = min((g + 1) * group_len, n_cols)
        current = _compensated(wt, w0t, resid_t, feedback, pos, end, i1, i2, j1, j2)
        c = None if weight_p is None else weight_p[pos:end]
        scales[:, g], zeros[:, g] = group_params(current.t(), spec, mse_grid=mse_grid, col_weight=c)
        ready[g] = True

    g_cur, s, lo, hi = -1, None, None, None
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        for j1 in range(i1, i2, sub):
            j2 = min(j1 + sub, i2)
            f_sub = feedback[j1:j2, j1:j2]
            first = pos_group_list[j1]
            # a full sub-batch whose grids are all known once column j1's is: one graph replay
            if replay is not None and j2 - j1 == sub and all(ready[g] or g == first for g in pos_group_list[j1:j2]):
                if not ready[first]:
                    grid_at(first, j1, i1, i2, j1, j2)
                replay.run(wt, w0t, f_sub, scales, zeros, pos_group[j1:j2], codes_t, resid_t, j1, j2)
                g_cur = -1  # the column loop's cached grid is stale
            else:
                # the sub-batch's rows as views made once (per-column indexing cost more than the
                # column's own arithmetic at SmolLM2's width)
                w_sub = wt[j1:j2]
                w_rows, w0_rows, f_rows = w_sub.unbind(0), w0t[j1:j2].unbind(0), f_sub.unbind(0)
                q_rows, d_rows = codes_t[j1:j2].unbind(0), resid_t[j1:j2].unbind(0)
                last = j2 - j1 - 1
                for k in range(j2 - j1):
                    pos = j1 + k
                    g = pos_group_list[pos]
                    if g != g_cur or not ready[g]:
                        if not ready[g]:
                            grid_at(g, pos, i1, i2, j1, j2)
                        g_cur, s = g, scales[:, g]
                        if sym_zero is not None:
                            lo, hi = -sym_zero, maxq - sym_zero
                        else:
                            lo, hi = zeros[:, g].neg(), maxq - zeros[:, g]
                    later, f_later = (None, None) if k == last else (w_sub[k + 1 :], f_rows[k][k + 1 :])
                    _round_column(w_rows[k], w0_rows[k], later, f_later, s, lo, hi, q_rows[k], d_rows[k])
            if j2 < i2:
                wt[j2:i2].addmm_(feedback[j1:j2, j2:i2].t(), resid_t[j1:j2])
        if i2 < n_cols:
            wt[i2:].addmm_(feedback[i1:i2, i2:].t(), resid_t[i1:i2])
    codes_t += zeros[:, pos_group].t()
    return codes_t, scales, zeros
