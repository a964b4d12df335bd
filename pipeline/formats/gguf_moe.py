"""GGUF of Mixture-of-Experts families: llama.cpp's stacked expert tensors and expert metadata.

A checkpoint stores one tensor per expert and linear (Mixtral ``…block_sparse_moe.experts.3.w1.weight``,
Qwen3-MoE ``…mlp.experts.3.gate_proj.weight``); llama.cpp reads one 3-D tensor per linear and block,
``blk.N.ffn_{gate,up,down}_exps.weight`` (torch [E, N, K], written innermost first), whose expert e is the
checkpoint's tensor of expert e, plus the router ``ffn_gate_inp`` (F32, as the converter writes it) and the
keys ``{arch}.expert_count`` / ``.expert_used_count`` (and ``.expert_feed_forward_length`` where the arch
reads the expert width from it). This is what llama.cpp's converter does (``LlamaModel.modify_tensors`` for
Mixtral, ``Qwen2MoeModel.modify_tensors`` for Qwen3-MoE: stack the experts in index order, then name the stack
by gguf-py's tensor map, which knows the per-linear name without the expert index).

A stack holds each expert's blocks one after the other (expert e's rows are rows e·N … (e+1)·N − 1 of the
[E·N, K] data), so a solver's per-expert result is carried into Q4_0 / Q5_0 / Q8_0 exactly, expert by expert.

llama.cpp's MoE architectures fix their routing in code: ``llama`` (Mixtral) and ``qwen3moe`` take softmax
over the router's logits, the top-k, and renormalise the k weights; every layer is a MoE layer; no shared
expert. A model whose config says otherwise (``norm_topk_prob`` false, dense layers between the MoE ones)
computes something else in llama.cpp and is refused by :func:`check_moe_gguf`, as is a MoE family without a
layout here (DeepSeek-V3, Qwen2-MoE …), by :class:`gguf.GGUFLayout`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gguf import MODEL_TENSOR, TENSOR_NAMES, GGUFWriter


@dataclass(frozen=True)
class MoeLayout:
    """How llama.cpp's converter writes a MoE family's experts: the expert width key it writes as ``expert_feed_forward_length`` (None: the arch takes
    ``feed_forward_length``), and the config values without which llama.cpp computes another model
    ({key: (value llama.cpp assumes, whether a missing key means that value)})."""

    expert_width: str | None = None
    fixed: dict[str, tuple[Any, bool]] = field(default_factory=dict)


#: Hugging Face architecture → its expert layout (the Family in gguf.py gives arch, names and the other keys)
MOE_LAYOUTS: dict[str, MoeLayout] = {
    "MixtralForCausalLM": MoeLayout(),
    "Qwen3MoeForCausalLM": MoeLayout(
        expert_width="moe_intermediate_size",
        fixed={"norm_topk_prob": (True, False), "decoder_sparse_step": (1, True), "mlp_only_layers": ([], True)},
    ),
}


def n_experts(config: dict[str, Any]) -> int:
    """The routed expert count, under the first key the config has (the converter's ``find_hparam`` order;
    transformers 5 saves Qwen3-MoE's ``num_experts`` as ``num_local_experts``)."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key) is not None:
            return int(config[key])
    raise ValueError("the config of this MoE model names no expert count (num_local_experts / num_experts)")


def moe_hparams(writer: GGUFWriter, config: dict[str, Any], hf_arch: str) -> None:
    """The expert keys llama.cpp's converter writes (``TextModel.set_gguf_parameters``, ``Qwen2MoeModel``)."""
    moe = MOE_LAYOUTS[hf_arch]
    writer.add_expert_count(n_experts(config))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    if moe.expert_width is not None:
        writer.add_expert_feed_forward_length(int(config[moe.expert_width]))


def expert_index(hf_name: str) -> tuple[str, int] | None:
    """(the name without the expert index, the index) of a per-expert tensor (``…experts.3.w1.weight`` →
    ``…experts.w1.weight``, 3), the name llama.cpp's converter gives a stack; None for any other tensor."""
    parts = hf_name.split(".")
    for i in range(len(parts) - 2):
        if parts[i] == "experts" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 1] + parts[i + 2 :]), int(parts[i + 1])
    return None


def expert_stacks(names: Iterable[str], gguf_name) -> dict[str, list[str]]:
    """{GGUF stack name: the checkpoint's per-expert tensors, by expert index} (``gguf_name``: the layout's
    HF → GGUF naming). Raises ValueError if a stack's experts are not exactly 0 … E − 1."""
    found: dict[str, dict[int, str]] = {}
    for name in names:
        split = expert_index(name)
        if split is None:
            continue
        gname = gguf_name(name)
        if gname is not None:
            found.setdefault(gname, {})[split[1]] = name
    out = {}
    for gname, by_expert in found.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"{gname}: the checkpoint's experts are {sorted(by_expert)}, not 0 … {len(by_expert) - 1}")
        out[gname] = [by_expert[e] for e in range(len(by_expert))]
    return out


def check_moe_gguf(hf_arch: str, config: dict[str, Any], names: Iterable[str], gguf_name) -> None:
    """ValueError naming what llama.cpp would not compute as the model does: a routing or layer pattern
    its architecture fixes otherwise, or a stack whose expert count differs from the config's."""
    moe = MOE_LAYOUTS.get(hf_arch)
    if moe is None:
        return
    for key, (want, missing_ok) in moe.fixed.items():
        if key not in config and missing_ok:
            continue
        if config.get(key) != want:
            raise ValueError(
                f"{hf_arch} with {key}={config.get(key)!r}: llama.cpp's MoE architecture assumes {want!r} "
                "(it would route or compute the experts differently)"
            )
    count = n_experts(config)
    for gname, members in expert_stacks(names, gguf_name).items():
        if len(members) != count:
            raise ValueError(f"{gname}: the checkpoint has {len(members)} experts, the config {count}")


def is_router(gguf_name: str | None) -> bool:
    """Whether a GGUF tensor is a router (``blk.N.ffn_gate_inp``, ``…_shexp``): the converter keeps it F32."""
    if gguf_name is None:
        return False
    base = gguf_name.rpartition(".")[0]
    templates = [TENSOR_NAMES[t] for t in (MODEL_TENSOR.FFN_GATE_INP, MODEL_TENSOR.FFN_GATE_INP_SHEXP)]
    return any(base == t.format(bid=base.split(".")[1]) for t in templates if base.startswith("blk."))
