"""The inputs of every decoder layer, captured with the model's own code: the embedding and every
layer's arguments (attention masks, rotary tables) exactly as the model computes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from strata_quant.workers.block import materialize_buffers
from strata_quant.workers.stats import StopForward


class _Catcher(nn.Module):
    """Stands in for a decoder layer and records what the model feeds it: the hidden states
    pass through unchanged, so every layer's catcher sees the arguments of its own layer
    (the attention mask and rotary tables of its layer type: Gemma's sliding-window layers);
    the last one stops the forward."""

    def __init__(self, last: bool):
        super().__init__()
        self.last = last
        self.captured: tuple[torch.Tensor, dict] | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.captured = (hidden_states, kwargs)
        if self.last:
            raise StopForward
        return hidden_states


def to_device(obj, device: torch.device):
    """``obj`` (a tensor, or tuples / lists / dicts of them) on ``device``; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class Captured:
    """The first layer's input per batch with its layer's arguments (``batches``), and each layer's
    arguments kept once per variant: ``layer_kwargs[variant][batch]``, layer i's variant
    ``kwargs_variant[i]`` (the layers of one type share their mask and rotary tables: the same
    objects)."""

    batches: list[tuple[torch.Tensor, dict]]
    layer_kwargs: list[list[dict]]
    kwargs_variant: list[int]


def input_embedding_name(model: nn.Module) -> str:
    """The checkpoint name of the model's input embedding weight."""
    embed = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is embed) + ".weight"


def capture_inputs(
    model: nn.Module,
    layers_path: str,
    layers: nn.ModuleList,
    config,
    embedding: torch.Tensor,
    token_ids: torch.Tensor,
    batch_size: int,
    hidden_dtype: torch.dtype,
    device: torch.device,
) -> Captured:
    """Run ``token_ids`` through a meta ``model`` whose input embedding gets ``embedding`` and whose
    decoder ``layers`` are stood in for by catchers (the forward stops at the last): each batch's
    first hidden states (kept in ``hidden_dtype``) and every layer's arguments, on ``device``. The
    rotary embeddings are rebuilt from ``config`` (a meta module computes no tables); ``layers``
    and the embedding are as they were afterwards."""
    materialize_buffers(model, layers_path)  # before the embedding gets its weights
    embed = model.get_input_embeddings()
    embed.weight = nn.Parameter(embedding.float(), requires_grad=False)
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, type(module)(config=config))
    originals = list(layers)
    catchers = [_Catcher(last=i == len(originals) - 1) for i in range(len(originals))]
    for i, catcher in enumerate(catchers):
        layers[i] = catcher
    captured = Captured([], [], [0] * len(originals))
    try:
        for start in range(0, token_ids.shape[0], batch_size):
            try:
                with torch.no_grad():
                    model(input_ids=token_ids[start : start + batch_size], use_cache=False)
            except StopForward:
                pass
            hidden = catchers[0].captured[0].detach().to(hidden_dtype)
            _keep_arguments(captured, catchers, device)
            captured.batches.append((hidden.to(device), captured.layer_kwargs[0][-1]))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        embed.to("meta")
    return captured


def _keep_arguments(captured: Captured, catchers: list[_Catcher], device: torch.device) -> None:
    """One batch's arguments of every layer, each distinct set (by object identity) kept once."""
    variants: dict[tuple, int] = {}
    for i, catcher in enumerate(catchers):
        kwargs = {k: v for k, v in catcher.captured[1].items() if k not in ("past_key_values", "cache")}
        key = tuple((k, id(v)) for k, v in sorted(kwargs.items()))
        if key not in variants:
            variants[key] = len(variants)
            if len(captured.layer_kwargs) < len(variants):
                captured.layer_kwargs.append([])
            captured.layer_kwargs[variants[key]].append(to_device(kwargs, device))
        captured.kwargs_variant[i] = variants[key]
