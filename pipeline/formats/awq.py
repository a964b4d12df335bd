"""AWQ GEMM safetensors (quant_method "awq", version "gemm"): packing, unpacking, config.

Layout (FORMATS.md): per quantized Linear ``<m>`` with W [N, K] and group size G,

* ``<m>.qweight`` int32 [K, N/8] — codes packed along the *output* dim;
* ``<m>.qzeros``  int32 [K/G, N/8] — zero points, packed the same way, stored as is;
* ``<m>.scales``  float16 [K/G, N].

Inside word c, nibble p (bits 4p..4p+3) holds column 8c + ORDER[p] with
ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (the interleave the GEMM kernel unpacks in registers).
Dequantize: ``W[n, k] = scales[k // G, n] · (code[k, n] − zero[k // G, n])``.

AWQ is 4-bit with a zero point, and has neither partial groups nor a g_idx. A symmetric
4-bit result is storable too: its zero point is 8 in every group, written as is, and
AWQ readers subtract it like any other zero. What cannot be stored raises ValueError:
bits ≠ 4, G = −1, K % G ≠ 0, N % 8 ≠ 0, and act-order results whose g_idx is not k // G.

The exported scales are the solver's fp16 scales; AWQ's own per-channel activation
scales, if a solver used them, must already be folded into the neighbouring float tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from strata_quant.pipeline.formats.base import IntegerSafetensorsFormat, unquantized_linears
from strata_quant.pipeline.formats.moe import DefusedExperts
from strata_quant.workers.result import QuantizedLinear, QuantSpec

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p of a word holds column 8c + ORDER[p]
PACK = 8  # 4-bit values per int32


def check_storable(result: QuantizedLinear) -> None:
    """Raise ValueError, naming the reason, when AWQ GEMM cannot hold ``result`` exactly."""
    spec = result.spec
    n_rows, n_cols = result.shape
    if spec.bits != 4:
        raise ValueError(f"AWQ GEMM stores 4-bit codes only, got {spec.bits}-bit")
    if spec.group_size == -1:
        raise ValueError("AWQ GEMM needs a positive group_size; G = -1 (one group per row) has no AWQ form")
    if n_cols % spec.group_size:
        raise ValueError(
            f"AWQ has no partial groups: in_features {n_cols} is not a multiple of group_size {spec.group_size}"
        )
    if n_rows % PACK:
        raise ValueError(f"AWQ packs 8 output columns per int32: out_features {n_rows} is not a multiple of 8")
    if not result.groups_in_order:
        raise ValueError(
            "AWQ has no g_idx: this result uses act-order without static groups (g_idx != k // G); "
            "requantize with static_groups, or publish it as GPTQ"
        )


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit values (C % 8 == 0) → int32 [R, C/8] in AWQ's interleaved nibble order.

    Packs in 32-bit words from the values' own dtype (uint8 codes stay uint8): the
    temporaries are two word-sized arrays, half the size of uint8 codes, not int64 copies."""
    v = values.detach().cpu()
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 15):
        raise ValueError("a value does not fit in 4 bits")
    if v.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        v = v.to(torch.int64)
    a = v.numpy()
    rows, cols = a.shape
    grouped = a.reshape(rows, cols // PACK, PACK)
    word = np.zeros((rows, cols // PACK), dtype=np.uint32)
    part = np.empty_like(word)
    for p, col in enumerate(ORDER):
        np.copyto(part, grouped[:, :, col], casting="unsafe")
        np.left_shift(part, np.uint32(4 * p), out=part)
        word |= part
    return torch.from_numpy(word.view(np.int32))  # the same 32 bits as int32


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: int32 [R, C/8] → int64 [R, C]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    rows, n_words = w.shape
    out = torch.empty(rows, n_words, PACK, dtype=torch.int64)
    for p, col in enumerate(ORDER):
        out[:, :, col] = (w >> (4 * p)) & 0xF
    return out.reshape(rows, n_words * PACK)


def pack_linear(result: QuantizedLinear, prefix: str, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of one linear, named ``<prefix>.qweight``, ``.qzeros``, ``.scales``."""
    check_storable(result)
    out = {
        f"{prefix}.qweight": pack_columns(result.codes.t()),  # [K, N/8]
        f"{prefix}.qzeros": pack_columns(result.zeros.t()),  # [nG, N/8]
        f"{prefix}.scales": result.scales.t().contiguous().to(torch.float16),  # [nG, N]
    }
    if bias is not None:
        out[f"{prefix}.bias"] = bias.to(torch.float16)
    return out


def unpack_linear(tensors: dict[str, torch.Tensor], prefix: str, group_size: int) -> torch.Tensor:
    """Dequantized W [N, K] (float32) from the stored tensors, by the FORMATS.md rule."""
    codes = unpack_columns(tensors[f"{prefix}.qweight"])  # [K, N]
    zeros = unpack_columns(tensors[f"{prefix}.qzeros"])  # [nG, N]
    scales = tensors[f"{prefix}.scales"].float()  # [nG, N]
    g = torch.arange(codes.shape[0]) // group_size
    w = scales[g] * (codes.float() - zeros[g].float())  # [K, N]
    return w.t().contiguous()


def quantization_config(spec: QuantSpec) -> dict:
    if spec.bits != 4 or spec.group_size < 1:
        raise ValueError(f"AWQ GEMM needs 4-bit with a positive group_size, got {spec}")
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": spec.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


class AWQFormat(DefusedExperts, IntegerSafetensorsFormat, name="awq"):
    """AWQ GEMM safetensors (4-bit, zero point); unquantized linears in ``modules_to_not_convert``
    (under the names the reader loads: a MoE's for GPTQModel)."""

    verifier = "verify_awq"
    suffix = "awq"
    loader = "transformers AutoModelForCausalLM with autoawq / GPTQModel's AWQ kernels"
    quantize_config_file = True

    def check(self, result: QuantizedLinear, options) -> None:
        check_storable(result)

    def pack_linear(self, result: QuantizedLinear, module: str) -> dict[str, torch.Tensor]:
        return pack_linear(result, module)

    def quantization_config(self, reader, results) -> dict:
        qcfg = quantization_config(self.first.spec)
        kept = [self.rename.get(m, m) for m in unquantized_linears(reader, results)]
        qcfg["modules_to_not_convert"] = kept or None
        return qcfg
