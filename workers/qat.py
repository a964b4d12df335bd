"""Quantization-aware training on strata's integer grids, exported as ordinary results.

:class:`FakeQuantLinear` replaces an ``nn.Linear`` and, in every forward, uses

    s' = fp16↑(s)                       (the fp16 rounding of workers.grids.round_scale)
    q  = clamp(⌊W / s'[g]⌉ + z[g], 0, 2^b − 1),   Ŵ = s'[g] · (q − z[g]),   g = k // G

with straight-through estimators: ∂⌊x⌉/∂x := 1 and ∂fp16↑(s)/∂s := 1 (so gradients reach W
inside the clamp range, and, with learnable scales, reach s as in LSQ, Esser et al., 2020).
Scales start from :func:`workers.grids.group_params` (min/max, or the MSE shrink search);
zero points are integers fixed at initialisation. The forward is computed exactly as
:meth:`workers.result.QuantizedLinear.dequantize` computes it, so :func:`export_results`
returns results whose dequantized weights equal the trained fake-quant weights bit for bit,
and they go through the same formats (GPTQ, AWQ, compressed-tensors, GGUF).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from strata_quant.workers.grids import group_params, group_slices, round_scale
from strata_quant.workers.result import QuantizedLinear, QuantSpec


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _scale_ste(s: torch.Tensor) -> torch.Tensor:
    return s + (round_scale(s.detach()) - s).detach()


class FakeQuantLinear(nn.Module):
    """A linear whose weight is fake-quantized on ``spec``'s grid in every forward (see module doc)."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, learnable_scales: bool = True, mse_grid: int = 0):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())
        w = self.weight.detach()
        slices = group_slices(self.in_features, spec)
        scales, zeros = [], []
        for start, end in slices:
            s, z = group_params(w[:, start:end], spec, mse_grid=mse_grid)
            scales.append(s)
            zeros.append(z)
        scale = torch.stack(scales, dim=1)
        self.register_buffer("zero", torch.stack(zeros, dim=1))
        self.register_buffer(
            "g_idx", torch.tensor([g for g, (a, b) in enumerate(slices) for _ in range(a, b)], dtype=torch.long)
        )
        if learnable_scales:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def used_scale(self) -> torch.Tensor:
        """s' = fp16↑(max(s, 2⁻²⁴)), with the straight-through gradient."""
        return _scale_ste(self.scale.clamp(min=2.0**-24))

    def quantized_weight(self) -> torch.Tensor:
        s = self.used_scale()[:, self.g_idx]
        z = self.zero[:, self.g_idx]
        q = torch.clamp(_round_ste(self.weight / s) + z, 0, self.spec.maxq)
        return s * (q - z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def export(self) -> QuantizedLinear:
        s = self.used_scale().detach()
        sg, zg = s[:, self.g_idx], self.zero[:, self.g_idx]
        codes = torch.clamp(torch.round(self.weight / sg) + zg, 0, self.spec.maxq)
        return QuantizedLinear(
            spec=self.spec,
            codes=codes.to(torch.uint8),
            scales=s.half(),
            zeros=self.zero.to(torch.uint8),
            g_idx=self.g_idx.to(torch.int32),
            method="qat",
            params={"learnable_scales": isinstance(self.scale, nn.Parameter)},
        )


def default_filter(name: str, module: nn.Module) -> bool:
    """The linears strata quantizes: those inside the decoder layers (lm_head stays)."""
    return isinstance(module, nn.Linear) and ".layers." in f".{name}."


def prepare_qat(
    model: nn.Module,
    spec: QuantSpec,
    learnable_scales: bool = True,
    mse_grid: int = 0,
    select: Callable[[str, nn.Module], bool] = default_filter,
) -> nn.Module:
    """Replace (in place) every selected ``nn.Linear`` by a :class:`FakeQuantLinear`; returns ``model``."""
    targets = [(n, m) for n, m in model.named_modules() if select(n, m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FakeQuantLinear(module, spec, learnable_scales, mse_grid))
    return model


def export_results(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The integer result of every FakeQuantLinear, by module name."""
    return {n: m.export() for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
