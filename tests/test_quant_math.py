"""The quantization math: grids, RTN, GPTQ, and the GPTQ bit layout of FORMATS.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strata_quant.pipeline.formats import gptq as gptq_format
from strata_quant.workers.gptq import gptq_quantize, relative_output_error
from strata_quant.workers.grids import group_params, group_slices, minmax_params
from strata_quant.workers.result import QuantizedLinear, QuantSpec
from strata_quant.workers.rtn import rtn_quantize


def fp16_at_least(x: float) -> float:
    h = torch.tensor(x, dtype=torch.float16)
    return float(h) if float(h) >= x else float(torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.float16)))


def test_symmetric_params_hand_example():
    # max 1.4 → 1.4/7 = 0.2; min −1.2 → 1.2/8 = 0.15; the larger wins and nothing clips
    w = torch.tensor([[1.4, -1.2, 0.3, 0.0]])
    scale, zero = minmax_params(w, QuantSpec(4, 4, True))
    assert zero.item() == 8
    assert scale.item() == fp16_at_least(1.4 / 7)  # stored in fp16, rounded up so nothing clips
    # negative extreme dominates: −1.6/8 = 0.2 lands exactly on code 0
    scale, _ = minmax_params(torch.tensor([[0.7, -1.6]]), QuantSpec(4, 2, True))
    assert scale.item() == fp16_at_least(1.6 / 8)


def test_asymmetric_params_hand_example():
    w = torch.tensor([[0.0, 1.5, 3.0]])  # range [0, 3] over 15 steps → s = 0.2, z = 0
    scale, zero = minmax_params(w, QuantSpec(4, 3, False))
    assert scale.item() == fp16_at_least(3.0 / 15)
    assert zero.item() == 0
    w = torch.tensor([[-1.0, 2.0]])  # s = 3/15 = 0.2, z = round(1/0.2) = 5
    scale, zero = minmax_params(w, QuantSpec(4, 2, False))
    assert zero.item() == 5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_round_trip_error_bounded_by_half_step(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(16, 96)
    spec = QuantSpec(bits, 64, sym)  # 96 = 64 + a partial group of 32
    r = rtn_quantize(w, spec)
    assert r.codes.max() <= spec.maxq
    assert r.scales.dtype == torch.float16 and r.scales.shape == (16, 2)
    assert r.g_idx.tolist() == [0] * 64 + [1] * 32
    step = r.scales.float()[:, r.g_idx.long()]
    err = (r.dequantize() - w).abs()
    assert (err <= step / 2 + 1e-6).all()
    # codes are exactly the rounding of w on the stored grid
    again = torch.clamp(torch.round(w / step) + r.zeros.float()[:, r.g_idx.long()], 0, spec.maxq)
    assert torch.equal(again.to(torch.uint8), r.codes)


def test_partial_last_group_gets_its_own_scale():
    w = torch.ones(2, 80)
    w[:, 64:] = 100.0  # the partial group (16 columns) is on a different scale
    r = rtn_quantize(w, QuantSpec(4, 64, True))
    assert r.scales.shape == (2, 2)
    assert torch.allclose(r.dequantize(), w, rtol=1e-3)


def test_zero_and_constant_groups_are_finite():
    w = torch.zeros(4, 64)
    w[1] = 3.0
    for spec in (QuantSpec(4, 32, True), QuantSpec(4, 32, False)):
        r = rtn_quantize(w, spec)
        assert torch.isfinite(r.dequantize()).all()
        step = r.scales.float()[:, r.g_idx.long()]
        assert ((r.dequantize() - w).abs() <= step / 2).all()


def test_mse_grid_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(64, 64) * torch.rand(64, 1) + torch.randn(64, 64).pow(3) * 0.1  # heavy tails
    spec = QuantSpec(4, 64, True)
    s0, z0 = group_params(w, spec)
    s1, z1 = group_params(w, spec, mse_grid=100)

    def err(s, z):
        q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, spec.maxq)
        return (s[:, None] * (q - z[:, None]) - w).abs().pow(2.4).sum(1)

    assert (err(s1, z1) <= err(s0, z0) + 1e-6).all()
    assert err(s1, z1).sum() < err(s0, z0).sum()


def _problem(n=48, k=128, samples=2048, seed=0):
    torch.manual_seed(seed)
    # correlated inputs with uneven channel scales, as real activations have
    mix = torch.randn(k, k) / k**0.5 + torch.eye(k)
    x = torch.randn(samples, k) @ mix * torch.linspace(0.2, 3.0, k)
    w = torch.randn(n, k) * 0.05
    h = 2 * x.t() @ x / samples
    return w, h, x


@pytest.mark.parametrize("act_order,static", [(False, True), (True, True), (True, False)])
def test_gptq_beats_rtn_on_output_error(act_order, static):
    w, h, _ = _problem()
    spec = QuantSpec(4, 32, True)
    rtn = rtn_quantize(w, spec)
    q = gptq_quantize(w, h, spec, act_order=act_order, static_groups=static)
    e_rtn = relative_output_error(w, rtn.dequantize(), h)
    e_gptq = relative_output_error(w, q.dequantize(), h)
    assert e_gptq < 0.8 * e_rtn
    assert q.codes.max() <= 15 and q.scales.dtype == torch.float16
    if act_order and not static:
        assert q.perm is not None and sorted(q.g_idx.tolist()) == sorted((torch.arange(128) // 32).tolist())
    else:
        assert q.g_idx.tolist() == (torch.arange(128) // 32).tolist()


def test_gptq_stacked_rows_equal_separate_solves():
    w, h, _ = _problem(n=32)
    spec = QuantSpec(4, 64, True)
    both = gptq_quantize(w, h, spec)
    top = gptq_quantize(w[:16], h, spec)
    assert torch.equal(both.rows(0, 16).codes, top.codes)
    assert torch.equal(both.rows(0, 16).scales, top.scales)


def test_gptq_dead_inputs_and_damping():
    w, h, _ = _problem()
    h[5, :] = 0
    h[:, 5] = 0
    q = gptq_quantize(w, h, QuantSpec(4, 32, True))
    assert q.dequantize()[:, 5].abs().max() == 0
    assert q.params["dead_inputs"] == 1
    # a rank-deficient Hessian (fewer samples than inputs) still factors with damping
    x = torch.randn(16, 128)
    q = gptq_quantize(w, 2 * x.t() @ x / 16, QuantSpec(4, 32, True))
    assert torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("case", ["zeros", "constant_column", "outlier_channel", "fp16_overflow"])
def test_gptq_no_nan_on_hostile_inputs(case):
    w, h, x = _problem()
    if case == "zeros":
        h = torch.zeros_like(h)
    elif case == "constant_column":
        x[:, 3] = 7.0
        h = 2 * x.t() @ x / x.shape[0]
    elif case == "outlier_channel":
        x[:, 10] *= 100.0
        h = 2 * x.t() @ x / x.shape[0]
    else:
        w = w.clone()
        w[0, 0] = 1e6  # beyond fp16: the scale saturates at 65504, never inf
    q = gptq_quantize(w, h, QuantSpec(4, 32, True))
    assert torch.isfinite(q.scales.float()).all() and torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_pack_layout_matches_formats_md(bits):
    torch.manual_seed(bits)
    spec = QuantSpec(bits, 32, True)
    r = rtn_quantize(torch.randn(64, 96), spec)
    t = gptq_format.pack_linear(r, "m")
    assert t["m.qweight"].dtype == torch.int32 and t["m.qweight"].shape == (96 * bits // 32, 64)
    assert t["m.qzeros"].shape == (3, 64 * bits // 32)
    assert t["m.scales"].shape == (3, 64) and t["m.g_idx"].shape == (96,)
    if 32 % bits == 0:  # FORMATS.md's rule, applied literally
        pf, mask = 32 // bits, (1 << bits) - 1
        qw = t["m.qweight"].numpy().view(np.uint32)
        for k in (0, 1, pf - 1, pf, 95):
            code = (qw[k // pf] >> (bits * (k % pf))) & mask
            assert (code == r.codes[:, k].numpy()).all()
        qz = t["m.qzeros"].numpy().view(np.uint32)
        for n in (0, pf - 1, 63):
            z = (qz[:, n // pf] >> (bits * (n % pf))) & mask
            assert (z + 1 == 2 ** (bits - 1)).all()  # v1 stores z − 1
    decoded = gptq_format.unpack_linear(t, "m", bits, "gptq")
    assert torch.equal(decoded, r.dequantize())


def test_gptq_v1_symmetric_4bit_zero_words():
    r = rtn_quantize(torch.randn(8, 32), QuantSpec(4, 32, True))
    qz = gptq_format.pack_linear(r, "m")["m.qzeros"].numpy().view(np.uint32)
    assert (qz == 0x77777777).all()


def test_gptq_v2_asymmetric_zero_of_zero_round_trips():
    w = torch.rand(8, 64)  # all positive → zero point 0 in every group
    r = rtn_quantize(w, QuantSpec(4, 32, False))
    assert (r.zeros == 0).any()
    assert gptq_format.checkpoint_format(r.spec) == "gptq_v2"
    t = gptq_format.pack_linear(r, "m")
    assert torch.equal(gptq_format.unpack_linear(t, "m", 4, "gptq_v2"), r.dequantize())


def test_result_bytes_round_trip():
    from strata_quant.workers.records import result_from_bytes, result_to_bytes

    w, h, _ = _problem()
    q = gptq_quantize(w, h, QuantSpec(4, 32, True), act_order=True, static_groups=False)
    back = result_from_bytes(result_to_bytes(q))
    assert isinstance(back, QuantizedLinear)
    assert torch.equal(back.dequantize(), q.dequantize()) and back.params == q.params
    assert torch.equal(back.perm, q.perm)


def test_group_slices():
    assert group_slices(576, QuantSpec(4, 64)) == [(i, i + 64) for i in range(0, 576, 64)]
    assert group_slices(100, QuantSpec(4, 64)) == [(0, 64), (64, 100)]
    assert group_slices(100, QuantSpec(4, -1)) == [(0, 100)]


def test_fp64_statistics_are_added_a_slice_at_a_time(monkeypatch):
    """The fp32 Gram of a batch is cast into the fp64 sum in slices (no whole fp64 copy): the
    sum is the one of casting the whole Gram, for slices that do not divide the rows."""
    import strata_quant.workers.stats as stats

    monkeypatch.setattr(stats, "_CAST_CHUNK", 7 * 50)  # 7 rows of 50 a slice
    acc = stats.HessianAccumulator(50)
    want = torch.zeros(50, 50, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 33, 50, generator=gen) * 10
        rows = x.reshape(-1, 50)
        want += (rows.t() @ rows).double()
        acc.add(x)
    assert torch.equal(acc.sum, want) and acc.count == 3 * 132


@pytest.mark.parametrize(
    "rows, cols, group_size, bits, shuffled",
    [
        (33, 576, 64, 4, False),
        (17, 130, 32, 3, False),
        (9, 65, 64, 2, False),
        (12, 96, -1, 8, False),
        (20, 576, 64, 4, True),
    ],
)
def test_dequantize_matches_the_per_column_gather(rows, cols, group_size, bits, shuffled):
    """The broadcast path for consecutive groups (a partial last group included) and the gather
    path for act-order g_idx both give scales[n, g_idx[k]] · (codes − zeros[n, g_idx[k]]) bit for bit."""
    gen = torch.Generator().manual_seed(rows * cols)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=False)
    n_groups = spec.num_groups(cols)
    g_idx = torch.arange(cols) // spec.group_len(cols)
    if shuffled:
        g_idx = g_idx[torch.randperm(cols, generator=gen)]
    result = QuantizedLinear(
        spec,
        torch.randint(0, 2**bits, (rows, cols), dtype=torch.uint8, generator=gen),
        (torch.rand(rows, n_groups, generator=gen) * 0.1).half(),
        torch.randint(0, 2**bits, (rows, n_groups), dtype=torch.uint8, generator=gen),
        g_idx.int(),
    )
    expected = result.scales.float()[:, g_idx] * (result.codes.float() - result.zeros.float()[:, g_idx])
    got = result.dequantize()
    assert got.shape == (rows, cols) and got.is_contiguous()
    assert torch.equal(got, expected)
    assert torch.equal(result.dequantize(torch.float16), expected.half())
