"""strata_quant.workers.gptq's solver against the textbook GPTQ update (Frantar et al., 2022).

The solver applies the error feedback through F = R / diag(R) (H = R Rᵀ, one Cholesky, no
inverse), in lazy batches and sub-batches; the reference below is the plain algorithm in
float64: U = chol((H + λ·mean(diag H)·I)⁻¹) upper, every column rounded from the fully
updated weights and its error pushed onto *all* the columns after it at once, group
parameters taken from the fully updated weights when a group starts. Both must agree up
to float rounding: the same codes almost everywhere and the same output error.
"""

from __future__ import annotations

import pytest
import torch

from strata_quant.workers.gptq import (
    damped_cholesky_feedback,
    damped_inverse_cholesky,
    gptq_quantize,
    relative_output_error,
)
from strata_quant.workers.grids import group_params, group_slices
from strata_quant.workers.result import QuantSpec


def _problem(n=48, k=160, samples=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(samples, k, generator=g) @ mix * torch.linspace(0.2, 3.0, k)
    w = torch.randn(n, k, generator=g) * 0.05
    return w, 2 * x.t() @ x / samples


def reference_gptq(w, h, spec, *, damp=0.01, act_order=False, static_groups=True):
    """Dequantized Ŵ and codes [N, K] (original column order) by the unbatched textbook update."""
    n, k = w.shape
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k)
    glen = spec.group_len(k)
    col_group = torch.arange(k) // glen
    pos_group = col_group if (act_order and not static_groups) else col_group[perm]
    params = {}
    if act_order and static_groups:
        for g, (a, b) in enumerate(group_slices(k, spec)):
            params[g] = group_params(w[:, a:b].float(), spec)
    hp = h[perm][:, perm]
    hp = hp + torch.eye(k, dtype=hp.dtype) * damp * torch.diag(hp).mean()
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    wp = w[:, perm].clone()
    codes = torch.zeros(n, k, dtype=torch.float64)
    deq = torch.zeros(n, k, dtype=torch.float64)
    for j in range(k):
        g = int(pos_group[j])
        if g not in params:
            end = min((g + 1) * glen, k)
            params[g] = group_params(wp[:, j:end].float(), spec)
        s, z = (t.double() for t in params[g])
        q = torch.clamp(torch.round(wp[:, j] / s) + z, 0, spec.maxq)
        codes[:, j], deq[:, j] = q, s * (q - z)
        e = (wp[:, j] - deq[:, j]) / u[j, j]
        wp[:, j:] -= e.unsqueeze(1) * u[j, j:].unsqueeze(0)
    out_codes, out_deq = torch.empty_like(codes), torch.empty_like(deq)
    out_codes[:, perm], out_deq[:, perm] = codes, deq
    return out_deq.float(), out_codes.to(torch.uint8)


@pytest.mark.parametrize(
    "bits,group,sym,act_order,static,block",
    [
        (4, 32, True, False, True, 128),  # plain: groups start along the way
        (4, 32, True, True, False, 128),  # act-order, groups in processing order
        (4, 32, True, True, True, 128),  # act-order, static groups
        (3, 64, False, False, True, 128),  # asymmetric 3-bit, partial last group (160 = 64 + 64 + 32)
        (4, 48, True, True, False, 64),  # groups straddle lazy-batch and sub-batch edges
    ],
)
def test_solver_matches_textbook_gptq(bits, group, sym, act_order, static, block):
    w, h = _problem()
    spec = QuantSpec(bits, group, sym)
    ref_deq, ref_codes = reference_gptq(w, h, spec, act_order=act_order, static_groups=static)
    q = gptq_quantize(w, h, spec, act_order=act_order, static_groups=static, block_size=block)
    deq = q.dequantize()
    agree = (q.codes == ref_codes).float().mean().item()
    e_ref, e = relative_output_error(w, ref_deq, h), relative_output_error(w, deq, h)
    assert agree >= 0.995, f"codes agree on {agree:.4f}"
    assert abs(e - e_ref) <= 2e-3 * e_ref, (e, e_ref)


def test_feedback_factor_is_the_inverse_of_the_inverse_cholesky():
    _, h = _problem(k=96)
    f, lam = damped_cholesky_feedback(h, 0.01)
    u, lam_u = damped_inverse_cholesky(h, 0.01)
    assert lam == lam_u == 0.01
    assert torch.equal(torch.diag(f), torch.ones(96)) and torch.equal(f, f.triu())
    r = torch.linalg.inv(u.double())  # R = U⁻¹, F = R / diag(R) column-wise
    assert torch.allclose(f.double(), r / torch.diag(r), atol=1e-4)


def test_feedback_factor_retries_with_more_damping():
    h = -torch.eye(8)  # not positive definite at any small damping
    with pytest.raises(ValueError, match="not positive definite"):
        damped_cholesky_feedback(h, 0.01, max_tries=2)
    # indefinite only by a little: λ × 10 steps until it factors
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05]))
    _, lam = damped_cholesky_feedback(h, 0.01)
    assert lam > 0.01


def test_inputs_untouched_and_outputs_are_plain_tensors():
    w, h = _problem()
    w0, h0 = w.clone(), h.clone()
    q = gptq_quantize(w, h, QuantSpec(4, 32, True), act_order=True, static_groups=False)
    assert torch.equal(w, w0) and torch.equal(h, h0)
    for t in (q.codes, q.scales, q.zeros, q.g_idx, q.perm):
        assert not t.is_inference()  # usable with autograd later (the solve runs in inference mode)
    # the returned codes reproduce the returned weights on the stored grid
    g = q.g_idx.long()
    again = q.scales.float()[:, g] * (q.codes.float() - q.zeros.float()[:, g])
    assert torch.equal(again, q.dequantize())


def test_results_do_not_depend_on_the_torch_thread_count():
    """A 1-worker run uses 2 threads and a 2-worker run 1 each: the solve must not care."""
    torch.manual_seed(3)
    x = torch.randn(2048, 576)
    hessian = x.T @ x / 2048
    weight = torch.randn(96, 576)
    before = torch.get_num_threads()
    codes = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            result = gptq_quantize(weight, hessian, QuantSpec(4, 64, True), act_order=True, static_groups=False)
            codes.append(result.codes)
            assert torch.get_num_threads() == threads  # restored after the solve
    finally:
        torch.set_num_threads(before)
    assert torch.equal(codes[0], codes[1])


@pytest.mark.parametrize(
    "act_order,static,sym,mse", [(False, True, True, 0), (True, True, False, 10), (True, False, True, 0)]
)
def test_row_chunks_give_the_same_bytes(act_order, static, sym, mse):
    """``max_rows`` (the CPU's memory bound on the working copies) solves chunks of rows with one
    factorisation: rows are independent given H, so every chunking gives the whole solve's
    codes, scales and zeros, uneven last chunks included. (One-row chunks are not: a single
    right-hand side takes another triangular-solve kernel, one fp16 ulp off in a scale.)"""
    w, h = _problem(n=100, k=160)
    h[7, :] = h[:, 7] = 0.0  # a dead input, zeroed in every chunk
    spec = QuantSpec(3, 64, sym)
    whole = gptq_quantize(w, h, spec, act_order=act_order, static_groups=static, mse_grid=mse, max_rows=100)
    for rows in (2, 33, 64):
        part = gptq_quantize(w, h, spec, act_order=act_order, static_groups=static, mse_grid=mse, max_rows=rows)
        for a, b in zip(whole.to_tensors()[0].values(), part.to_tensors()[0].values()):
            assert torch.equal(a, b)
        assert part.params["damp_used"] == whole.params["damp_used"]


def test_cpu_solves_are_chunked_by_the_working_memory_bound(monkeypatch):
    """By default a CPU solve bounds its working copies: with a tiny bound the solve runs in
    several chunks and still gives the unchunked bytes."""
    import strata_quant.workers.gptq as gptq

    w, h = _problem(n=96, k=160)
    spec = QuantSpec(4, 32, True)
    whole = gptq_quantize(w, h, spec, act_order=True, max_rows=96)
    seen = []
    real = gptq._solve_rows
    monkeypatch.setattr(gptq, "_CPU_WORKING_BYTES", 16 * 160 * 40)  # 64 rows (the floor) a chunk
    monkeypatch.setattr(gptq, "_solve_rows", lambda weight, *a: seen.append(weight.shape[0]) or real(weight, *a))
    chunked = gptq_quantize(w, h, spec, act_order=True)
    assert seen == [64, 32]
    assert torch.equal(chunked.codes, whole.codes) and torch.equal(chunked.scales, whole.scales)


@pytest.mark.parametrize("k", [1, 2, 5, 64, 97])
def test_in_place_flip_is_torch_flip(k):
    from strata_quant.workers.gptq import _flip_both_in_place

    for m in (torch.randn(k, k), torch.randn(k, k).t()):  # row- and column-major (LAPACK's)
        want = torch.flip(m, (0, 1))
        got = _flip_both_in_place(m, chunk=7)  # chunks that do not divide the halves
        assert got.data_ptr() == m.data_ptr() and torch.equal(got, want)


@pytest.mark.parametrize("k", [7, 96, 300])
def test_feedback_factorised_in_place_is_the_copied_one_bit_for_bit(k):
    _, h = _problem(k=k)
    reversed_h = torch.flip(h, (0, 1)).contiguous()
    want, lam = damped_cholesky_feedback(reversed_h, 0.01, reversed_order=True)
    spent = reversed_h.clone()
    got, lam_in_place = damped_cholesky_feedback(
        spent, 0.01, reversed_order=True, rebuild=lambda: pytest.fail("no retry needed")
    )
    assert lam == lam_in_place == 0.01
    assert got.data_ptr() == spent.data_ptr()  # no second K² matrix
    assert got.stride() == want.stride()  # the layout of a copied factor, too
    assert torch.equal(got, want)


@pytest.mark.parametrize("k, band", [(7, 512), (300, 64), (130, 13)])
def test_in_place_factorisation_reads_the_copied_paths_triangle(k, band):
    # a Gram matrix from a small GEMM can differ from its transpose in the last bit (MKL on
    # AVX-512 does at K = 7): the in-place factor must still be the copied one's
    from strata_quant.workers.gptq import _mirror_lower_in_place

    _, h = _problem(k=k)
    reversed_h = torch.flip(h, (0, 1)).contiguous()
    upper = torch.triu_indices(k, k, 1)
    reversed_h[upper[0], upper[1]] *= 1 + 2**-20  # upper triangle off by a few ulps
    assert not torch.equal(reversed_h, reversed_h.t())
    want, _ = damped_cholesky_feedback(reversed_h, 0.01, reversed_order=True)
    got, _ = damped_cholesky_feedback(reversed_h.clone(), 0.01, reversed_order=True, rebuild=lambda: None)
    assert torch.equal(got, want)
    m = torch.randn(k, k)
    mirrored = _mirror_lower_in_place(m.clone(), band=band)
    assert torch.equal(mirrored, m.tril() + m.tril(-1).t())


def test_in_place_factorisation_falls_back_to_the_retrying_path():
    from strata_quant.workers.gptq import _reversed_hessian

    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05]))  # indefinite by a little
    want, lam = damped_cholesky_feedback(h, 0.01, reversed_order=True)
    rebuilt = []
    got, lam_in_place = damped_cholesky_feedback(
        h.clone(), 0.01, reversed_order=True, rebuild=lambda: rebuilt.append(1) or h.clone()
    )
    assert lam == lam_in_place > 0.01 and rebuilt  # rebuilt and retried with more damping
    assert torch.equal(got, want)
    w = torch.randn(6, 4)
    q = gptq_quantize(w, h, QuantSpec(4, 4, True))
    assert q.params["damp_used"] > 0.01
    assert torch.isfinite(q.dequantize()).all()
    # the banded gather is the whole-matrix gather
    big = torch.randn(50, 50, dtype=torch.float64)
    rev = torch.randperm(50)
    dead = torch.zeros(50, dtype=torch.bool)
    dead[3] = True
    want = big.to(torch.float32).index_select(0, rev).index_select(1, rev)
    want.diagonal()[dead[rev]] = 1.0
    assert torch.equal(_reversed_hessian(big, rev, dead), want)


@pytest.mark.parametrize(
    "k, rows, fields, act_order, static_groups, mse",
    [
        (576, 96, {"bits": 4, "group_size": 64, "sym": False}, False, True, 0),
        (1000, 40, {"bits": 4, "group_size": 64, "sym": False}, True, False, 0),  # partial group, K % 32 = 8
        (512, 33, {"bits": 4, "group_size": 128}, True, True, 0),  # act-order, static groups
        (384, 24, {"bits": 3, "group_size": 32, "sym": False}, False, True, 8),
        (480, 16, {"bits": 4, "group_size": 48, "sym": False}, False, True, 0),  # groups across sub-batches
        (256, 8, {"bits": 8, "group_size": -1}, False, True, 0),
    ],
)
def test_sub_batch_staging_gives_the_column_loop_bytes(k, rows, fields, act_order, static_groups, mse, monkeypatch):
    """The CUDA-graph path stages each full sub-batch through static buffers (a graph on a GPU;
    on a CPU the same staging runs its body directly): the same bytes as the column loop."""
    from strata_quant.workers import gptq

    torch.manual_seed(k + rows)
    x = torch.randn(2 * k, k)
    x[:, 3] = 0.0  # a dead input
    h = (x.t() @ x).double() * (2.0 / x.shape[0])
    w = torch.randn(rows, k) * 0.02
    spec = QuantSpec(**fields)
    staged = []
    run = gptq._SubBatchGraph.run
    monkeypatch.setattr(gptq._SubBatchGraph, "run", lambda self, *a: staged.append(a[-2]) or run(self, *a))
    out = [gptq._solve(w, h, spec, 0.01, 128, act_order, static_groups, mse, None, graphs) for graphs in (False, True)]
    for a, b in zip(*out, strict=True):
        assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)
    full = k // 32  # full sub-batches (blocks of 128 hold four)
    # every full sub-batch is staged, but those a group starts inside (g48: the column loop)
    starts_inside = {
        g * spec.group_len(k) // 32 for g in range(k) if (g * spec.group_len(k)) % 32 and g * spec.group_len(k) < k
    }
    assert len(staged) == full - (0 if act_order and static_groups else len(starts_inside)) > 0
    with pytest.raises(ValueError, match="cuda_graphs needs the weight on a CUDA device"):
        gptq.gptq_quantize(w, h, spec, cuda_graphs=True)
