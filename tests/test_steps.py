"""The block executor's plan of steps (workers/steps.py), the stage passes' layout found by the
traced structure (Phi-3's fused qkv / gate_up as well as Llama's names), and the rows AWQ leaves
unclipped found from the trace (the rows that feed Q·Kᵀ). Real tiny family blocks, in-process."""

from __future__ import annotations

import pytest
import torch

from strata_quant.pipeline.fixtures import TINY_FAMILIES
from strata_quant.workers.block import StageLayout, StagePasses, run_block, stage_layout, trace_block
from strata_quant.workers.steps import (
    CacheStages,
    CollectStats,
    Distribute,
    FoldScales,
    Gather,
    Probe,
    Propagate,
    Reduce,
    Restore,
    Solve,
    plan_block,
)
from tests.test_families import _block_and_inputs

LAYOUT = StageLayout("self_attn", "self_attn.o_proj", 1, "mlp", "mlp.gate_proj", "mlp.down_proj")
PLAN = dict(
    probe=False,
    awq=False,
    cache_stages=None,
    have_sums=False,
    reductions_issued=False,
    to_owner=False,
    propagate_quantized=True,
    sequential=True,
    propagate=True,
)


def test_the_modes_are_which_steps_the_plan_holds():
    stages = [[["a", "b"]], [["c"]]]
    assert plan_block(stages, "gptq", **{**PLAN, "cache_stages": LAYOUT}) == [
        CacheStages(LAYOUT),
        *[CollectStats(0, ("a",)), Reduce(0), Solve(0), Gather(0, False), Distribute(0, True, True)],
        *[CollectStats(1, ("c",)), Reduce(1), Solve(1), Gather(1, False), Distribute(1, True, True)],
        Restore(),
        Propagate(True),
    ]
    # one float stage whose sums and reductions came with the block (deferred), solves queued
    one = [[["a", "b"], ["c"]]]
    deferred = {**PLAN, "have_sums": True, "reductions_issued": True, "to_owner": True}
    deferred.update(propagate_quantized=False, sequential=False, propagate=False)
    assert plan_block(one, "gptq", **deferred) == [Solve(0), Gather(0, True), Distribute(0, False, False), Restore()]
    # AWQ folds first, the probe before it; RTN forms no sums
    steps = plan_block(one, "rtn", **{**PLAN, "probe": True, "awq": True})
    assert steps[:2] == [Probe(), FoldScales()] and not any(isinstance(s, (CollectStats, Reduce)) for s in steps)
    # the last true-sequential stage of propagate float distributes nothing
    last = plan_block(stages, "gptq", **{**PLAN, "propagate_quantized": False, "propagate": False})
    assert [s for s in last if isinstance(s, Distribute)] == [Distribute(0, True, True), Distribute(1, False, True)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_stage_layout_follows_the_traced_structure(family):
    layer, x, kwargs = _block_and_inputs(family)
    trace = trace_block(layer, x, kwargs)
    stages = [[list(g)] for g in trace.groups]
    layout = stage_layout(trace, stages)
    if family == "phi3":
        assert layout == StageLayout("self_attn", "self_attn.o_proj", 1, "mlp", "mlp.gate_up_proj", "mlp.down_proj")
    else:
        assert layout == LAYOUT
    assert stage_layout(trace, [[list(g) for g in trace.groups]]) is None  # one stage (true_sequential off)
    assert stage_layout(trace, stages[:3]) is None
    assert stage_layout(trace, [stages[1], stages[0], *stages[2:]]) is None  # another order: another shape


@pytest.mark.parametrize("family", ["phi3", "gemma3"])
def test_stage_passes_give_the_full_pass_statistics_and_output(family):
    """Each stage's sums from the cached passes equal a full pass's, with every earlier stage's
    weights changed in between (as quantization does), and so does the final forward."""
    from strata_quant.workers.stats import collect_hessians

    layer, x, kwargs = _block_and_inputs(family)
    batches = [(x, kwargs), (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), kwargs)]
    trace = trace_block(layer, x, kwargs)
    stages = [[list(g)] for g in trace.groups]
    passes = StagePasses(layer, len(batches), stage_layout(trace, stages))
    gen = torch.Generator().manual_seed(0)
    for (names,) in stages:
        full = collect_hessians(layer, batches, [names[0]], torch.float64, stop_early=True)
        cached = collect_hessians(layer, batches, [names[0]], torch.float64, True, passes)
        assert torch.equal(full[names[0]].sum, cached[names[0]].sum), names
        with torch.no_grad():  # the stage "quantized": its weights change before the next stage
            for n in names:
                w = layer.get_submodule(n).weight
                w.add_(0.05 * w.abs().mean() * torch.randn(w.shape, generator=gen))
    passes.close()
    for i, (hidden, kw) in enumerate(batches):
        assert torch.equal(passes.forward(i, hidden, kw), run_block(layer, hidden, kw))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_rows_feeding_the_attention_scores_come_from_the_trace(family):
    """Llama-like blocks: all of q_proj and k_proj. Phi-3's fused qkv_proj: its q rows (4 heads
    × 32) and k rows (2 × 32), not its v rows; nothing after the attention."""
    layer, x, kwargs = _block_and_inputs(family)
    trace = trace_block(layer, x, kwargs)
    rows = dict(trace.score_rows)
    if family == "phi3":
        assert rows == {"self_attn.qkv_proj": ((0, 192),)}
        assert trace.score_rows_of(["self_attn.qkv_proj"], {"self_attn.qkv_proj": 256}) == [(0, 192)]
    else:
        q, k = layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features
        assert rows == {"self_attn.q_proj": ((0, q),), "self_attn.k_proj": ((0, k),)}
        names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        sizes = {n: layer.get_submodule(n).out_features for n in names}
        assert trace.score_rows_of(names, sizes) == [(0, q), (q, q + k)]


def test_unclipped_rows_inside_one_linear_reach_a_sub_stack():
    """A group with two grids is quantized as two sub-stacks: an unclipped range covering part of
    one linear (a fused qkv's q/k rows) keeps that part unclipped there."""
    from strata_quant.workers.methods import Part, quantize_group, quantize_parts
    from strata_quant.workers.result import QuantSpec

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)
    x = torch.randn(256, 64, generator=gen)
    h = 2 * x.T @ x / 256
    four, three = QuantSpec(4, 32, False), QuantSpec(3, 32, False)
    parts = [Part("a", 16, four), Part("qkv", 32, three)]
    opts = {"awq_clip_search": "block", "awq_grid": 5, "awq_no_clip_rows": [(20, 36)]}
    got = quantize_parts("awq", w, h, parts, opts)
    want = quantize_group("awq", w[16:], h, three, {**opts, "awq_no_clip_rows": [(4, 20)]})
    assert torch.equal(got[1].dequantize(), want.dequantize())
    clipped = quantize_group("awq", w[16:], h, three, {**opts, "awq_no_clip_rows": []})
    assert not torch.equal(got[1].dequantize(), clipped.dequantize())  # the range did something


def test_stage_cache_gives_the_full_pass_bytes_on_phi3(tmp_path, emma_path, ray_session):
    """Phi-3's fused qkv / gate_up stages take the stage passes too (by structure, not names):
    the same bytes as running the whole block for every stage, on two workers."""
    from tests.test_families import stage_cache_hashes

    full, cached = stage_cache_hashes(tmp_path, "phi3")
    assert len(full) == 12 and cached == full


def test_diag_shrink_reaches_the_solver_through_the_block_plan(tmp_path, tiny_model_path):
    """quant.diag_shrink goes from the worker job through the Solve step to GPTQ: every stored
    result carries α, and shrinking H changes the codes (in-process worker, one block)."""
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.store import LocalStore
    from strata_quant.workers.actor import BlockWorker
    from strata_quant.workers.job import WorkerJob
    from strata_quant.workers.records import result_from_bytes
    from strata_quant.workers.result import QuantSpec

    reader = open_checkpoint(str(tiny_model_path))
    tokens = torch.randint(0, reader.config["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(0))
    codes = {}
    for alpha in (0.0, 0.5):
        store = LocalStore(tmp_path / str(alpha))
        job = WorkerJob(reader.config, QuantSpec(4, 32, False), run_prefix="runs/t", diag_shrink=alpha, batch_size=2)
        worker = BlockWorker(0, 1, reader, store, job)
        worker.load_samples(tokens)
        entries = worker.process_block(0)["results"]
        worker.shutdown()
        results = {e["name"]: result_from_bytes(store.get_bytes(e["key"])) for e in entries}
        assert results and all(r.params["diag_shrink"] == alpha for r in results.values())
        codes[alpha] = {n: r.codes for n, r in results.items()}
    assert codes[0.0].keys() == codes[0.5].keys()
    assert any(not torch.equal(codes[0.0][n], codes[0.5][n]) for n in codes[0.0])
