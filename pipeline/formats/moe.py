"""Mixture-of-Experts in the safetensors formats (GPTQ, AWQ, compressed-tensors): which reader loads which
family, and the names each writes the experts under.

transformers 5.x builds a MoE block's experts as fused 3-D parameters (``mlp.experts.gate_up_proj``
[E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]); a quantized checkpoint cannot hold those fused (a packed
linear is 2-D), so it keeps one linear per expert, and the readers differ in the names they read:

* compressed-tensors: transformers (with compressed-tensors) reads the per-expert packed linears under the
  checkpoint's own names (Mixtral ``block_sparse_moe.experts.3.w1``, Qwen3-MoE ``mlp.experts.3.gate_proj``),
  decompresses them and converts them into the fused parameters with the family's own conversion mapping;
  vLLM reads the same per-expert names.
* GPTQ (and AWQ): GPTQModel 7.6 replaces the fused experts module by one ``nn.Linear`` per expert and linear
  (its ``defuser``), named as transformers 5 names the parts of the fused matrices: under the module that holds
  the experts (``mlp``, which Mixtral's checkpoint calls ``block_sparse_moe``), ``experts.E.gate_proj`` (rows
  [0, I) of ``gate_up_proj[E]``), ``experts.E.up_proj`` (rows [I, 2I)) and ``experts.E.down_proj``; every
  other tensor under its transformers name. GPTQModel refuses a checkpoint that lacks these names
  ("Missing required quantized weights … mlp.experts.0.down_proj.qweight"). :func:`loader_names` finds the
  names from the model's own conversion mapping (:func:`pipeline.moe.expert_sources`), no per-family table.

:data:`MOE_READERS` says which reader was verified per format and family; anything else is refused at plan
time (:func:`check_moe_format`), before block 0.
"""

from __future__ import annotations

from typing import Any

from strata_quant.pipeline.errors import ConfigError

#: format → {model_type: the reader that loads that format of that family (each checked by a test)}
MOE_READERS: dict[str, dict[str, str]] = {
    "gptq": {
        "mixtral": "GPTQModel 7.6 (per-expert linears mlp.experts.E.gate_proj/up_proj/down_proj)",
        "qwen3_moe": "GPTQModel 7.6 (per-expert linears mlp.experts.E.gate_proj/up_proj/down_proj)",
    },
    "compressed-tensors": {
        "mixtral": "transformers 5 + compressed-tensors (per-expert linears as on disk)",
        "qwen3_moe": "transformers 5 + compressed-tensors (per-expert linears as on disk)",
    },
    "awq": {
        "mixtral": "GPTQModel 7.6 (per-expert linears mlp.experts.E.gate_proj/up_proj/down_proj)",
        "qwen3_moe": "GPTQModel 7.6 (per-expert linears mlp.experts.E.gate_proj/up_proj/down_proj)",
    },
}
#: per-expert linears by their part of the fused matrices: (fused parameter, first row is 0) → name
_PARTS = {("gate_up_proj", True): "gate_proj", ("gate_up_proj", False): "up_proj", ("down_proj", True): "down_proj"}


def is_moe(config: dict[str, Any]) -> bool:
    """Whether the model routes tokens to experts (its config names a routed expert count)."""
    return any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def check_moe_format(fmt: str, config: dict[str, Any]) -> str | None:
    """None for a dense model; for a MoE model the reader that loads ``fmt`` of its family, or ConfigError
    naming the family and the families that format's readers take."""
    if not is_moe(config):
        return None
    if fmt == "gguf":  # the GGUF layout decides (gguf.check_gguf, gguf_moe.MOE_LAYOUTS)
        return "llama.cpp"
    model_type = str(config.get("model_type"))
    readers = MOE_READERS.get(fmt, {})
    if model_type not in readers:
        raise ConfigError(
            f"{fmt} output: no reader loads a {fmt} Mixture-of-Experts {model_type!r} model "
            f"(MoE families in {fmt}: {', '.join(sorted(readers)) or 'none'})"
        )
    return readers[model_type]


def loader_names(meta_model, names: list[str]) -> dict[str, str]:
    """Checkpoint tensor name → the name GPTQModel reads (see the module docstring), for every name that
    differs: per-expert linears as ``<moe module>.experts.E.{gate,up,down}_proj.weight``, other tensors
    renamed as transformers renames them on load (Mixtral ``block_sparse_moe`` → ``mlp``)."""
    from transformers.core_model_loading import rename_source_key

    from strata_quant.pipeline.moe import _conversions, expert_sources
    from strata_quant.workers.moe import experts_modules

    renamings, _, _ = _conversions(meta_model)
    state = meta_model.state_dict()
    out: dict[str, str] = {}
    modules = dict(meta_model.named_modules())
    blocks = {n.rpartition(".experts.")[0].rpartition(".")[0] for n in names if ".experts." in n}
    for block in sorted(blocks):
        if block not in modules or not experts_modules(modules[block]):
            continue
        for disk_name, (param, expert, start, _end) in expert_sources(meta_model, block + ".").items():
            holder, _, fused = param.rpartition(".")
            out[disk_name] = f"{holder}.{expert}.{_PARTS[(fused, start == 0)]}.weight"
    for name in names:
        if name not in out:
            target, _ = rename_source_key(name, renamings, [], meta_model.base_model_prefix, state)
            if target != name:
                out[name] = target
    return out


def defused_names(reader) -> dict[str, str] | None:
    """:func:`loader_names` of a checkpoint's MoE model, keyed by linear (no ``.weight``) as well as by tensor
    name; None for a dense model."""
    if not is_moe(reader.config):
        return None
    from strata_quant.pipeline.structure import meta_model

    model, _, _ = meta_model(reader)
    full = loader_names(model, list(reader.tensor_names))
    return full | {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in full.items()}


class DefusedExperts:
    """Mixed into a format whose reader (GPTQModel) loads a MoE's experts as one linear per expert under the
    names of :func:`loader_names` (GPTQ, AWQ): the format writes them there, its verifier reads them back."""

    def loader_names(self, reader) -> dict[str, str]:
        return defused_names(reader) or {}
