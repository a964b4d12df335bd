"""FP8 weight quantization (E4M3 / E5M2) with per-channel or per-block scales.

For a weight W [N, K] and a format with largest finite value F (E4M3: 448, E5M2: 57344):

* per-channel: one scale per output row, s[n] = max_k |W[n, k]| / F, shape [N, 1];
* per-block (bn × bk, e.g. 128 × 128): s[i, j] = max |W[block i, j]| / F, shape
  [⌈N/bn⌉, ⌈K/bk⌉] (the last blocks may be partial);

and q = fp8(clamp(W / s, −F, F)) with IEEE round-to-nearest-even (torch's cast to
``float8_e4m3fn`` / ``float8_e5m2``), Ŵ = float(q) · s in fp32. An all-zero row or block
gets s = 1. Scales are stored in float32 by default; with ``scale_dtype=torch.bfloat16``
(or float16) the scale is rounded *up* to that dtype before the weights are divided by it,
so the stored scale is exactly the one used and nothing overflows F.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

FP8_FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "e4m3": (torch.float8_e4m3fn, 448.0),
    "e5m2": (torch.float8_e5m2, 57344.0),
}


def _round_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The least value of ``dtype`` ≥ scale (fp32 in and out)."""
    if dtype == torch.float32:
        return scale
    low = scale.to(dtype)
    below = low.float() < scale
    low = torch.where(below, torch.nextafter(low, torch.full_like(low, float("inf"))), low)
    return low.float()


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None) -> torch.Tensor:
    """The scale of every weight element, [N, K] (fp32)."""
    n_rows, n_cols = shape
    s = scale.float()
    if block is None:
        return s.expand(n_rows, n_cols)
    bn, bk = block
    return s.repeat_interleave(bn, dim=0)[:n_rows].repeat_interleave(bk, dim=1)[:, :n_cols]


@dataclass
class FP8Linear:
    """FP8 codes of one linear and their scales (channel [N, 1] or block [⌈N/bn⌉, ⌈K/bk⌉])."""

    weight: torch.Tensor  # float8 [N, K]
    scale: torch.Tensor  # float32 / bfloat16 / float16
    fmt: str = "e4m3"
    block: tuple[int, int] | None = None  # None = per-channel

    @property
    def strategy(self) -> str:
        return "channel" if self.block is None else "block"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ = float(q) · s, computed in fp32."""
        return (self.weight.float() * expand_scale(self.scale, self.shape, self.block)).to(dtype)

    def bits_per_weight(self) -> float:
        n = self.weight.numel()
        return (8 * n + self.scale.numel() * self.scale.element_size() * 8) / n

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {"schema": 1, "kind": "fp8", "fmt": self.fmt, "block": list(self.block) if self.block else None}
        return {"weight": self.weight, "scale": self.scale}, {"strata_result": json.dumps(meta, sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> FP8Linear:
        meta = json.loads(metadata["strata_result"])
        block = tuple(meta["block"]) if meta["block"] else None
        return cls(weight=tensors["weight"], scale=tensors["scale"], fmt=meta["fmt"], block=block)  # type: ignore[arg-type]


def fp8_quantize(
    weight: torch.Tensor,
    fmt: str = "e4m3",
    block: tuple[int, int] | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> FP8Linear:
    """Quantize W [N, K] to FP8 with per-channel (``block=None``) or per-block absmax / F scales."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 format must be one of {sorted(FP8_FORMATS)}, got {fmt!r}")
    fp8_dtype, fmax = FP8_FORMATS[fmt]
    w = weight.float()
    n_rows, n_cols = w.shape
    if block is None:
        amax = w.abs().amax(dim=1, keepdim=True)
    else:
        bn, bk = block
        pn, pk = math.ceil(n_rows / bn) * bn, math.ceil(n_cols / bk) * bk
        padded = torch.zeros(pn, pk, dtype=torch.float32, device=w.device)
        padded[:n_rows, :n_cols] = w.abs()
        amax = padded.view(pn // bn, bn, pk // bk, bk).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    scale = _round_up(scale, scale_dtype)
    q = torch.clamp(w / expand_scale(scale, (n_rows, n_cols), block), -fmax, fmax).to(fp8_dtype)
    return FP8Linear(weight=q, scale=scale.to(scale_dtype), fmt=fmt, block=block)
