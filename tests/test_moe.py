"""Mixture-of-Experts foundations on tiny random models: checkpoint ↔ block through transformers'
conversion mapping, the model's own routing, routed statistics, the min-tokens policy."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from strata_quant.pipeline.checkpoint import CheckpointError
from strata_quant.pipeline.moe import (
    block_state,
    build_moe_block,
    check_block_names,
    check_checkpoint_experts,
    check_expert_budget,
    checkpoint_names,
    expert_linears,
    expert_sources,
)
from strata_quant.workers.gptq import gptq_quantize, relative_output_error
from strata_quant.workers.moe import (
    ALL_TOKENS,
    DOWN,
    GATE_UP,
    ROUTED,
    RTN,
    ExpertStatistics,
    MoeError,
    Routing,
    add_expert_statistics,
    expert_costs,
    expert_decisions,
    expert_inputs,
    expert_statistics_bytes,
    expert_waves,
    experts_per_wave,
    moe_modules,
    routing,
    token_counts,
)
from strata_quant.workers.result import QuantSpec
from strata_quant.workers.rtn import rtn_quantize

COMMON = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny(family: str):
    """A tiny random model of ``family`` (seeded) and its class."""
    from transformers import (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    if family == "mixtral":
        cls, config = MixtralForCausalLM, MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4)
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(
            **COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            norm_topk_prob=True,
        )
        cls = Qwen3MoeForCausalLM
    else:  # MLA attention, a first dense layer, a shared expert, grouped routing
        config = DeepseekV3Config(
            **{**COMMON, "num_hidden_layers": 3},
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        )
        cls = DeepseekV3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    for name, p in model.named_parameters():  # random routers (transformers initialises some to zero)
        if name.endswith("mlp.gate.weight"):
            p.data.normal_(0.0, 0.5)
    return cls, model


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "deepseek_v3"])
def saved(request, tmp_path_factory):
    cls, model = tiny(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    with torch.device("meta"):
        meta = cls(model.config)
    return request.param, folder, load_file(str(folder / "model.safetensors")), meta


def _moe_block(meta) -> int:
    return len(meta.model.layers) - 1  # the last layer is a MoE layer in every tiny family


def test_checkpoint_stores_experts_per_expert(saved):
    family, _folder, tensors, meta = saved
    b = _moe_block(meta)
    per_expert = {"mixtral": "block_sparse_moe.experts.1.w1.weight"}.get(family, "mlp.experts.1.gate_proj.weight")
    assert f"model.layers.{b}.{per_expert}" in tensors
    assert not any(name.endswith("gate_up_proj") for name in tensors)
    assert checkpoint_names(meta, f"model.layers.{b}.") == sorted(
        n for n in tensors if n.startswith(f"model.layers.{b}.")
    )


def test_block_from_checkpoint_equals_from_pretrained(saved):
    from transformers import AutoModelForCausalLM

    _family, folder, tensors, meta = saved
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for b in range(len(meta.model.layers)):
        prefix = f"model.layers.{b}."
        layer = build_moe_block(
            meta, "model.layers", b, {k: v for k, v in tensors.items() if k.startswith(prefix)}, torch.float32
        )
        want = reference.model.layers[b].state_dict()
        got = layer.state_dict()
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(got[name], want[name]), name


def test_missing_expert_tensor_is_named_before_the_block(saved):
    family, _folder, tensors, meta = saved
    b = _moe_block(meta)
    prefix = f"model.layers.{b}."
    lost = prefix + {"mixtral": "block_sparse_moe.experts.2.w3.weight"}.get(family, "mlp.experts.2.up_proj.weight")
    names = set(tensors) - {lost}
    with pytest.raises(CheckpointError, match=lost.replace(".", r"\.")):
        check_block_names(meta, prefix, names)
    check_block_names(meta, prefix, set(tensors))  # the whole checkpoint passes
    # converting without the check would stack 3 of 4 experts: refused too
    with pytest.raises(CheckpointError, match="cannot convert|converts to shape"):
        block_state(meta, {k: v for k, v in tensors.items() if k.startswith(prefix) and k != lost})


def test_expert_sources_name_each_experts_rows(saved):
    """Each per-expert checkpoint tensor is a row range of one expert of a fused parameter, found
    by the reverse conversion: reading those rows gives back the tensor on disk."""
    family, _folder, tensors, meta = saved
    b = _moe_block(meta)
    prefix = f"model.layers.{b}."
    sources = expert_sources(meta, prefix)
    n_exp = meta.model.layers[b].mlp.experts.gate_up_proj.shape[0]
    assert len(sources) == 3 * n_exp  # gate, up and down of every expert
    state = block_state(meta, {k: v for k, v in tensors.items() if k.startswith(prefix)})
    for disk_name, (param, expert, start, end) in sources.items():
        assert torch.equal(state[param][expert, start:end], tensors[disk_name]), disk_name
    gate = {"mixtral": "block_sparse_moe.experts.3.w1.weight"}.get(family, "mlp.experts.3.gate_proj.weight")
    up = {"mixtral": "block_sparse_moe.experts.3.w3.weight"}.get(family, "mlp.experts.3.up_proj.weight")
    inter = meta.model.layers[b].mlp.experts.down_proj.shape[2]
    assert sources[prefix + gate] == (prefix + "mlp.experts.gate_up_proj", 3, 0, inter)
    assert sources[prefix + up] == (prefix + "mlp.experts.gate_up_proj", 3, inter, 2 * inter)


def test_plan_check_names_the_first_block_missing_an_expert(saved):
    family, _folder, tensors, meta = saved
    check_checkpoint_experts(meta, "model.layers", set(tensors))
    b = _moe_block(meta)
    lost = f"model.layers.{b}." + {"mixtral": "block_sparse_moe.experts.0.w2.weight"}.get(
        family, "mlp.experts.0.down_proj.weight"
    )
    with pytest.raises(CheckpointError, match=f"1 tensor.*layers.{b}: {lost.replace('.', '[.]')}"):
        check_checkpoint_experts(meta, "model.layers", set(tensors) - {lost})


def _block_and_input(family: str, tokens: int = 48):
    """The MoE module of a tiny model's last layer and a realistic input: the hidden states the
    model hands that module on random token ids."""
    _cls, model = tiny(family)
    layer = model.model.layers[-1]
    (name, moe), *_ = moe_modules(layer).items()
    seen = []
    handle = moe.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (2, tokens // 2), generator=torch.Generator().manual_seed(1)))
    handle.remove()
    return moe, seen[0]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_routed_statistics_are_each_experts_own_tokens(family):
    """Routed statistics equal XᵀX over the tokens the router picked, and the down input is the
    expert's own intermediate activation on them; the captured pass reproduces the block's output."""
    moe, hidden = _block_and_input(family)
    route = routing(moe, hidden)
    n_exp = moe.experts.gate_up_proj.shape[0]
    counts = token_counts(route.top_k_index, n_exp)
    assert int(counts.sum()) == route.top_k_index.numel()
    stats = ExpertStatistics.empty(moe.experts)
    add_expert_statistics(moe, hidden, stats, [ROUTED] * n_exp)
    assert torch.equal(stats.counts, counts)
    x = route.hidden.float()
    for e in range(n_exp):
        rows = (route.top_k_index == e).any(-1)
        assert stats.accumulators[(e, GATE_UP)].count == int(counts[e]) == int(rows.sum())
        if counts[e] == 0:
            continue
        xe = x[rows]
        torch.testing.assert_close(stats.accumulators[(e, GATE_UP)].sum, (xe.T @ xe).double(), rtol=1e-5, atol=1e-5)
        gate, up = (xe @ moe.experts.gate_up_proj[e].T).chunk(2, dim=-1)
        act = moe.experts.act_fn(gate) * up
        torch.testing.assert_close(stats.accumulators[(e, DOWN)].sum, (act.T @ act).double(), rtol=1e-4, atol=1e-5)
    # the eager forward the statistics read gives the module's routed output
    out = expert_inputs(moe.experts, route.hidden, route.top_k_index, route.top_k_weights, lambda *a: None)
    with torch.no_grad():
        ref = moe.experts(route.hidden, route.top_k_index, route.top_k_weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _starved(moe, hidden, expert: int):
    """The router re-made so that ``expert`` is never among the top-k (its logit row is −10 times
    the strongest other row's mean direction), the others as they were."""
    w = moe.gate.weight.data
    keep = [e for e in range(w.shape[0]) if e != expert]
    x = hidden.reshape(-1, hidden.shape[-1]).float()
    direction = x.mean(0) / x.mean(0).norm()
    w[keep] += 20.0 * direction  # every other expert's logit raised above the starved one's
    w[expert] = -20.0 * direction
    return moe


@pytest.mark.parametrize("policy", ["all_tokens", "rtn", "fail"])
def test_zero_token_expert_under_each_policy(policy):
    moe, hidden = _block_and_input("mixtral")
    moe = _starved(moe, hidden, expert=2)
    n_exp = moe.experts.gate_up_proj.shape[0]
    counts = token_counts(routing(moe, hidden).top_k_index, n_exp)
    assert counts[2] == 0 and (counts[[0, 1, 3]] > 0).all()
    if policy == "fail":
        with pytest.raises(MoeError, match=r"2 \(0\)"):
            expert_decisions(counts, min_tokens=1, policy=policy)
        return
    decisions = expert_decisions(counts, min_tokens=1, policy=policy)
    assert decisions == [ROUTED, ROUTED, ALL_TOKENS if policy == "all_tokens" else RTN, ROUTED]
    stats = ExpertStatistics.empty(moe.experts)
    add_expert_statistics(moe, hidden, stats, decisions)
    spec = QuantSpec(bits=4, group_size=16)
    weight = moe.experts.gate_up_proj[2].detach()
    if policy == "all_tokens":
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        assert stats.accumulators[(2, GATE_UP)].count == x.shape[0]  # every token of the block
        torch.testing.assert_close(stats.accumulators[(2, GATE_UP)].sum, (x.T @ x).double(), rtol=1e-5, atol=1e-5)
        result = gptq_quantize(weight, stats.hessian(2, GATE_UP), spec)
        down = gptq_quantize(moe.experts.down_proj[2].detach(), stats.hessian(2, DOWN), spec)
        assert torch.isfinite(down.dequantize()).all()
    else:
        assert stats.accumulators[(2, GATE_UP)].count == 0  # nothing gathered, nothing to divide by
        with pytest.raises(ValueError, match="no calibration rows"):
            stats.hessian(2, GATE_UP)
        result = rtn_quantize(weight, spec)
    assert torch.isfinite(result.dequantize()).all()
    # the routing of the block is the model's: statistics taking did not change the output
    with torch.no_grad():
        assert torch.equal(moe(hidden), moe(hidden))


def test_min_tokens_threshold_and_bad_policy():
    counts = torch.tensor([0, 3, 4, 100])
    assert expert_decisions(counts, 4, "rtn") == [RTN, RTN, ROUTED, ROUTED]
    assert expert_decisions(counts, 0, "all_tokens") == [ALL_TOKENS, ROUTED, ROUTED, ROUTED]  # zero is always low
    with pytest.raises(MoeError, match="quant.moe.policy"):
        expert_decisions(counts, 4, "skip")


def test_rank_deficient_expert_hessian_is_solved_by_damping():
    """An expert that saw 3 tokens has a rank-3 Hessian of size 64: GPTQ's damping makes it
    factorisable; the result is finite and, on those tokens, better than RTN's."""
    moe, hidden = _block_and_input("mixtral")
    x = hidden.reshape(-1, hidden.shape[-1])[:3]
    index = torch.zeros(3, 1, dtype=torch.long)
    stats = ExpertStatistics.empty(moe.experts, which=[0])
    expert_inputs(moe.experts, x, index, torch.ones(3, 1), lambda e, w, t: stats.accumulators[(e, w)].add(t))
    h = stats.hessian(0, GATE_UP)
    assert int(torch.linalg.matrix_rank(h, rtol=1e-5)) == 3 < h.shape[0]  # fp32 Gram noise aside
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(h.float())
    weight = moe.experts.gate_up_proj[0].detach()
    spec = QuantSpec(bits=4, group_size=16)
    result = gptq_quantize(weight, h, spec)
    approx = result.dequantize()
    assert torch.isfinite(approx).all()
    assert relative_output_error(weight, approx, h) < relative_output_error(
        weight, rtn_quantize(weight, spec).dequantize(), h
    )


def _rank_deficient_solves(moe, x: torch.Tensor, index: torch.Tensor, expert: int) -> dict:
    """Expert ``expert``'s GPTQ W4 g16 results (gate/up and down) from the statistics of a wave that
    holds it alone, under the routing ``index`` [T, k] of the tokens ``x`` (the others' products skipped)."""
    route = Routing(x, index, torch.full(index.shape, 0.5))
    n_exp = moe.experts.gate_up_proj.shape[0]
    stats = ExpertStatistics.empty(moe.experts, which=[expert])
    add_expert_statistics(moe, x, stats, [ROUTED] * n_exp, route)
    out = {}
    for which in (GATE_UP, DOWN):
        h = stats.hessian(expert, which)
        weight = getattr(moe.experts, which)[expert].detach().float()
        out[which] = (h, weight, gptq_quantize(weight, h, QuantSpec(bits=4, group_size=16)))
    return out


@pytest.mark.parametrize("case", ["one_token", "low_rank_tokens"])
def test_rank_deficient_routed_expert_solves_finitely_and_deterministically(case):
    """Expert 1 reached by one routed token, or by 40 tokens that lie in a 2-dimensional subspace:
    its routed Hessians (gate/up: H×H, down: I×I) are rank-deficient (gate/up's of rank 1 or 2), and its solves, gathered as a
    wave of its own, are finite, no worse than RTN on those Hessians, and the same bit for bit when
    gathered and solved again."""
    moe, hidden = _block_and_input("mixtral")
    x = hidden.reshape(-1, hidden.shape[-1]).float()
    if case == "one_token":
        x, rank = x[:1], 1
    else:
        basis = x[:2]
        mix = torch.randn(40, 2, generator=torch.Generator().manual_seed(3))
        x, rank = mix @ basis, 2
    index = torch.zeros(x.shape[0], 2, dtype=torch.long)
    index[:, 1] = 1  # every token to experts 0 and 1
    first = _rank_deficient_solves(moe, x, index, expert=1)
    again = _rank_deficient_solves(moe, x, index, expert=1)
    for which, (h, weight, result) in first.items():
        found = int(torch.linalg.matrix_rank(h, rtol=1e-5))
        # down reads σ(G x) ⊙ U x: one token gives rank 1; a low-rank subspace does not stay one through σ
        assert found < h.shape[0] and (found == rank if which == GATE_UP or case == "one_token" else True), which
        approx = result.dequantize()
        assert torch.isfinite(approx).all() and torch.isfinite(result.scales).all(), which
        spec = QuantSpec(bits=4, group_size=16)
        rtn = rtn_quantize(weight, spec).dequantize()
        assert relative_output_error(weight, approx, h) <= relative_output_error(weight, rtn, h), which
        other = again[which][2]
        assert all(torch.equal(getattr(result, f), getattr(other, f)) for f in ("codes", "scales", "zeros")), which


def test_deepseek_v3_block_structure_and_grouped_routing():
    """Tiny DeepSeek-V3: a first dense layer, then MoE layers with a shared expert (plain linears,
    solved as a dense MLP) beside the routed experts, MLA attention; the routing taken is the
    model's grouped one (each token's experts lie in at most ``topk_group`` of ``n_group`` groups)."""
    from strata_quant.workers.block import block_linears

    _cls, model = tiny("deepseek_v3")
    first, last = model.model.layers[0], model.model.layers[-1]
    assert moe_modules(first) == {}
    assert list(moe_modules(last)) == ["mlp"]
    linears = block_linears(last)
    assert {"mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"} <= set(
        linears
    )
    assert {"self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj"} <= set(
        linears
    )
    assert not any(name.startswith("mlp.experts") for name in linears)  # fused: no nn.Linear per expert
    assert "mlp.gate" not in linears  # the router is a parameter of its own module: never quantized
    moe, hidden = _block_and_input("deepseek_v3", tokens=64)
    route = routing(moe, hidden)
    cfg = model.config
    group = route.top_k_index // (cfg.n_routed_experts // cfg.n_group)
    assert all(len(set(row.tolist())) <= cfg.topk_group for row in group)
    stats = ExpertStatistics.empty(moe.experts)
    add_expert_statistics(moe, hidden, stats, [ROUTED] * cfg.n_routed_experts)
    assert int(stats.counts.sum()) == route.top_k_index.numel()
    for e in range(cfg.n_routed_experts):
        if stats.counts[e] > 0:
            assert torch.isfinite(stats.hessian(e, GATE_UP)).all() and torch.isfinite(stats.hessian(e, DOWN)).all()


def test_expert_waves_keep_to_the_cap_and_give_the_same_statistics():
    """Statistics gathered a wave of experts at a time (routing taken once per batch) are bit for
    bit those gathered for all experts at once; no wave holds more than the cap."""
    from strata_quant.workers.schedule import assign_owners, solve_cost

    moe, hidden = _block_and_input("deepseek_v3", tokens=64)
    n_exp = moe.experts.gate_up_proj.shape[0]
    hid, inter = moe.experts.gate_up_proj.shape[2], moe.experts.down_proj.shape[2]
    route = routing(moe, hidden)
    counts = token_counts(route.top_k_index, n_exp)
    costs = [solve_cost(hid, 2 * inter) + solve_cost(inter, hid)] * n_exp
    owners = assign_owners(costs, 3)
    cap = experts_per_wave(3 * expert_statistics_bytes(hid, inter) + 5, hid, inter)
    assert cap == 3
    waves = expert_waves(owners, cap)
    assert sorted(e for w in waves for e in w) == list(range(n_exp))
    assert all(len(w) <= cap for w in waves)
    assert all(len({owners[e] for e in w}) == len(w) for w in waves)  # a wave's solves on distinct workers
    decisions = expert_decisions(counts, 1, "all_tokens")
    whole = ExpertStatistics.empty(moe.experts)
    add_expert_statistics(moe, hidden, whole, decisions, route)
    for wave in waves:
        part = ExpertStatistics.empty(moe.experts, which=wave)
        add_expert_statistics(moe, hidden, part, decisions, route)
        for key, acc in part.accumulators.items():
            assert torch.equal(acc.sum, whole.accumulators[key].sum) and acc.count == whole.accumulators[key].count
    assert expert_statistics_bytes(7168, 2048) == 8 * (7168**2 + 2048**2)  # DeepSeek-V3: 445 MB an expert
    with pytest.raises(MoeError, match="holds no expert"):
        experts_per_wave(2**28, 7168, 2048)


def test_expert_linears_split_one_solve_into_the_checkpoints_linears(saved):
    """gate/up of an expert solved as one stacked matrix under its routed Hessian, then cut into
    the checkpoint's per-expert linears: each equals GPTQ run on that linear alone, and down's
    statistics follow the quantized gate/up (true-sequential inside the expert)."""
    family, _folder, tensors, meta = saved
    b = _moe_block(meta)
    prefix = f"model.layers.{b}."
    layer = build_moe_block(
        meta, "model.layers", b, {k: v for k, v in tensors.items() if k.startswith(prefix)}, torch.float32
    )
    moe = layer.mlp
    hidden = torch.randn(64, moe.experts.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(3))
    n_exp = moe.experts.gate_up_proj.shape[0]
    stats = ExpertStatistics.empty(moe.experts)
    decisions = expert_decisions(token_counts(routing(moe, hidden[None]).top_k_index, n_exp), 1, "all_tokens")
    add_expert_statistics(moe, hidden[None], stats, decisions)
    spec = QuantSpec(bits=4, group_size=16)
    param = prefix + "mlp.experts.gate_up_proj"
    solved = {
        (param, e): gptq_quantize(moe.experts.gate_up_proj[e].detach(), stats.hessian(e, GATE_UP), spec)
        for e in range(n_exp)
    }
    sources = {k: v for k, v in expert_sources(meta, prefix).items() if v[0] == param}
    linears = expert_linears(sources, solved)
    gate = prefix + {"mixtral": "block_sparse_moe.experts.1.w1"}.get(family, "mlp.experts.1.gate_proj")
    alone = gptq_quantize(tensors[gate + ".weight"].float(), stats.hessian(1, GATE_UP), spec)
    assert torch.equal(linears[gate].codes, alone.codes) and torch.equal(linears[gate].scales, alone.scales)
    # down's input after gate/up are quantized: the statistics see the quantized intermediate
    before = stats.accumulators[(1, DOWN)].sum.clone()
    moe.experts.gate_up_proj.data[1] = solved[(param, 1)].dequantize()
    again = ExpertStatistics.empty(moe.experts, which=[1])
    add_expert_statistics(moe, hidden[None], again, decisions)
    assert not torch.equal(again.accumulators[(1, DOWN)].sum, before)
    assert torch.equal(again.accumulators[(1, GATE_UP)].sum, stats.accumulators[(1, GATE_UP)].sum)


def test_expert_statistics_of_batches_split_across_workers_add_up_bit_for_bit():
    """W=2 gives each worker whole batches; their per-expert sums reduced (added) equal one
    worker's sums over all batches, bit for bit (the routing of a token does not depend on the
    batch it is in: no capacity limit), so the experts' solves are the same at W=1 and W=2."""
    moe, hidden = _block_and_input("qwen3_moe", tokens=64)
    batches = list(hidden.reshape(4, 16, -1).split(1, dim=0))  # four batches of 16 tokens
    n_exp = moe.experts.gate_up_proj.shape[0]
    decisions = [ROUTED] * n_exp
    one = ExpertStatistics.empty(moe.experts)
    for batch in batches:
        add_expert_statistics(moe, batch, one, decisions)
    shards = [ExpertStatistics.empty(moe.experts) for _ in range(2)]  # worker r takes batches r, r + 2
    for i, batch in enumerate(batches):
        add_expert_statistics(moe, batch, shards[i % 2], decisions)
    assert torch.equal(shards[0].counts + shards[1].counts, one.counts)
    for key, acc in one.accumulators.items():
        reduced = shards[0].accumulators[key].sum + shards[1].accumulators[key].sum
        assert torch.equal(reduced, acc.sum), key


def test_the_statistics_budget_is_refused_when_no_node_holds_it():
    """The plan's rule: min(budget, E) experts' statistics, 8·(H² + I²) bytes each, within the smallest
    node's memory; a budget below one is refused whatever the node."""
    from strata_quant.pipeline.errors import ConfigError

    deepseek = [[256, 7168, 2048]]  # 445 MB an expert
    check_expert_budget(16, deepseek, 64 * 2**30)  # 7.1 GB
    with pytest.raises(ConfigError, match=r"max_expert_stats=256: 256 experts' statistics .* 106\.0 GiB, more than"):
        check_expert_budget(256, deepseek, 64 * 2**30)
    check_expert_budget(10**6, [[4, 64, 32]], 2**20)  # capped at the module's 4 experts: 160 KiB
    with pytest.raises(ConfigError, match="at least 1"):
        check_expert_budget(0, [[4, 64, 32]], 2**40)


def test_expert_costs_follow_the_solve_model():
    """A GPTQ expert costs its two solves (gate/up: K = H, 2I rows; down: K = I, H rows); a rounded one a fraction of it."""
    from strata_quant.workers.schedule import solve_cost

    gptq, rtn = expert_costs(7168, 2048, [ROUTED, RTN])
    assert gptq == solve_cost(7168, 4096) + solve_cost(2048, 7168)
    assert 0 < rtn < gptq / 5


def test_expert_owners_balance_against_the_blocks_other_solves():
    """The run's owners: each worker's modelled cost of the block's linears first (whole groups at their
    owners, split groups' shares where they run), then the experts longest first to the least loaded; the
    same owners every time, and the waves spread each one's solves over the workers."""
    from types import SimpleNamespace

    from torch import nn

    from strata_quant.workers.schedule import GroupPlan, assign_owners, solve_cost
    from strata_quant.workers.steps import _block_load

    linears = {"q": nn.Linear(64, 64), "k": nn.Linear(64, 64), "o": nn.Linear(64, 64), "gate": nn.Linear(64, 128)}
    plans = {
        ("q", "k"): GroupPlan(0),
        ("o",): GroupPlan(1, shares=((0, 16), (16, 64))),
        ("gate",): GroupPlan(0),
    }
    s = SimpleNamespace(plans=plans, linears=linears, solver="gptq")
    load = _block_load(SimpleNamespace(world=2), s)
    assert load == [solve_cost(64, 128) * 2 + solve_cost(64, 16), solve_cost(64, 48)]
    costs = expert_costs(64, 32, [ROUTED, ROUTED, RTN, ROUTED, ROUTED, ROUTED])
    owners = assign_owners(costs, 2, list(load))
    assert owners == assign_owners(costs, 2, list(load))
    work = list(load)
    for e, r in enumerate(owners):
        work[r] += costs[e]
    assert max(work) - min(work) <= max(costs)  # balanced to within one expert
    assert owners.count(1) > owners.count(0)  # rank 0 carries more of the block's linears
    waves = expert_waves(owners, 2)
    assert all(len({owners[e] for e in w}) == len(w) for w in waves[:-1])
