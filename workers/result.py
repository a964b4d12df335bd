"""The neutral result of quantizing one linear layer, shared by solvers and formats.

A weight W of shape [N, K] (N outputs, K inputs) is stored as

    W[n, k] ≈ scales[n, g_idx[k]] · (codes[n, k] − zeros[n, g_idx[k]])

with integer codes in [0, 2^bits − 1], one scale and one integer zero point per
(output row, input group). Scales are kept in float16 because every published
format stores them that way: the solver rounds them *before* it rounds the weights,
so each format carries exactly the solver's numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class QuantSpec:
    """The integer grid: bits, group size along the input dim (-1 = whole row), symmetry."""

    bits: int = 4
    group_size: int = 64
    sym: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of 2, 3, 4, 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 or positive, got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def sym_zero(self) -> int:
        return 2 ** (self.bits - 1)

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_len(in_features))


@dataclass
class QuantizedLinear:
    """Codes, fp16 scales and integer zeros of one linear, in the original column order."""

    spec: QuantSpec
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float16 [N, nG]
    zeros: torch.Tensor  # uint8 [N, nG]
    g_idx: torch.Tensor  # int32 [K]
    method: str = "rtn"
    perm: torch.Tensor | None = None  # int64 [K], act-order processing order
    params: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def groups_in_order(self) -> bool:
        """Whether g_idx[k] = k // G: each group is G consecutive columns (anything but
        act-order without static groups), the only layout formats without a g_idx can hold."""
        n_cols = self.codes.shape[1]
        g = self.g_idx.long()
        return g.shape == (n_cols,) and torch.equal(
            g, torch.arange(n_cols, device=g.device) // self.spec.group_len(n_cols)
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W[n, k] = scales[n, g_idx[k]] · (codes[n, k] − zeros[n, g_idx[k]]), computed in fp32."""
        n_rows, n_cols = self.codes.shape
        length = self.spec.group_len(n_cols)
        if self.groups_in_order:
            # groups of consecutive columns (no act-order shuffle): broadcast each group's grid
            # over its columns instead of gathering an [N, K] copy of it; IEEE products and
            # differences are the same whichever way round, so the bits match the gather
            out = torch.empty(n_rows, n_cols, dtype=torch.float32, device=self.codes.device)
            whole = n_cols // length  # groups of full length; a partial last one after them
            for first, last in ((0, whole), (whole, self.scales.shape[1])):
                start, end = first * length, min(last * length, n_cols)
                if end > start:
                    view = out[:, start:end].view(n_rows, last - first, -1)
                    view.copy_(self.codes[:, start:end].view(n_rows, last - first, -1))
                    view.sub_(self.zeros[:, first:last].float().unsqueeze(-1))
                    view.mul_(self.scales[:, first:last].float().unsqueeze(-1))
            return out.to(dtype)
        g = self.g_idx.long()
        scale = self.scales.float()[:, g]
        zero = self.zeros.float()[:, g]
        return (scale * (self.codes.float() - zero)).to(dtype)

    def rows(self, start: int, end: int) -> QuantizedLinear:
        """The result for output rows [start, end) — used to split a jointly solved stack."""
        return QuantizedLinear(
            spec=self.spec,
            codes=self.codes[start:end].contiguous(),
            scales=self.scales[start:end].contiguous(),
            zeros=self.zeros[start:end].contiguous(),
            g_idx=self.g_idx,
            method=self.method,
            perm=self.perm,
            params=dict(self.params),
        )

    @staticmethod
    def stack_rows(parts: list[QuantizedLinear]) -> QuantizedLinear:
        """The inverse of :meth:`rows`: row slices of one solve (same grid, g_idx, perm and
        params) stacked back into one result, in order."""
        first = parts[0]
        return QuantizedLinear(
            spec=first.spec,
            codes=torch.cat([p.codes for p in parts]),
            scales=torch.cat([p.scales for p in parts]),
            zeros=torch.cat([p.zeros for p in parts]),
            g_idx=first.g_idx,
            method=first.method,
            perm=first.perm,
            params=dict(first.params),
        )

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata, ready for a safetensors file."""
        tensors = {
            "codes": self.codes.contiguous(),
            "scales": self.scales.contiguous(),
            "zeros": self.zeros.contiguous(),
            "g_idx": self.g_idx.contiguous(),
        }
        if self.perm is not None:
            tensors["perm"] = self.perm.contiguous()
        # one metadata entry: safetensors writes several in no fixed order, and results are
        # compared by hash across runs and worker counts
        metadata = {
            "strata_result": json.dumps(
                {
                    "schema": SCHEMA_VERSION,
                    "bits": self.spec.bits,
                    "group_size": self.spec.group_size,
                    "sym": self.spec.sym,
                    "method": self.method,
                    "params": self.params,
                },
                sort_keys=True,
            )
        }
        return tensors, metadata

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> QuantizedLinear:
        meta = json.loads(metadata["strata_result"])
        if meta.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"unsupported result schema {meta.get('schema')!r}")
        spec = QuantSpec(bits=int(meta["bits"]), group_size=int(meta["group_size"]), sym=bool(meta["sym"]))
        return cls(
            spec=spec,
            codes=tensors["codes"],
            scales=tensors["scales"],
            zeros=tensors["zeros"],
            g_idx=tensors["g_idx"],
            method=meta["method"],
            perm=tensors.get("perm"),
            params=meta["params"],
        )
