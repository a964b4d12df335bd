"""compressed-tensors "pack-quantized" safetensors: packing, unpacking, quantization_config.

Layout (FORMATS.md, checked against compressed-tensors 0.20's ``pack_to_int32`` and its
``PackedQuantizationCompressor``): per quantized Linear ``<m>`` with W [N, K], b bits,
group size G and nG = K / G,

* ``<m>.weight_packed`` int32 [N, ceil(K·b/32)] — packed along the input dim, value i of
  a row at bit b·i (LSB first), rows padded with zero values to a multiple of 32;
* ``<m>.weight_scale`` [N, nG] in the model dtype (float16 here);
* ``<m>.weight_zero_point`` int32 [ceil(N·b/32), nG], asymmetric only — packed along
  dim 0 (the output dim), same bit order;
* ``<m>.weight_shape`` int64 [2] = [N, K].

The library's integers are signed, q ∈ [−2^(b−1), 2^(b−1) − 1], and packed as
u = q + 2^(b−1); zero points are signed the same way and packed with the same offset.
It dequantizes ``(q − zp) · scale``. Our codes and zeros are unsigned (code = q + 2^(b−1),
zero = zp + 2^(b−1)), so the packed values are exactly our codes and zeros: a symmetric
result (zero 2^(b−1), signed zp 0) needs no zero-point tensor.

What cannot be stored raises ValueError: K % G ≠ 0 (the library rejects partial groups),
act-order results whose g_idx is not k // G (0.20 reads no g_idx), and 3-bit (the packing
of values that straddle words differs between library releases, and vLLM reads 4/8 only).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from strata_quant.pipeline.formats.base import IntegerSafetensorsFormat, unquantized_linears
from strata_quant.pipeline.formats.gptq import pack_bits, unpack_bits
from strata_quant.workers.result import QuantizedLinear, QuantSpec

SUPPORTED_BITS = (2, 4, 8)


def check_storable(result: QuantizedLinear) -> None:
    """Raise ValueError, naming the reason, when pack-quantized cannot hold ``result`` exactly."""
    spec = result.spec
    n_cols = result.shape[1]
    if spec.bits not in SUPPORTED_BITS:
        raise ValueError(
            f"compressed-tensors pack-quantized is written for {SUPPORTED_BITS}-bit results here, got "
            f"{spec.bits}-bit (3-bit word-straddling packing differs between library releases)"
        )
    group = spec.group_len(n_cols)
    if n_cols % group:
        raise ValueError(
            f"compressed-tensors rejects partial groups: in_features {n_cols} is not a multiple of group_size {group}"
        )
    if not result.groups_in_order:
        raise ValueError(
            "compressed-tensors pack-quantized stores no g_idx: this result uses act-order without "
            "static groups (g_idx != k // G); requantize with static_groups, or publish it as GPTQ"
        )
    if spec.sym and not bool((result.zeros == spec.sym_zero).all()):
        raise ValueError(f"a symmetric result must have zero {spec.sym_zero} in every group")


def pack_dim0(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned values along axis 0 (padded with zeros to a multiple of 32 values) into
    int32 words, value i at bit bits·i; ceil(count·bits/32) words."""
    values = np.asarray(values)
    if values.dtype.kind not in "ui":
        values = values.astype(np.uint64)
    count = values.shape[0]
    padded = math.ceil(count / 32) * 32
    if padded != count:  # the values keep their (small) dtype: no 8-byte copy of a weight's codes
        pad = np.zeros((padded - count,) + values.shape[1:], dtype=values.dtype)
        values = np.concatenate([values, pad], axis=0)
    return pack_bits(values, bits)[: math.ceil(count * bits / 32)]


def unpack_dim0(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_dim0`: ``count`` unsigned values along axis 0."""
    return unpack_bits(words, bits, count)


def pack_linear(result: QuantizedLinear, prefix: str, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one linear, named ``<prefix>.weight_packed`` etc."""
    check_storable(result)
    spec = result.spec
    codes = result.codes.cpu().numpy()  # [N, K], u = q + 2^(b-1) already
    packed = pack_dim0(codes.T, spec.bits).T.copy()  # [N, ceil(K·b/32)]
    out = {
        f"{prefix}.weight_packed": torch.from_numpy(packed),
        f"{prefix}.weight_scale": result.scales.to(torch.float16).contiguous(),
        f"{prefix}.weight_shape": torch.tensor(list(result.shape), dtype=torch.int64),
    }
    if not spec.sym:
        zeros = result.zeros.cpu().numpy()  # [N, nG]
        out[f"{prefix}.weight_zero_point"] = torch.from_numpy(pack_dim0(zeros, spec.bits))
    if bias is not None:
        out[f"{prefix}.bias"] = bias.to(torch.float16)
    return out


def unpack_linear(tensors: dict[str, torch.Tensor], prefix: str, bits: int, sym: bool) -> torch.Tensor:
    """Dequantized W [N, K] (float32) from the stored tensors, by the FORMATS.md rule."""
    n_rows, n_cols = (int(v) for v in tensors[f"{prefix}.weight_shape"])
    scales = tensors[f"{prefix}.weight_scale"].float()  # [N, nG]
    codes = unpack_dim0(tensors[f"{prefix}.weight_packed"].numpy().T.copy(), bits, n_cols).T  # [N, K]
    if sym:
        zeros = np.full(scales.shape, 1 << (bits - 1), dtype=np.int64)
    else:
        zeros = unpack_dim0(tensors[f"{prefix}.weight_zero_point"].numpy(), bits, n_rows)  # [N, nG]
    g = torch.arange(n_cols) // (n_cols // scales.shape[1])
    w = scales[:, g] * (torch.from_numpy(codes).float() - torch.from_numpy(zeros).float()[:, g])
    return w.contiguous()


def quantization_config(spec: QuantSpec, params: dict | None = None) -> dict:
    """The ``quantization_config`` of config.json; ``G = -1`` is written as strategy "channel"."""
    params = params or {}
    if spec.bits not in SUPPORTED_BITS:
        raise ValueError(f"compressed-tensors pack-quantized is written for {SUPPORTED_BITS}-bit, got {spec.bits}")
    act_order = bool(params.get("act_order", False))
    weights = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.sym,
        "strategy": "group" if spec.group_size != -1 else "channel",
        "group_size": spec.group_size if spec.group_size != -1 else None,
        "actorder": "static" if act_order else None,
        "dynamic": False,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


class CompressedTensorsFormat(IntegerSafetensorsFormat, name="compressed-tensors"):
    """compressed-tensors "pack-quantized" safetensors of integer results; unquantized linears under ``ignore``."""

    verifier = "verify_compressed_tensors"
    suffix = "compressed-tensors"
    loader = "transformers AutoModelForCausalLM with compressed-tensors (vLLM)"

    def check(self, result: QuantizedLinear, options) -> None:
        check_storable(result)

    def pack_linear(self, result: QuantizedLinear, module: str) -> dict[str, torch.Tensor]:
        return pack_linear(result, module)

    def quantization_config(self, reader, results) -> dict:
        qcfg = quantization_config(self.first.spec, self.first.params)
        qcfg["ignore"] = ["lm_head", *unquantized_linears(reader, results)]
        return qcfg
