"""Mixture-of-Experts fixtures with real activations, built from SmolLM2-135M.

No MoE checkpoint with real weights ships in a package registry, so these are made from the
dense SmolLM2 fixture (:func:`pipeline.fixtures.smollm2`): every decoder layer's MLP becomes
8 experts that are each an exact copy of it, with a seeded router (top-2, top-k weights
renormalised). Since Σ_k p_k = 1 and every f_e is the same f, the MoE output Σ_k p_k f_e(x)
equals f(x): the model computes what its dense twin computes (up to float rounding of the
renormalised weights), yet each expert sees its own token subset, so per-expert statistics
and codes differ. The router rows have seeded directions and norms spread over 1.5 decades
(s_e = 10^(−1.5·e/7)): top-2 is the two largest logits, and an expert whose logits vary
little is picked only when most others are negative, so the routing is uneven.

* ``smollm2-mixtral`` — MixtralForCausalLM; the dense twin is SmolLM2 itself (Llama and
  Mixtral attention are the same computation).
* ``smollm2-qwen3-moe`` — Qwen3MoeForCausalLM. Qwen3's attention normalises q and k per head
  (``q_norm``, ``k_norm``), which Llama's lacks and no weight turns into the identity, so its
  dense twin is a Qwen3ForCausalLM with SmolLM2's weights and the same q/k norm weights
  (:func:`dense_twin`): a per-layer scalar (:func:`qk_norm_scalars`) restores q's and k's
  typical head size, which keeps the twin a usable language model, though a worse one than
  SmolLM2 (the per-token size of q and k is lost to the normalisation).

The checkpoints are written by transformers' own ``save_pretrained``, whose reverse conversion
mapping gives the per-expert names the family's real checkpoints use (Mixtral
``block_sparse_moe.experts.N.w1/w2/w3.weight``, Qwen3-MoE
``mlp.experts.N.gate_proj/up_proj/down_proj.weight``). Every safetensors file's SHA-256 is
pinned in :data:`MOE_FIXTURES`: a build that differs is refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from strata_quant.pipeline.fixtures import (
    FixtureError,
    _manifest_ok,
    _write_manifest,
    cache_dir,
    file_sha256,
    smollm2,
)

N_EXPERTS = 8
TOP_K = 2
ROUTER_SEED = 21
ROUTER_SPREAD = 1.5  # decades between the largest and the smallest router row norm
# the dense config fields carried over from SmolLM2's config.json
DENSE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rope_parameters",
)


@dataclass(frozen=True)
class MoeFixture:
    name: str
    model_type: str  # transformers' model_type of the MoE model
    twin_type: str | None  # the dense model with the same attention; None: SmolLM2 itself
    config: dict = field(default_factory=dict)  # MoE fields of the family's config
    sha256: dict = field(default_factory=dict)  # safetensors file → SHA-256 of the build


MOE_FIXTURES: dict[str, MoeFixture] = {
    "smollm2-mixtral": MoeFixture(
        "smollm2-mixtral",
        "mixtral",
        None,
        {"num_local_experts": N_EXPERTS, "num_experts_per_tok": TOP_K, "router_jitter_noise": 0.0},
        {"model.safetensors": "17ee92baa49c6f6ad47b4520d043dc25521a8bc6db6e79ef829aec28ed45ffa9"},
    ),
    "smollm2-qwen3-moe": MoeFixture(
        "smollm2-qwen3-moe",
        "qwen3_moe",
        "qwen3",
        {
            "num_experts": N_EXPERTS,
            "num_experts_per_tok": TOP_K,
            "norm_topk_prob": True,
            "moe_intermediate_size": 1536,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "attention_bias": False,
        },
        {"model.safetensors": "2abd82a245d3723509235f4b87c1fcb87ee0050af7ff74db3965b05712bcec1d"},
    ),
}


def _dense_config() -> dict:
    cfg = json.loads((smollm2() / "config.json").read_text())
    return {k: cfg[k] for k in DENSE_FIELDS if k in cfg}


def moe_config(fx: MoeFixture):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(fx.model_type, **_dense_config(), **fx.config)
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    config.dtype = "float16"
    return config


def router_weight(layer: int, hidden: int):
    """Layer ``layer``'s router [E, H] (fp16): seeded N(0, 1/H) directions scaled by
    s_e = 10^(−ROUTER_SPREAD·e/(E−1)), so expert e's logits spread less as e grows."""
    import torch

    gen = torch.Generator().manual_seed(ROUTER_SEED * 1000 + layer)
    rows = torch.randn(N_EXPERTS, hidden, generator=gen, dtype=torch.float32) / hidden**0.5
    scale = 10.0 ** (-ROUTER_SPREAD * torch.arange(N_EXPERTS, dtype=torch.float32) / (N_EXPERTS - 1))
    return (rows * scale[:, None] * 4.0).half()


QK_TEXT = ("persuasion", 512)  # the text (Austen novel, tokens) the q/k norm scalars are measured on


def qk_norm_scalars() -> dict[tuple[int, str], float]:
    """Per layer and q/k: the mean RMS of SmolLM2's q (k) head vectors over the first tokens of
    :data:`QK_TEXT`, rounded to 1/16 of an octave (so that it is the same number on every CPU).
    Qwen3 normalises each head vector to RMS 1 before its weight; this scalar gives it back its
    typical size (the per-token size is lost: a weight cannot restore it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata_quant.pipeline.fixtures import austen

    novel, n_tokens = QK_TEXT
    model = AutoModelForCausalLM.from_pretrained(smollm2(), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(smollm2())(austen(novel).read_text()[: 8 * n_tokens]).input_ids
    head_dim = model.config.head_dim
    out: dict[tuple[int, str], float] = {}

    def keep(layer: int, which: str):
        def fn(_module, _args, y):
            rms = y.view(*y.shape[:-1], -1, head_dim).double().pow(2).mean(-1).sqrt().mean().item()
            out[(layer, which)] = 2.0 ** (round(16 * math.log2(rms)) / 16)

        return fn

    hooks = [
        getattr(layer.self_attn, f"{which}_proj").register_forward_hook(keep(i, which))
        for i, layer in enumerate(model.model.layers)
        for which in ("q", "k")
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[:n_tokens]]))
    for h in hooks:
        h.remove()
    return out


def _fill(name: str, dense: dict, meta, config, qk: dict):
    """The value of MoE parameter ``name`` (shape ``meta``) made from SmolLM2's tensors."""
    import torch

    if name in dense:
        return dense[name]
    if name == "lm_head.weight":
        return dense["model.embed_tokens.weight"]
    layer = int(name.split(".")[2])
    if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: the experts' forward reads gate, then up
        p = name[: -len("experts.gate_up_proj")]
        fused = torch.cat([dense[p + "gate_proj.weight"], dense[p + "up_proj.weight"]], 0)
        return fused.expand(meta.shape[0], *fused.shape).contiguous()
    if name.endswith("experts.down_proj"):
        down = dense[name[: -len("experts.down_proj")] + "down_proj.weight"]
        return down.expand(meta.shape[0], *down.shape).contiguous()
    if name.endswith(".gate.weight") and tuple(meta.shape) == (N_EXPERTS, config.hidden_size):
        return router_weight(layer, config.hidden_size)
    for which in ("q", "k"):
        if name.endswith(f"self_attn.{which}_norm.weight"):
            return torch.full(meta.shape, qk[(layer, which)], dtype=torch.float16)
    raise FixtureError(f"no SmolLM2 tensor gives {name} {tuple(meta.shape)}")


def build_state(model_type: str, config) -> dict:
    """Every parameter of a ``model_type`` model with ``config`` (MoE or dense twin) from SmolLM2."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    dense = load_file(str(smollm2() / "model.safetensors"))
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    names = meta_model.state_dict()
    qk = qk_norm_scalars() if any(n.endswith("self_attn.q_norm.weight") for n in names) else {}
    return {name: _fill(name, dense, meta, config, qk) for name, meta in names.items()}


def smollm2_moe(name: str) -> Path:
    """The MoE fixture ``name`` (a key of :data:`MOE_FIXTURES`), built once and cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in MOE_FIXTURES:
        raise FixtureError(f"unknown MoE fixture {name!r} (known: {', '.join(MOE_FIXTURES)})")
    fx = MOE_FIXTURES[name]
    folder = cache_dir() / "models" / name
    if _manifest_ok(folder):
        return folder
    config = moe_config(fx)
    state = build_state(fx.model_type, config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(smollm2()).save_pretrained(tmp)
    got = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.safetensors"))}
    if fx.sha256 and got != fx.sha256:
        raise FixtureError(f"{name} built with checksums {got}, expected {fx.sha256}")
    _write_manifest(tmp, f"strata fixtures: {name} from smollm2-135m")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def dense_twin(name: str):
    """The dense model that the MoE fixture ``name`` computes, in float32 (eval mode): SmolLM2,
    or for a family whose attention differs from Llama's, that family's dense model carrying
    SmolLM2's weights and the MoE fixture's extra attention weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fx = MOE_FIXTURES[name]
    if fx.twin_type is None:
        return AutoModelForCausalLM.from_pretrained(smollm2(), dtype=torch.float32).eval()
    config = AutoConfig.for_model(fx.twin_type, **_dense_config(), attention_bias=False)
    state = build_state(fx.twin_type, config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.tie_weights()
    return model.eval()
