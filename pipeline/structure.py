"""The model's decoder-layer structure, from its own transformers class: built on the meta device
(no weights are read) and, at plan time, traced on one random batch.

The driver (:mod:`pipeline.run`) and the plan's child process (:mod:`pipeline.probe`, which
traces a large layer away from the driver) both read it here, so the child never imports the
driver.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from strata_quant.pipeline.checkpoint import CheckpointError, CheckpointReader
from strata_quant.pipeline.errors import ConfigError

log = logging.getLogger("strata.run")


def meta_model(reader: CheckpointReader):
    """The model's own transformers class for config.json, built on the meta device (no weights),
    with the path and the ModuleList of its decoder layers. Refuses an architecture that
    transformers does not build as the causal LM config.json names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from strata_quant.workers.block import decoder_layers

    config_dict = dict(reader.config)
    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise CheckpointError(f"config.json of {str(reader.path)!r} has no model_type")
    archs = sorted(reader.config.get("architectures") or [])
    try:
        config = AutoConfig.for_model(model_type, **config_dict)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        layers_path, layers = decoder_layers(model)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"unsupported architecture {archs or '(none)'}: transformers cannot build model_type {model_type!r} "
            f"as a causal LM from config.json ({str(err).splitlines()[0][:200]})"
        ) from None
    if type(model).__name__ not in archs:
        raise CheckpointError(
            f"unsupported architecture {archs or '(none)'}: for model_type {model_type!r} transformers builds "
            f"{type(model).__name__}"
        )
    return model, layers_path, layers


def expected_block_names(reader: CheckpointReader) -> tuple[str, list[str]]:
    """The decoder layers' path and the tensor names one block must hold, from the model's own
    transformers class built on the meta device (no weights are read)."""
    _, layers_path, layers = meta_model(reader)
    return layers_path, sorted(layers[0].state_dict())


def block_linear_names(reader: CheckpointReader) -> dict[int, list[str]]:
    """Each block's linears (full names, e.g. model.layers.0.self_attn.q_proj) as the model's own
    class builds them: what a block's record must hold, one result each."""
    from strata_quant.pipeline.moe import moe_layout
    from strata_quant.workers.block import block_linears

    model, layers_path, layers = meta_model(reader)
    moe_blocks, sources, _ = moe_layout(model, layers_path)
    return {
        b: [f"{layers_path}.{b}.{n}" for n in [*block_linears(layer), *(sources if b in moe_blocks else ())]]
        for b, layer in enumerate(layers)
    }


@dataclass
class BlockStructure:
    """What the plan learned from tracing the model's decoder layer (:func:`check_block_structure`)."""

    widths: list[int]  # the linears' input widths
    awq_relations: list[dict] | None = None  # AWQ: ScaleGroup.to_dict() per group with a relation
    awq_unfolded: dict[str, str] = field(default_factory=dict)  # AWQ: {"q/k/v": why not}
    moe_blocks: list[int] = field(default_factory=list)  # the blocks holding routed experts
    expert_sources: dict[str, list] = field(default_factory=dict)  # pipeline.moe.moe_layout
    moe_renames: dict[str, str] = field(default_factory=dict)  # pipeline.moe.moe_layout
    ggml_types: dict[str, str] = field(default_factory=dict)  # a llama.cpp mix solved in the run: {linear: type}
    expert_shapes: list[list[int]] = field(default_factory=list)  # [E, H, I] of each MoE module of a MoE block


def check_block_structure(reader: CheckpointReader, awq: bool = False) -> BlockStructure:
    """Trace one random batch through a random copy of the model's decoder layer (its own code,
    :func:`workers.block.trace_block`) and refuse what the run could not handle: a block
    without nn.Linear layers, block weights that are not nn.Linear weights (they would be
    left unquantized: fused expert tensors …), linears the batch never reaches (routed
    experts), a block that does not run. With ``awq``, AWQ's relations are found the same
    way (once, for every block: the relations follow from the code, not the weights) and each
    group without one is said here, once."""
    from strata_quant.pipeline.moe import moe_layout
    from strata_quant.workers.awq import find_scale_groups
    from strata_quant.workers.block import block_linears, probe_layer, trace_block
    from strata_quant.workers.moe import MoeError, experts_modules

    model, layers_path, layers = meta_model(reader)
    name = type(layers[0]).__name__
    linears = block_linears(layers[0])
    if not linears:
        raise CheckpointError(f"unsupported architecture: {name} has no nn.Linear layers to quantize")
    try:
        moe_blocks, sources, renames = moe_layout(model, layers_path)
    except MoeError as err:
        raise CheckpointError(f"unsupported architecture: {name}'s experts: {err}") from None
    fused = {f"{n}.{p}" for layer in layers for n, m in experts_modules(layer).items() for p, _ in m.named_parameters()}
    others = [
        n
        for n, t in layers[0].named_parameters()
        if t.dim() >= 2 and n.rsplit(".", 1)[0] not in linears and n not in fused and not _router(layers[0], n)
    ]
    if others:
        raise CheckpointError(
            f"unsupported architecture: {name} holds weights that are not nn.Linear weights "
            f"({', '.join(others[:4])}); they would be left unquantized"
        )
    try:
        layer, sample, kwargs = probe_layer(model)
    except Exception as err:  # the model's own code refused the probe: say what it said
        raise CheckpointError(f"unsupported architecture: cannot run {name} on a probe batch: {err}") from None
    try:
        trace = trace_block(layer, sample, kwargs)
    except Exception as err:
        raise CheckpointError(f"unsupported architecture: cannot trace a batch through {name}: {err}") from None
    if trace.unreached:
        raise CheckpointError(
            f"unsupported architecture: a batch through {name} never reaches {', '.join(trace.unreached[:4])} "
            "(routed experts are not handled)"
        )
    widths = {m.in_features for m in linears.values()}
    for layer in (layers[b] for b in moe_blocks[:1]):  # the experts' inputs: the hidden state, their intermediate
        widths |= {int(m.gate_up_proj.shape[2]) for m in experts_modules(layer).values()}
        widths |= {int(m.down_proj.shape[2]) for m in experts_modules(layer).values()}
    shapes = [
        [int(m.gate_up_proj.shape[0]), int(m.gate_up_proj.shape[2]), int(m.down_proj.shape[2])]
        for layer in (layers[b] for b in moe_blocks[:1])
        for m in experts_modules(layer).values()
    ]
    out = BlockStructure(
        sorted(widths), moe_blocks=moe_blocks, expert_sources=sources, moe_renames=renames, expert_shapes=shapes
    )
    if awq:
        found, missing = find_scale_groups(layer, trace, sample, kwargs)
        out.awq_relations = [g.to_dict() for g in found]
        for names, why in missing.items():
            log.warning("AWQ: %s will be quantized without scales: %s", "/".join(names), why)
            out.awq_unfolded["/".join(names)] = why
    return out


# the methods a model with routed experts runs (the experts' GPTQ on routed statistics, or RTN)
MOE_METHODS = ("gptq", "rtn")


def check_moe_method(reader: CheckpointReader, method: str) -> None:
    """A model with routed experts runs the methods of :data:`MOE_METHODS` only (refused before the block
    structure is traced: AWQ's relations are not found through experts)."""
    from strata_quant.workers.moe import experts_modules

    _, _, layers = meta_model(reader)
    if method not in MOE_METHODS and any(experts_modules(layer) for layer in layers):
        raise ConfigError(
            f"quant.method {method} is not run on routed experts; a MoE model takes {' or '.join(MOE_METHODS)}"
        )


def _router(layer, name: str) -> bool:
    """Whether parameter ``name`` of ``layer`` is a MoE module's router weight (kept 16-bit): the
    ``weight`` of the ``gate`` of a module that holds fused experts."""
    from strata_quant.workers.moe import moe_modules

    return any(name == f"{moe}.gate.weight" for moe in moe_modules(layer))
