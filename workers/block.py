"""One decoder block built from its own tensors with the model's own layer class."""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the ModuleList of the model's decoder layers."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise ValueError("cannot find the decoder layers of this model")


def build_block(meta_layer: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A real copy of ``meta_layer`` (a layer on the meta device) holding ``tensors``."""
    import copy

    layer = copy.deepcopy(meta_layer)
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    missing = set(layer.state_dict().keys()) - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks tensors of this block: {sorted(missing)}")
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def block_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The block's linear layers by their name inside the block, in module order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def shared_input_groups(layer: nn.Module, sample: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Linears grouped by the input tensor they read (q/k/v, gate/up …), in execution order.

    Found by running one sample through the block and noting which linears received the
    very same input tensor, so no per-architecture table is needed.
    """
    linears = block_linears(layer)
    # the input tensors are kept alive while the block runs, so identity is unambiguous
    seen: list[tuple[torch.Tensor, list[str]]] = []
    hooks = []

    def hook(name):
        def fn(_module, args):
            for tensor, names in seen:
                if tensor is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))

        return fn

    for name, module in linears.items():
        hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            layer(sample, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return [names for _, names in seen]


def run_block(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The block's output hidden states for one batch."""
    with torch.no_grad():
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
