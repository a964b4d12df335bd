"""Per-group quantization dispatch: one pure function per method, no Ray, no file formats.

A *group* is the stack of linears that read one input (q/k/v, gate/up, or a single linear):
W = [W_1; …; W_m] with W_i [N_i, K], sharing one Hessian H = 2 XᵀX / n of the input X.
:func:`quantize_group` maps one weight matrix to one result by method:

* ``gptq`` / ``awq_gptq``: :func:`workers.gptq.gptq_quantize` on the integer grid of ``spec``;
* ``rtn``: :func:`workers.rtn.rtn_quantize`;
* ``awq``: RTN of the (already scaled) weight after AWQ's per-row clip search
  (:func:`workers.awq.search_clip`, rows in ``options["awq_no_clip_rows"]`` keep ratio 1);
* ``nf4``: bitsandbytes NF4 (:func:`workers.nf4.nf4_quantize`), blocks of ``nf4_blocksize``
  over the flattened weight, optional double quantization;
* ``gptq_nf4``: GPTQ's error feedback onto the NF4 grid (:func:`workers.nf4.gptq_nf4`);
* ``fp8``: E4M3 / E5M2 with per-channel or per-block scales (:func:`workers.fp8.fp8_quantize`).

A part may name a ggml type (llama.cpp's mix gives each linear its own): GPTQ on that type's grid
(:func:`workers.ggml.gptq_ggml`) with the group's Hessian, one linear at a time.

:func:`quantize_parts` solves a group whose parts may differ: every part has its own
:class:`workers.result.QuantSpec` (mixed precision) and may be *kept* (not quantized: named
in ``modules_to_not_convert`` or found outlier-heavy, :func:`workers.int8.int8_skip_modules`).
Integer methods solve the stacked rows of all quantized parts that share a spec at once
(GPTQ's error feedback runs along a row, so rows are independent given H: the stacked
solve equals the per-part solves) and split the result by rows. NF4 and FP8 statistics are
per tensor (the double-quantization offset is the mean absmax of one tensor, FP8 blocks tile
one tensor), so their scales are computed per part, exactly as a reader that quantizes each
linear alone would get them; GPTQ-on-NF4 then solves the stacked rows with those per-part
scales at once (:func:`workers.nf4.gptq_nf4_stacked`), which again equals per-part solves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import torch

from strata_quant.workers.fp8 import FP8Linear, fp8_quantize
from strata_quant.workers.ggml import GGMLQuantized, gptq_ggml, rtn_ggml
from strata_quant.workers.gptq import gptq_quantize
from strata_quant.workers.int8 import int8_skip_modules
from strata_quant.workers.nf4 import NF4Linear, gptq_nf4, gptq_nf4_stacked, nf4_quantize
from strata_quant.workers.result import QuantizedLinear, QuantSpec
from strata_quant.workers.rtn import rtn_quantize

INTEGER_METHODS = ("gptq", "rtn", "awq", "awq_gptq")
NF4_METHODS = ("nf4", "gptq_nf4")
FP8_METHODS = ("fp8",)
METHODS = INTEGER_METHODS + NF4_METHODS + FP8_METHODS
# methods whose solve uses the Hessian of the group's input
HESSIAN_METHODS = ("gptq", "awq_gptq", "gptq_nf4")
KEPT_SCHEMA_VERSION = 1


@dataclass
class KeptLinear:
    """A linear left unquantized (16-bit in the artifact): its weight as the solver saw it.

    ``reason`` is ``"modules_to_not_convert"`` (named in the config) or ``"outliers"`` (its input
    has outlier channels by :func:`workers.int8.outlier_channels`).
    """

    weight: torch.Tensor  # float32 [N, K]
    reason: str
    method: str = "kept"
    params: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {
            "schema": KEPT_SCHEMA_VERSION,
            "kind": "kept",
            "reason": self.reason,
            "method": self.method,
            "params": self.params,
        }
        return {"weight": self.weight.contiguous()}, {"strata_result": json.dumps(meta, sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> KeptLinear:
        meta = json.loads(metadata["strata_result"])
        if meta.get("kind") != "kept" or meta.get("schema") != KEPT_SCHEMA_VERSION:
            raise ValueError("not a kept-linear result of a known schema")
        return cls(weight=tensors["weight"], reason=meta["reason"], method=meta["method"], params=meta["params"])


Result = QuantizedLinear | NF4Linear | FP8Linear | KeptLinear | GGMLQuantized


def result_kind(result: Result) -> str:
    """``int`` (QuantizedLinear), ``nf4``, ``fp8`` or ``kept``."""
    if isinstance(result, QuantizedLinear):
        return "int"
    if isinstance(result, NF4Linear):
        return "nf4"
    if isinstance(result, FP8Linear):
        return "fp8"
    if isinstance(result, KeptLinear):
        return "kept"
    if isinstance(result, GGMLQuantized):
        return "ggml"
    raise TypeError(f"unknown result type {type(result).__name__}")


def result_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Result:
    """The stored result of any kind, by the ``kind`` in its one metadata entry (absent: integer)."""
    if "strata_result" not in metadata:
        raise ValueError("not a strata result (no strata_result metadata)")
    kind = json.loads(metadata["strata_result"]).get("kind", "int")
    if kind == "int":
        return QuantizedLinear.from_tensors(tensors, metadata)
    if kind == "nf4":
        return NF4Linear.from_tensors(tensors, metadata)
    if kind == "fp8":
        return FP8Linear.from_tensors(tensors, metadata)
    if kind == "kept":
        return KeptLinear.from_tensors(tensors, metadata)
    if kind == "ggml":
        return GGMLQuantized.from_tensors(tensors, metadata)
    raise ValueError(f"unknown result kind {kind!r}")


@dataclass(frozen=True)
class Part:
    """One linear of a group: its output rows in the stack, its grid, and whether it is kept."""

    name: str
    rows: int
    spec: QuantSpec
    keep: str | None = None  # None = quantize; else the reason it stays 16-bit
    ggml: str | None = None  # a ggml type (Q4_K …): GPTQ on that type's grid (workers/ggml.py) instead of spec's


def matches_module(full_name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Whether a module named in ``patterns`` is ``full_name`` or contains it: a pattern matches
    a whole run of dotted name components (``down_proj``, ``layers.3``, ``model.layers.0.mlp.up_proj``)."""
    padded = f".{full_name}."
    return any(f".{p.strip('.')}." in padded for p in patterns if p.strip("."))


def spec_with_overrides(base: QuantSpec, full_name: str, overrides: dict[str, dict]) -> QuantSpec:
    """``base`` with the fields of every override whose regex (``re.search``) matches
    ``full_name`` applied in order (later ones win). Unknown fields raise ValueError."""
    import re

    spec = base
    allowed = set(QuantSpec.__dataclass_fields__)
    for pattern, fields in overrides.items():
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"spec override {pattern!r}: unknown QuantSpec field(s) {sorted(unknown)}")
        if re.search(pattern, full_name):
            spec = replace(spec, **fields)
    return spec


def outlier_group(hessian: torch.Tensor | None, sigma: float) -> bool:
    """Whether the group's input has an outlier channel: robust z of rms_c = sqrt(H[c, c] / 2) above
    ``sigma`` (:func:`workers.int8.int8_skip_modules` with the Hessian, count 2)."""
    if hessian is None:
        raise ValueError("outlier detection needs the group's Hessian")
    return bool(int8_skip_modules({"group": {"gram": hessian, "count": 2}}, sigma=sigma))


def quantize_group(
    method: str, weight: torch.Tensor, hessian: torch.Tensor | None, spec: QuantSpec, options: dict
) -> Result:
    """Quantize one weight matrix W [N, K] (a group's stacked rows, or one linear) by ``method``.

    ``hessian`` is H [K, K] of the input (needed by gptq / awq_gptq / gptq_nf4 and by awq's
    clip search). ``options`` (all optional): damp, block_size, act_order, static_groups,
    mse_grid, mse_weight, diag_shrink, true_sequential (GPTQ); awq_clip, awq_grid, awq_clip_search, awq_no_clip_rows [(start, end)]
    (AWQ); nf4_blocksize, double_quant (NF4); fp8_type, fp8_block (FP8).
    """
    if method in HESSIAN_METHODS and hessian is None:
        raise ValueError(f"method {method} needs the Hessian of the input")
    damp = float(options.get("damp", 0.01))
    block_size = int(options.get("block_size", 128))
    mse_grid = int(options.get("mse_grid", 0))
    if method in ("gptq", "awq_gptq"):
        result = gptq_quantize(
            weight,
            hessian,  # type: ignore[arg-type]
            spec,
            damp=damp,
            block_size=block_size,
            act_order=bool(options.get("act_order", False)),
            static_groups=bool(options.get("static_groups", True)),
            mse_grid=mse_grid,
            diag_shrink=float(options.get("diag_shrink", 0.0)),
            mse_weight=str(options.get("mse_weight", "uniform")),
        )
        result.params["true_sequential"] = bool(options.get("true_sequential", True))
        return result
    if method == "rtn":
        return rtn_quantize(weight, spec, mse_grid=mse_grid)
    if method == "awq":
        from strata_quant.workers.awq import apply_clip, clip_ratios

        target = weight
        if options.get("awq_clip", True):
            if hessian is None:
                raise ValueError("awq's clip search needs the Hessian of the scaled input")
            grid, mode = int(options.get("awq_grid", 20)), options.get("awq_clip_search", "two_sided")
            clip_rows = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            for start, end in options.get("awq_no_clip_rows", ()):  # q/k keep their full range (ratio 1)
                clip_rows[start:end] = False
            # every search treats rows apart, so only the clipped rows are searched
            rows = weight[clip_rows]
            if len(rows):
                found = clip_ratios(rows, hessian, spec, mode, grid=grid)
                ratios = torch.ones(weight.shape[0], *found.shape[1:], device=found.device)
                ratios[clip_rows] = found
                target = apply_clip(weight, ratios, spec)
        return rtn_quantize(target, spec, mse_grid=mse_grid)
    blocksize = int(options.get("nf4_blocksize", 64))
    double_quant = bool(options.get("double_quant", True))
    if method == "nf4":
        return nf4_quantize(weight, blocksize=blocksize, double_quant=double_quant)
    if method == "gptq_nf4":
        return gptq_nf4(
            weight,
            hessian,  # type: ignore[arg-type]
            blocksize=blocksize,
            double_quant=double_quant,
            damp=damp,
            block_size=block_size,
        )
    if method == "fp8":
        block = options.get("fp8_block")
        return fp8_quantize(weight, fmt=str(options.get("fp8_type", "e4m3")), block=tuple(block) if block else None)
    raise ValueError(f"unknown quantization method {method!r}; known: {', '.join(METHODS)}")


GGML_METHODS = ("gptq", "rtn")


def quantize_ggml(
    method: str, weight: torch.Tensor, hessian: torch.Tensor, ggml_type: str, options: dict
) -> GGMLQuantized:
    """W [N, K] on llama.cpp type ``ggml_type``'s grid by ``method``: ``gptq`` GPTQ on that grid
    (:func:`workers.ggml.gptq_ggml`, ``options``' damp, diag_shrink and refine_passes), ``rtn``
    importance-weighted rounding with importance diag H (:func:`workers.ggml.rtn_ggml`, what llama-quantize
    makes with an imatrix)."""
    if method == "gptq":
        damp, shrink = float(options.get("damp", 0.01)), float(options.get("diag_shrink", 0.0))
        passes = int(options.get("refine_passes", 0))
        return gptq_ggml(weight, hessian, ggml_type, damp=damp, diag_shrink=shrink, refine_passes=passes)
    if method == "rtn":
        return rtn_ggml(weight, ggml_type, torch.diag(hessian).float())
    raise ValueError(f"ggml type {ggml_type} by method {method!r}: one of {', '.join(GGML_METHODS)}")


def quantize_parts(
    method: str, weight: torch.Tensor, hessian: torch.Tensor | None, parts: list[Part], options: dict
) -> list[Result]:
    """One result per part of the stacked weight (see the module docstring), in ``parts`` order."""
    if sum(p.rows for p in parts) != weight.shape[0]:
        raise ValueError(f"parts cover {sum(p.rows for p in parts)} rows, the weight has {weight.shape[0]}")
    starts, at = [], 0
    for p in parts:
        starts.append(at)
        at += p.rows
    out: list[Result | None] = [None] * len(parts)
    per_tensor = method in ("nf4", "fp8")
    if method == "gptq_nf4":  # per-tensor scales, one stacked error-feedback solve
        idx = [i for i, p in enumerate(parts) if p.keep is None]
        if hessian is None:
            raise ValueError("method gptq_nf4 needs the Hessian of the input")
        solved = (
            gptq_nf4_stacked(
                [weight[starts[i] : starts[i] + parts[i].rows] for i in idx],
                hessian,
                blocksize=int(options.get("nf4_blocksize", 64)),
                double_quant=bool(options.get("double_quant", True)),
                damp=float(options.get("damp", 0.01)),
                block_size=int(options.get("block_size", 128)),
            )
            if idx
            else []
        )
        for i, result in zip(idx, solved):
            out[i] = result
    by_spec: dict[QuantSpec, list[int]] = {}
    for i, p in enumerate(parts):
        rows = weight[starts[i] : starts[i] + p.rows]
        if p.keep is not None:
            out[i] = KeptLinear(weight=rows.float().clone(), reason=p.keep, params={"method": method})
        elif out[i] is not None:  # solved above (gptq_nf4)
            continue
        elif p.ggml is not None:  # each linear on its own type's grid, with the group's H
            if method != "gptq" or hessian is None:
                raise ValueError(f"{p.name}: ggml type {p.ggml} is solved by method gptq with the input's Hessian")
            out[i] = quantize_ggml(method, rows, hessian, p.ggml, options)
        elif per_tensor:
            out[i] = quantize_group(method, rows, hessian, p.spec, options)
        else:
            by_spec.setdefault(p.spec, []).append(i)
    for spec, idx in by_spec.items():
        stacked = torch.cat([weight[starts[i] : starts[i] + parts[i].rows] for i in idx], dim=0)
        opts = dict(options)
        if "awq_no_clip_rows" in options:  # re-map the no-clip rows onto this sub-stack
            no_clip, at = [], 0
            for i in idx:
                lo, hi = starts[i], starts[i] + parts[i].rows
                for s, e in options["awq_no_clip_rows"]:  # a range may cover part of a linear (fused q/k/v)
                    if max(s, lo) < min(e, hi):
                        no_clip.append((at + max(s, lo) - lo, at + min(e, hi) - lo))
                at += parts[i].rows
            opts["awq_no_clip_rows"] = no_clip
        result = quantize_group(method, stacked, hessian, spec, opts)
        at = 0
        for i in idx:
            out[i] = result.rows(at, at + parts[i].rows)  # type: ignore[union-attr]
            at += parts[i].rows
    return out  # type: ignore[return-value]
