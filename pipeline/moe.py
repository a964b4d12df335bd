"""A Mixture-of-Experts block's checkpoint tensors ↔ the module the block builds.

A MoE checkpoint stores one tensor per expert and linear (Mixtral's
``block_sparse_moe.experts.N.w1.weight``, Qwen3-MoE's and DeepSeek-V3's
``mlp.experts.N.gate_proj.weight``); transformers 5.x builds fused 3-D parameters
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) and converts
between the two with the family's conversion mapping (``transformers.conversion_mapping``:
renamings, then ``MergeModulelist`` / ``Concatenate`` converters). Both directions here run
that same machinery on one block's tensors, so no family needs a table of its own:

* :func:`block_state` — a block's checkpoint tensors → the model's parameter names and shapes,
  exactly what ``from_pretrained`` would put in that block;
* :func:`checkpoint_names` — the checkpoint names a block's parameters come from (the reverse
  conversion applied to the meta block), which is what a plan checks before block 0.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from strata_quant.pipeline.checkpoint import CheckpointError


def _conversions(meta_model: nn.Module) -> tuple[list, list, dict]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    mapping = get_model_conversion_mapping(meta_model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    return renamings, converters, by_pattern


def block_state(meta_model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (full names, e.g. one block's) → the same weights under the model's own
    parameter names, converted as ``from_pretrained`` converts them (experts stacked and gate/up
    concatenated by the family's conversion mapping). Raises CheckpointError for a tensor the model
    has no place for, or a converted shape the model does not expect (an expert missing)."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters, by_pattern = _conversions(meta_model)
    meta = meta_model.state_dict()
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, object] = {}
    # the converters stack tensors in the order they are added: transformers adds them in natural order
    for key in sorted(tensors, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, meta_model.base_model_prefix, meta)
        if target not in meta:
            raise CheckpointError(f"checkpoint tensor {key!r} has no place in {type(meta_model).__name__}")
        if pattern is None:
            out[target] = tensors[key]
            continue
        converter = pending.setdefault(target, copy.deepcopy(by_pattern[pattern]))
        converter.add_tensor(target, key, pattern, tensors[key])
    for first, converter in pending.items():
        try:
            converted = converter.convert(first, model=meta_model, config=meta_model.config)
        except (RuntimeError, ValueError) as err:  # e.g. experts' tensors of unequal count or shape
            raise CheckpointError(f"cannot convert the checkpoint's tensors into {first}: {err}") from err
        for name, value in converted.items():
            out[name] = value[0] if isinstance(value, list) else value
    for name, value in out.items():
        if tuple(value.shape) != tuple(meta[name].shape):
            raise CheckpointError(
                f"{name} converts to shape {tuple(value.shape)} from the checkpoint, the model expects "
                f"{tuple(meta[name].shape)}"
            )
    return out


def checkpoint_names(meta_model: nn.Module, prefix: str) -> list[str]:
    """The checkpoint tensor names that the model's parameters under ``prefix`` (e.g.
    ``model.layers.3.``) load from: the family's conversion mapping reversed, as ``save_pretrained``
    writes them (shapes only: the meta tensors are never read)."""
    from transformers.core_model_loading import revert_weight_conversion

    meta = {k: v for k, v in meta_model.state_dict().items() if k.startswith(prefix)}
    return sorted(revert_weight_conversion(meta_model, meta))


def check_block_names(meta_model: nn.Module, prefix: str, names: list[str] | set[str]) -> None:
    """CheckpointError naming every tensor of the block under ``prefix`` that ``names`` (the
    checkpoint's tensor names) lacks: a missing expert is found at plan time, not when its block
    is converted."""
    have = set(names)
    missing = [n for n in checkpoint_names(meta_model, prefix) if n not in have]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) of {prefix.rstrip('.')}: {shown}")


def build_moe_block(
    meta_model: nn.Module, layers_path: str, b: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> nn.Module:
    """Block ``b`` as a real module: its checkpoint tensors (full names) converted by
    :func:`block_state` and loaded into a copy of the meta model's layer."""
    from strata_quant.workers.block import build_block

    prefix = f"{layers_path}.{b}."
    state = block_state(meta_model, tensors)
    outside = [n for n in state if not n.startswith(prefix)]
    if outside:
        raise CheckpointError(f"tensors outside block {b} given to its build: {outside[:3]}")
    layer = dict(meta_model.named_modules())[f"{layers_path}.{b}"]
    return build_block(layer, {k[len(prefix) :]: v for k, v in state.items()}, dtype)


def check_checkpoint_experts(meta_model: nn.Module, layers_path: str, names: list[str] | set[str]) -> None:
    """:func:`check_block_names` for every block of a model whose blocks hold fused experts, at plan
    time: the first block that lacks a tensor is named with what it lacks."""
    from strata_quant.workers.moe import experts_modules

    have = set(names)
    layers = dict(meta_model.named_modules())[layers_path]
    for b, layer in enumerate(layers):
        if experts_modules(layer):
            check_block_names(meta_model, f"{layers_path}.{b}.", have)


def expert_sources(meta_model: nn.Module, prefix: str) -> dict[str, tuple[str, int, int, int]]:
    """Where each per-expert checkpoint tensor of the block under ``prefix`` lives in the fused
    parameters: checkpoint name → (parameter name, expert e, first row, end row), so that
    rows [first, end) of ``param[e]`` are that tensor (gate and up are row ranges of
    ``gate_up_proj[e]``). Found without a table: the reverse conversion is run on label tensors
    (each row of each expert carrying its own index), and the labels that land in each checkpoint
    tensor say which rows it took. A writer names a quantized expert's linears from this."""
    from transformers.core_model_loading import revert_weight_conversion

    from strata_quant.workers.moe import MoeError, experts_modules

    params = {}
    for name, experts in experts_modules(dict(meta_model.named_modules())[prefix.rstrip(".")]).items():
        for pname, p in experts.named_parameters(recurse=False):
            if p.dim() == 3:
                params[f"{prefix}{name}.{pname}"] = p.shape
    # globally distinct labels: param i's rows are base_i + e·rows + r
    labels, bases, base = {}, [], 0
    for n, shape in params.items():
        labels[n] = (base + torch.arange(shape[0] * shape[1], dtype=torch.int64)).reshape(shape[0], shape[1], 1)
        bases.append((base, n))
        base += shape[0] * shape[1]
    out: dict[str, tuple[str, int, int, int]] = {}
    for disk_name, tensor in revert_weight_conversion(meta_model, labels).items():
        flat = tensor.reshape(-1)
        first = int(flat[0]) if flat.numel() else -1
        offset, source = max(((b, n) for b, n in bases if b <= first), default=(0, None))
        if source is None or not torch.equal(flat, torch.arange(first, first + flat.numel())):
            raise MoeError(f"{disk_name} is not a row range of one expert of a fused parameter")
        rows = params[source][1]
        expert, start = divmod(first - offset, rows)
        if start + flat.numel() > rows:
            raise MoeError(f"{disk_name} spans more than one expert of {source}")
        out[disk_name] = (source, expert, start, start + flat.numel())
    return out


def expert_linears(sources: dict[str, tuple[str, int, int, int]], solved: dict[tuple[str, int], object]) -> dict:
    """Per-expert linears under the checkpoint's own names (``…experts.3.w1`` for Mixtral,
    ``…experts.3.gate_proj`` for Qwen3-MoE / DeepSeek-V3), cut from the results solved per
    fused matrix: ``solved[(param, e)]`` is expert e's result for parameter ``param`` (gate and
    up stacked, one solve: rows are independent given the shared Hessian), and each checkpoint
    tensor takes its rows of it (:func:`expert_sources`) through ``result.rows(start, end)``."""
    out = {}
    for disk_name, (param, expert, start, end) in sources.items():
        if (param, expert) not in solved:
            raise KeyError(f"no result for expert {expert} of {param} (needed by {disk_name})")
        out[disk_name.removesuffix(".weight")] = solved[(param, expert)].rows(start, end)
    return out


def moe_layout(meta_model: nn.Module, layers_path: str) -> tuple[list[int], dict[str, list], dict[str, str]]:
    """What a worker needs to build a MoE block from its checkpoint tensors, as data: the blocks that hold
    fused experts; each per-expert checkpoint linear of such a block (name inside the block, e.g.
    ``block_sparse_moe.experts.3.w1``) → [fused parameter inside the block, e, first, end]
    (:func:`expert_sources`); and the block's other tensors the family renames, checkpoint name → the
    model's (Mixtral's router ``block_sparse_moe.gate.weight`` → ``mlp.gate.weight``). Found on the first
    and the last such block (a reverse conversion each); they must agree."""
    from transformers.core_model_loading import revert_weight_conversion

    from strata_quant.workers.moe import MoeError, experts_modules

    layers = dict(meta_model.named_modules())[layers_path]
    blocks = [b for b, layer in enumerate(layers) if experts_modules(layer)]
    layout: tuple[dict, dict] | None = None
    for b in blocks[:1] + blocks[-1:]:
        prefix = f"{layers_path}.{b}."
        sources = {
            name.removeprefix(prefix).removesuffix(".weight"): [param.removeprefix(prefix), e, first, end]
            for name, (param, e, first, end) in expert_sources(meta_model, prefix).items()
        }
        renames = {}
        for name, tensor in layers[b].state_dict().items():
            if tensor.dim() == 3:
                continue
            (disk,) = revert_weight_conversion(meta_model, {prefix + name: tensor})
            if disk != prefix + name:
                renames[disk.removeprefix(prefix)] = name
        if layout is not None and (sources, renames) != layout:
            raise MoeError(f"block {b}'s experts are not laid out as block {blocks[0]}'s")
        layout = (sources, renames)
    return blocks, *(layout or ({}, {}))


def block_checkpoint_names(meta_model: nn.Module, layers_path: str, b: int) -> list[str]:
    """The checkpoint names of block ``b``'s tensors, inside the block (the family's conversion reversed)."""
    prefix = f"{layers_path}.{b}."
    return [n.removeprefix(prefix) for n in checkpoint_names(meta_model, prefix)]


def check_expert_budget(
    max_expert_stats: int, expert_shapes: list[list[int]], node_bytes: float, gpu_bytes: dict[int, int] | None = None
) -> None:
    """Refuse a statistics budget that cannot be kept: a worker holds at most ``max_expert_stats``
    experts' statistics, min(budget, E) · 8·(H² + I²) bytes for the widest MoE module ([E, H, I]
    each), which must fit in ``node_bytes`` (the Ray cluster's smallest node: a worker may land
    on any) and, where workers run on GPUs, in each one's free GPU memory (``gpu_bytes``: {rank:
    bytes}, as the workers report it before block 0; the statistics live on the GPU). The budget
    is at least one (the config refuses less)."""
    from strata_quant.pipeline.errors import ConfigError
    from strata_quant.workers.moe import expert_statistics_bytes

    if max_expert_stats < 1:
        raise ConfigError(f"quant.moe.max_expert_stats must be at least 1, got {max_expert_stats}")
    for experts, hidden, intermediate in expert_shapes:
        held = min(max_expert_stats, experts) * expert_statistics_bytes(hidden, intermediate)
        if held > node_bytes:
            raise ConfigError(
                f"quant.moe.max_expert_stats={max_expert_stats}: {min(max_expert_stats, experts)} experts' "
                f"statistics at hidden {hidden}, intermediate {intermediate} take {_size(held)}, more than "
                f"the {_size(node_bytes)} of the Ray cluster's smallest node (lower the budget)"
            )
        for rank, free in sorted((gpu_bytes or {}).items()):
            if held > free:
                raise ConfigError(
                    f"quant.moe.max_expert_stats={max_expert_stats}: {min(max_expert_stats, experts)} experts' "
                    f"statistics at hidden {hidden}, intermediate {intermediate} take {_size(held)}, more than "
                    f"the {_size(free)} free on worker {rank}'s GPU (lower the budget)"
                )


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"
