"""GPTQ safetensors (quant_method "gptq"): packing, unpacking and quantization_config.

Layout (FORMATS.md): qweight int32 [K·b/32, N] packed along the input dim, qzeros int32
[nG, N·b/32] packed along the output dim, scales fp16 [nG, N], g_idx int32 [K].
Values are laid out as one little-endian bit stream per column (value i at bit b·i),
which is the plain ``(word >> b·(i % pf)) & mask`` rule for 2/4/8 bits and the
word-straddling stream GPTQ uses for 3 bits. Symmetric results are written as v1
(``checkpoint_format: gptq``, zeros stored as z − 1); asymmetric ones as v2 (z as is),
because v1 cannot hold a zero of 0.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from strata_quant.pipeline.formats.base import IntegerSafetensorsFormat, linear_bits
from strata_quant.pipeline.formats.moe import DefusedExperts
from strata_quant.workers.result import QuantizedLinear, QuantSpec


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ints along axis 0 into int32 words, LSB first: value i at bit bits·i."""
    values = np.asarray(values)
    count = values.shape[0]
    if (count * bits) % 32:
        raise ValueError(f"{count} values of {bits} bits do not fill whole 32-bit words")
    if values.size and (int(values.max()) >= (1 << bits) or int(values.min()) < 0):
        raise ValueError(f"a value does not fit in {bits} bits")
    if 32 % bits == 0:  # whole values per word: 32-bit arithmetic in one reused word-sized temporary
        per_word = 32 // bits
        grouped = values.reshape((count // per_word, per_word) + values.shape[1:])
        words32 = np.zeros((count // per_word,) + values.shape[1:], dtype=np.uint32)
        part = np.empty_like(words32)
        for j in range(per_word):
            np.copyto(part, grouped[:, j], casting="unsafe")
            np.left_shift(part, np.uint32(bits * j), out=part)
            words32 |= part
        return words32.view(np.int32)
    values = values.astype(np.uint64)
    words = np.zeros((count * bits // 32,) + values.shape[1:], dtype=np.uint64)
    for i in range(count):
        bit = bits * i
        word, shift = divmod(bit, 32)
        words[word] |= (values[i] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:
            words[word + 1] |= values[i] >> np.uint64(32 - shift)
    return words.astype(np.uint32).view(np.int32)


def unpack_bits(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values along axis 0."""
    w = np.asarray(words).view(np.uint32).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    out = np.zeros((count,) + w.shape[1:], dtype=np.uint64)
    for i in range(count):
        word, shift = divmod(bits * i, 32)
        v = w[word] >> np.uint64(shift)
        if shift + bits > 32:
            v |= w[word + 1] << np.uint64(32 - shift)
        out[i] = v & mask
    return out.astype(np.int64)


def checkpoint_format(spec: QuantSpec) -> str:
    return "gptq" if spec.sym else "gptq_v2"


def pack_linear(result: QuantizedLinear, prefix: str, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one linear, named ``<prefix>.qweight`` etc."""
    spec = result.spec
    codes = result.codes.numpy()  # uint8 [N, K]
    zeros = result.zeros.numpy().astype(np.int64)  # [N, nG]
    if checkpoint_format(spec) == "gptq":
        zeros = (zeros - 1) & spec.maxq  # v1 stores z − 1 (symmetric z = 2^(b−1), so never −1)
    out = {
        f"{prefix}.qweight": torch.from_numpy(pack_bits(codes.T, spec.bits)),
        f"{prefix}.qzeros": torch.from_numpy(pack_bits(zeros.astype(np.uint64), spec.bits).T.copy()),
        f"{prefix}.scales": result.scales.t().contiguous().to(torch.float16),
        f"{prefix}.g_idx": result.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        out[f"{prefix}.bias"] = bias.to(torch.float16)
    return out


def unpack_linear(tensors: dict[str, torch.Tensor], prefix: str, bits: int, fmt: str) -> torch.Tensor:
    """Dequantized W [N, K] from the stored tensors, by the FORMATS.md rule."""
    qweight = tensors[f"{prefix}.qweight"].numpy()
    qzeros = tensors[f"{prefix}.qzeros"].numpy()
    scales = tensors[f"{prefix}.scales"].float()
    g_idx = tensors[f"{prefix}.g_idx"].long()
    n_cols = g_idx.numel()
    n_rows = scales.shape[1]
    codes = torch.from_numpy(unpack_bits(qweight, bits, n_cols))  # [K, N]
    zeros = torch.from_numpy(unpack_bits(qzeros.T.copy(), bits, n_rows).T.copy())  # [nG, N]
    if fmt == "gptq":
        zeros = (zeros + 1) & ((1 << bits) - 1)
    w = scales[g_idx] * (codes.float() - zeros[g_idx].float())  # [K, N]
    return w.t().contiguous()


def dynamic_pattern(module: str) -> str:
    """GPTQModel's ``dynamic`` key selecting exactly one module: ``+:`` (apply) and an anchored regex."""
    return "+:^" + re.escape(module) + "$"


def dynamic_module_bits(qcfg: dict) -> dict[str, int]:
    """{module: bits} of the ``dynamic`` overrides strata writes (:func:`dynamic_pattern` keys)."""
    out = {}
    for key, fields in (qcfg.get("dynamic") or {}).items():
        m = re.fullmatch(r"\+:\^(.*)\$", key)
        if m is None or set(fields) != {"bits"}:
            raise ValueError(f"unsupported dynamic override {key!r}: {fields}")
        out[re.sub(r"\\(.)", r"\1", m.group(1))] = int(fields["bits"])
    return out


def quantization_config(spec: QuantSpec, params: dict, tool_version: str, dynamic_bits: dict | None = None) -> dict:
    """The ``quantization_config`` of a GPTQ checkpoint. ``dynamic_bits`` ({module: bits}, mixed
    precision) becomes GPTQModel's ``dynamic`` per-module overrides, one ``+:^name$`` key each."""
    fmt = checkpoint_format(spec)
    qcfg = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": bool(params.get("act_order", False)),
        "static_groups": bool(params.get("static_groups", True)),
        "sym": spec.sym,
        "true_sequential": bool(params.get("true_sequential", False)),
        "damp_percent": params.get("damp", 0.01),
        "checkpoint_format": fmt,
        "format": fmt,
        "meta": {
            "quantizer": [f"strata:{tool_version}"],
            "damp_percent": params.get("damp", 0.01),
            "static_groups": bool(params.get("static_groups", True)),
            "true_sequential": bool(params.get("true_sequential", False)),
            "mse_grid": params.get("mse_grid", 0),
        },
    }
    if dynamic_bits:
        qcfg["dynamic"] = {dynamic_pattern(m): {"bits": int(b)} for m, b in sorted(dynamic_bits.items())}
    return qcfg


class GPTQFormat(DefusedExperts, IntegerSafetensorsFormat, name="gptq"):
    """GPTQ safetensors; per-linear widths (mixed precision) go in as ``dynamic`` overrides of
    the majority width; a MoE's experts under the names GPTQModel loads."""

    verifier = "verify_gptq"
    suffix = "gptq"
    loader = "transformers AutoModelForCausalLM with GPTQModel (or optimum)"
    mixed_bits = True
    quantize_config_file = True

    def check(self, result: QuantizedLinear, options) -> None:
        n_rows, n_cols = result.shape  # qweight packs the inputs, qzeros the outputs, into int32 words
        pack_bits(np.zeros((n_cols, 1), np.uint8), result.spec.bits)
        pack_bits(np.zeros((n_rows, 1), np.uint8), result.spec.bits)

    def pack_linear(self, result: QuantizedLinear, module: str) -> dict[str, torch.Tensor]:
        return pack_linear(result, module)

    def quantization_config(self, reader, results) -> dict:
        base, others = linear_bits(results)
        spec = QuantSpec(base, self.first.spec.group_size, self.first.spec.sym)
        return quantization_config(spec, self.first.params, self.options.tool_version, dynamic_bits=others)
