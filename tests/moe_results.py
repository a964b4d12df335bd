"""Per-expert quantized results of a Mixture-of-Experts checkpoint, made without the run and stored as the run
stores them, so that the format tests take the real assembly path.

* :func:`tiny_moe` — a tiny random Mixtral or Qwen3-MoE from transformers' config classes (widths multiples of
  32, so every result is a whole number of ggml blocks), saved as fp16 with a given tokenizer; its routers are
  random (transformers initialises some to zero) so each expert sees its own tokens.
* :func:`moe_results` — every expert's statistics from the tokens its own router sends it
  (:func:`workers.moe.add_expert_statistics` on the hidden states the model hands its MoE module), GPTQ per expert
  (gate and up stacked, one solve, then cut into the checkpoint's per-expert linears by
  :func:`pipeline.moe.expert_linears`), RTN for the attention linears and for experts the policy rounds; stored
  under the checkpoint's names (``…experts.3.w1``, ``…experts.3.gate_proj``) with a record entry each, as
  tests/test_gguf_format.py's ``stored_results`` stores dense results. Routers stay 16-bit (no result).
"""

from __future__ import annotations

from pathlib import Path

import torch

from strata_quant.workers.result import QuantizedLinear, QuantSpec

TINY_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_moe_config(family: str, vocab: int, **extra):
    """The config of a tiny ``family`` model ("mixtral", "qwen3_moe" or "deepseek_v3"): 4 experts, top-2."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = {**TINY_COMMON, "vocab_size": vocab, "max_position_embeddings": 256, **extra}
    if family == "mixtral":
        return MixtralConfig(**common, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen3_moe":
        moe = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16, norm_topk_prob=True)
        return Qwen3MoeConfig(**{**moe, **common}, intermediate_size=128)
    if family == "deepseek_v3":  # MLA attention, a dense first block, a shared expert, grouped routing
        from transformers import DeepseekV3Config

        moe = dict(moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2)
        mla = dict(q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)
        common = {**common, "num_hidden_layers": 3, "num_key_value_heads": 4}
        return DeepseekV3Config(
            **moe, **mla, **common, intermediate_size=128, n_group=2, topk_group=1, first_k_dense_replace=1
        )
    raise ValueError(f"no tiny MoE family {family!r}")


def tiny_moe(family: str, tokenizer, folder: Path, **extra) -> Path:
    """A seeded tiny random ``family`` model with ``tokenizer``, saved as fp16 (per-expert tensors on disk)."""
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline.fixtures import _save_fp16

    config = tiny_moe_config(
        family, len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    _save_fp16(model, tokenizer, folder)
    return folder


def _moe_inputs(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per decoder layer index, the hidden states the model hands that layer's MoE module on ``ids``."""
    from strata_quant.workers.moe import moe_modules

    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for b, layer in enumerate(model.model.layers):
        for moe in moe_modules(layer).values():
            hooks.append(moe.register_forward_pre_hook(lambda _m, args, b=b: seen.setdefault(b, args[0].detach())))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def solve_block_experts(meta, layer, prefix: str, hidden: torch.Tensor, spec: QuantSpec, policy: str = "rtn"):
    """{checkpoint linear name: result} of the experts of one block: routed statistics, the policy's decision for
    experts below one token, GPTQ on gate/up stacked and on down (RTN for experts the policy rounds)."""
    from strata_quant.pipeline.moe import expert_linears, expert_sources
    from strata_quant.workers.gptq import gptq_quantize
    from strata_quant.workers.moe import (
        DOWN,
        GATE_UP,
        RTN,
        ExpertStatistics,
        add_expert_statistics,
        expert_decisions,
        moe_modules,
        routing,
        token_counts,
    )
    from strata_quant.workers.rtn import rtn_quantize

    out: dict[str, QuantizedLinear] = {}
    for name, moe in moe_modules(layer).items():
        experts = moe.experts
        n_exp = experts.gate_up_proj.shape[0]
        counts = token_counts(routing(moe, hidden).top_k_index, n_exp)
        decisions = expert_decisions(counts, 1, policy)
        stats = ExpertStatistics.empty(experts)
        add_expert_statistics(moe, hidden, stats, decisions)
        solved = {}
        for e in range(n_exp):
            for which in (GATE_UP, DOWN):
                weight = getattr(experts, which)[e].detach().float()
                if decisions[e] == RTN:
                    solved[(f"{prefix}{name}.experts.{which}", e)] = rtn_quantize(weight, spec)
                else:
                    solved[(f"{prefix}{name}.experts.{which}", e)] = gptq_quantize(
                        weight, stats.hessian(e, which), spec
                    )
        out.update(expert_linears(expert_sources(meta, prefix), solved))
    return out


def moe_results(reader, root: Path, spec: QuantSpec, ids: torch.Tensor, policy: str = "rtn"):
    """Every quantized linear of the MoE checkpoint ``reader`` (experts by GPTQ on routed statistics from ``ids``
    [B, T], attention by RTN), stored and recorded as pipeline.run does: (ResultSource, {linear: result})."""
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline.assemble import ResultSource
    from strata_quant.pipeline.store import LocalStore, sha256_bytes
    from strata_quant.workers.block import block_linears
    from strata_quant.workers.records import result_to_bytes
    from strata_quant.workers.rtn import rtn_quantize

    model = AutoModelForCausalLM.from_pretrained(reader.path, dtype=torch.float32).eval()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config)
    inputs = _moe_inputs(model, ids)
    results: dict[str, QuantizedLinear] = {}
    for b, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{b}."
        for name, linear in block_linears(layer).items():
            results[prefix + name] = rtn_quantize(linear.weight.detach().float(), spec)
        if b in inputs:
            results.update(
                solve_block_experts(meta, layer, prefix, inputs[b].reshape(1, -1, inputs[b].shape[-1]), spec, policy)
            )
    store = LocalStore(root)
    entries = []
    for linear, result in results.items():
        if f"{linear}.weight" not in reader.tensor_names:
            raise KeyError(f"{linear} is not a checkpoint linear")
        data = result_to_bytes(result)
        key = f"run/{linear}.safetensors"
        store.put_bytes(key, data)
        entries.append(
            {
                "name": linear,
                "key": key,
                "sha256": sha256_bytes(data),
                "bits": spec.bits,
                "group_size": spec.group_size,
                "sym": spec.sym,
            }
        )
    return ResultSource(store, {0: {"results": entries}}), results


def dense_moe(folder: Path, results: dict[str, QuantizedLinear]):
    """The checkpoint's model (float32, eval) carrying every result's dequantized weight: per-expert results
    go into the fused expert parameters by the family's own conversion (:func:`pipeline.moe.block_state`)."""
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline.moe import block_state

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    state = block_state(model, {f"{name}.weight": r.dequantize() for name, r in results.items()})
    missing = set(state) - set(model.state_dict())
    if missing:
        raise KeyError(f"results with no place in the model: {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    return model
