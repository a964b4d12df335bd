"""Assembly memory is bounded by the largest tensor, not by the model.

Two random Llamas that differ only in depth (4 and 16 blocks, 512 wide, SmolLM2's 49152-token
vocabulary, so the largest tensor is the 48 MiB fp16 embedding) get an RTN W4 g128 run record
each; each GPTQ folder is assembled in a fresh interpreter that reports its peak RSS (VmHWM,
reset just before assembling) and its sampled peak RssAnon over the baseline after imports and
the records. Before the fix the embedding alone cost ~6x its size (a whole-tensor NaN/Inf
check, then a ``bytes`` copy of it), which these bounds reject.
"""

from __future__ import annotations

import pytest

from benchmarks.assemble_memory import largest_tensor_bytes, make_model, measure_assembly, write_rtn_run

MIB = 2**20


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.checkpoint import CheckpointReader

    out = {}
    for layers in (4, 16):
        model = make_model(
            fixtures.cache_dir() / "models" / f"synthetic-512x{layers}-asm",
            hidden=512,
            intermediate=1536,
            layers=layers,
            heads=8,
            kv_heads=4,
        )
        store = tmp_path_factory.mktemp(f"store{layers}")
        write_rtn_run(model, store, "rtn")
        out[layers] = (model, store, largest_tensor_bytes(CheckpointReader(model))[1])
    return out


def test_gptq_assembly_memory_is_one_tensor_and_does_not_grow_with_depth(runs, tmp_path):
    growth = {}
    for layers, (model, store, largest) in runs.items():
        m = measure_assembly("gptq", model, store, "rtn", tmp_path / f"gptq{layers}")
        assert (tmp_path / f"gptq{layers}" / "model.safetensors").is_file()
        assert m["hwm_reset"], "VmHWM could not be reset; the peak would include start-up"
        rss, anon = m["peak_rss"] - m["baseline_rss"], m["peak_anon"] - m["baseline_anon"]
        growth[layers] = rss
        # the tensor being written is in memory once, plus small change (chunks, one packed linear)
        assert rss < 1.5 * largest + 24 * MIB, (
            f"{layers} blocks: peak RSS +{rss / MIB:.0f} MiB, largest {largest / MIB:.0f} MiB"
        )
        assert anon < 1.5 * largest + 24 * MIB, f"{layers} blocks: peak RssAnon +{anon / MIB:.0f} MiB"
    # 4x the blocks (3.1x the bytes) does not move the peak
    assert growth[16] - growth[4] < 12 * MIB, {k: v / MIB for k, v in growth.items()}


def test_chunked_finite_check_finds_bad_values_in_any_chunk(monkeypatch):
    import torch

    from strata_quant.pipeline import assemble, checkpoint
    from strata_quant.pipeline.checkpoint import CheckpointError

    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 1000)
    t = torch.randn(70, 50).half()  # 3500 values: 4 chunks, the last partial
    assemble.check_finite("w", t, "shard 'x'")
    for index, value in ((0, float("nan")), (1999, float("inf")), (3499, float("-inf"))):
        bad = t.clone().reshape(-1)
        bad[index] = value
        with pytest.raises(CheckpointError, match=r"tensor 'w' \(shard 'x'\) holds 1 NaN/Inf value\(s\) of 3500"):
            assemble.check_finite("w", bad.reshape(70, 50), "shard 'x'")
    assemble.check_finite("codes", torch.zeros(10, dtype=torch.uint8), "-")  # integers are not checked


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float8_e5m2", "float8_e4m3fn"])
def test_finite_screen_counts_exactly_and_survives_overflowing_sums(monkeypatch, dtype):
    """The per-chunk sum screen never hides a bad value (Inf and −Inf in one chunk sum to NaN)
    and never reports a clean chunk whose finite values overflow the accumulator."""
    import torch

    from strata_quant.pipeline import checkpoint

    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 1000)
    t = torch.randn(3500).to(getattr(torch, dtype))
    assert checkpoint.nonfinite_count(t) == 0
    bad = t.clone()
    values = [float("inf"), float("-inf"), float("nan"), float("inf")]
    if dtype == "float8_e4m3fn":  # no Inf in this format (a cast saturates to 448): NaN only
        values = [float("nan")] * 4
    bad[[3, 10, 1500, 3499]] = torch.tensor(values).to(t.dtype)
    assert checkpoint.nonfinite_count(bad) == 4
    huge = torch.full((3500,), torch.finfo(t.dtype).max, dtype=t.dtype)  # bf16: the fp32 sum overflows
    assert checkpoint.nonfinite_count(huge) == 0


def test_row_chunked_dequantize_equals_the_whole():
    import torch

    from strata_quant.pipeline.assemble import dequantize_half
    from strata_quant.workers.result import QuantSpec
    from strata_quant.workers.rtn import rtn_quantize

    result = rtn_quantize(torch.randn(37, 64), QuantSpec(bits=3, group_size=16, sym=False))
    # 3 rows per chunk of a [37, 64] weight: 13 chunks, the last of one row
    assert torch.equal(dequantize_half(result, chunk=3 * 64), result.dequantize().half())
