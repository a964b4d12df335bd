"""The SmolLM2 Mixture-of-Experts fixtures: pinned bytes, per-expert names on disk, logits equal
to their dense twin's, uneven routing, and routed statistics equal to a hand computation from
the checkpoint's own per-expert tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from strata_quant.pipeline.fixtures import austen, file_sha256, resolve, smollm2
from strata_quant.pipeline.moe import build_moe_block
from strata_quant.pipeline.moe_fixtures import MOE_FIXTURES, N_EXPERTS, dense_twin, moe_config, smollm2_moe
from strata_quant.workers.moe import DOWN, GATE_UP, ROUTED, ExpertStatistics, add_expert_statistics, token_counts

pytestmark = pytest.mark.slow  # builds and runs the SmolLM2 MoE fixtures (minutes)

# the checkpoint names of expert e's gate, up and down projections, per family, as its real checkpoints store them
EXPERT_NAMES = {
    "smollm2-mixtral": (
        "block_sparse_moe.experts.{e}.w1",
        "block_sparse_moe.experts.{e}.w3",
        "block_sparse_moe.experts.{e}.w2",
    ),
    "smollm2-qwen3-moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
}
ROUTER_NAME = {"smollm2-mixtral": "block_sparse_moe.gate", "smollm2-qwen3-moe": "mlp.gate"}


def _ids(n: int = 256, rows: int = 2) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2())
    return torch.tensor(tok(austen("emma").read_text()[: 40 * n * rows]).input_ids[: n * rows]).reshape(rows, n)


def _tensors(folder, prefix: str = "") -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


@pytest.mark.parametrize("name", list(MOE_FIXTURES))
def test_fixture_is_pinned_and_named_per_expert(name):
    folder = smollm2_moe(name)
    assert {p.name: file_sha256(p) for p in folder.glob("*.safetensors")} == MOE_FIXTURES[name].sha256
    assert resolve(f"fixture:{name}") == folder  # a job names it as any other fixture
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    gate, up, down = EXPERT_NAMES[name]
    for b in (0, 29):
        for e in range(N_EXPERTS):
            for pattern in (gate, up, down):
                assert f"model.layers.{b}.{pattern.format(e=e)}.weight" in names
        assert f"model.layers.{b}.{ROUTER_NAME[name]}.weight" in names
    assert not any("gate_up_proj" in n for n in names)


@pytest.mark.parametrize("name", list(MOE_FIXTURES))
def test_fixture_logits_equal_its_dense_twin(name):
    """Every expert is the dense MLP and the top-2 weights sum to 1, so the MoE computes its dense
    twin's function. Both load the same fp16 weights into float32, so fp16 storage adds no
    difference; what differs is float32 rounding (p₁ + p₂ = 1 only to an ulp, the two experts'
    outputs summed in another order), which 30 layers carry to 7.5e-5 (Mixtral) and 5.9e-5
    (Qwen3-MoE) at most on logits up to ~40 (measured on these 512 tokens). The bound, 1e-3,
    leaves room for another BLAS; one fp16 ulp at that size is 0.03. Top-1 agrees everywhere."""
    from transformers import AutoModelForCausalLM

    ids = _ids()
    with torch.no_grad():
        twin = dense_twin(name)
        want = twin(input_ids=ids).logits
        del twin
        moe = AutoModelForCausalLM.from_pretrained(smollm2_moe(name), dtype=torch.float32).eval()
        counts = []
        for layer in moe.model.layers:
            layer.mlp.experts.register_forward_pre_hook(
                lambda _m, args: counts.append(token_counts(args[1], N_EXPERTS))
            )
        got = moe(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # the routing is uneven: in every layer some expert sees far fewer tokens than the busiest one
    counts = torch.stack(counts)  # [layers, experts]
    assert counts.shape == (30, N_EXPERTS)
    assert (counts.min(1).values * 4 < counts.max(1).values).all()


@pytest.mark.parametrize("name", list(MOE_FIXTURES))
def test_routed_statistics_equal_hand_computed_xtx(name):
    """Block 0 of the fixture: the routed statistics of its least-used expert equal XᵀX over the
    tokens whose two largest router logits include it, and the down input is SiLU(X Gᵀ) ⊙ X Uᵀ,
    with the router, G, U read straight from the checkpoint's per-expert tensors."""
    folder = smollm2_moe(name)
    config = moe_config(MOE_FIXTURES[name])
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    tensors = _tensors(folder, "model.layers.0.")
    layer = build_moe_block(meta, "model.layers", 0, tensors, torch.float32)
    ids = _ids(128)
    embed = _tensors(folder, "model.embed_tokens.")["model.embed_tokens.weight"].float()
    hidden = F.embedding(ids, embed)
    rotary = type(meta.model.rotary_emb)(config)
    position = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    seen = []
    layer.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        layer(hidden, position_embeddings=rotary(hidden, position), position_ids=position)
    x = seen[0]

    router = tensors[f"model.layers.0.{ROUTER_NAME[name]}.weight"].float()
    rows_all = x.reshape(-1, x.shape[-1])
    top2 = (rows_all @ router.T).topk(2, dim=-1).indices  # softmax is monotone: top-k of logits
    counts = torch.bincount(top2.reshape(-1), minlength=N_EXPERTS)
    assert len(set(counts.tolist())) > 1  # experts see different token subsets
    e = int(torch.where(counts > 0, counts, counts.max() + 1).argmin())

    stats = ExpertStatistics.empty(layer.mlp.experts, which=[e])
    add_expert_statistics(layer.mlp, x, stats, [ROUTED] * N_EXPERTS)
    assert torch.equal(stats.counts, counts)

    chosen = rows_all[(top2 == e).any(-1)]
    assert stats.accumulators[(e, GATE_UP)].count == chosen.shape[0] == int(counts[e]) > 0
    xtx = chosen.T.double() @ chosen.double()
    torch.testing.assert_close(stats.accumulators[(e, GATE_UP)].sum, xtx, rtol=1e-4, atol=1e-3)
    gate, up, _down = (tensors[f"model.layers.0.{p.format(e=e)}.weight"].float() for p in EXPERT_NAMES[name])
    act = F.silu(chosen @ gate.T) * (chosen @ up.T)
    ata = act.T.double() @ act.double()
    torch.testing.assert_close(stats.accumulators[(e, DOWN)].sum, ata, rtol=1e-4, atol=1e-3)
