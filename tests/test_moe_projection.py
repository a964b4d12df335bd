"""benchmarks/moe_projection.py: the projection reproduces the H200 figures it is anchored on, and its memory
terms are the run's own statistics sizes."""

from __future__ import annotations

import json

import pytest

from benchmarks.moe_projection import MODELS, RESULTS, anchors, block_params, moe_block, solve_s
from strata_quant.workers.moe import expert_statistics_bytes


def test_the_solve_model_returns_its_anchors():
    a = anchors()
    cases = {c["case"]: c for c in json.loads((RESULTS / "gpu-solve-h200.json").read_text())["cases"]}
    for name in ("70B gate+up 1/8 share, W4 g128 asym", "K=2048 W8 per-channel"):
        c = cases[name]
        assert solve_s(c["k"], c["rows"], a) == pytest.approx(c["graphs_s"], rel=1e-9), name
    assert solve_s(8192, 7168, a) > solve_s(7168, 4096, a) > solve_s(2048, 7168, a)


def test_block_sizes_and_statistics_follow_the_models():
    v3 = MODELS["DeepSeek-V3 671B"]
    total = v3["moe_blocks"] * block_params(v3, True) + v3["dense_blocks"] * block_params(v3, False)
    assert 660e9 < total + v3["embeddings"] < 680e9  # DeepSeek-V3's 671B
    qwen = MODELS["Qwen3-235B-A22B"]
    assert 230e9 < qwen["moe_blocks"] * block_params(qwen, True) + qwen["embeddings"] < 240e9
    blk = moe_block(qwen, anchors(), {"memory_per_fp32_byte": 1.0, "stored_bytes_per_weight": 1.0}, 65536, 32)
    assert blk["stats_budget_gib"] * 2**30 == 32 * expert_statistics_bytes(4096, 1536)
