"""GGUF (llama.cpp / Ollama) export for Llama models: names, Q/K permutation, exact Q4_0/Q8_0 blocks,
byte-level BPE tokenizer metadata and a streaming file writer built on gguf-py's ``GGUFWriter``.

See the GGUF section of FORMATS.md. The writer never holds more than one tensor's data:

    w = GGUFStreamWriter(path, hf_config, tokenizer_dir)
    for name, ggml_type, shape in descriptors:
        w.add_tensor_info(name, ggml_type, shape)
    w.write_header()
    for name, array in arrays:        # same order as the infos
        w.write_data(name, array)
    w.close()
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    RopeScalingType,
    TokenType,
    get_tensor_name_map,
)
from gguf.quants import quant_shape_to_byte_shape

from strata_quant.pipeline.errors import ConfigError
from strata_quant.pipeline.formats import gguf_moe
from strata_quant.pipeline.formats.base import AssembleError, Format, dequantize_half, linear_bits
from strata_quant.pipeline.formats.gguf_quants import pack
from strata_quant.workers.ggml import GRIDS, GGMLQuantized, rtn_ggml
from strata_quant.workers.result import QuantizedLinear

QK = 32  # values per Q4_0 / Q8_0 block

_FLOAT_DTYPES = {
    GGMLQuantizationType.F32: np.dtype(np.float32),
    GGMLQuantizationType.F16: np.dtype(np.float16),
}

T = TypeVar("T", torch.Tensor, np.ndarray)


class GGUFError(ConfigError):
    """A model (architecture, rope type, tensor, tokenizer) this GGUF writer cannot write as llama.cpp reads it."""


# ----------------------------------------------------------------------------------------------- families


def _text_hparams(writer: GGUFWriter, config: dict[str, Any]) -> None:
    """The keys every text model gets in llama.cpp's converter (``TextModel.set_gguf_parameters``)."""
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(_n_head(config))
    writer.add_head_count_kv(_n_kv(config))
    _add_rope_scaling(writer, config)
    writer.add_rope_freq_base(_rope_theta(config))
    if (local := _local_rope_theta(config)) is not None:
        writer.add_rope_freq_base_swa(local)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if config.get("head_dim") is not None:
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))


def _llama_hparams(writer: GGUFWriter, config: dict[str, Any]) -> None:
    """``LlamaModel``: the text keys, the vocabulary size and the rotary width (one head)."""
    _text_hparams(writer, config)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(_head_dim(config))


def _gemma3_hparams(writer: GGUFWriter, config: dict[str, Any]) -> None:
    """``Gemma3Model``: the text keys, head width as key/value length, the sliding window and which layers use it
    (llama.cpp assumes every 6th layer global unless the per-layer pattern is written), final soft-capping."""
    _text_hparams(writer, config)
    if config.get("head_dim") is None:  # else written already
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    swa = _sliding_layers(config)
    if any(swa):
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern(swa)


def _phi3_hparams(writer: GGUFWriter, config: dict[str, Any]) -> None:
    """``Phi3MiniModel``: its own key set (no rope scaling type; the original context length; a rotary width of
    partial_rotary_factor · hidden / heads; sliding window 0 when the model has none)."""
    n_embd, n_head = int(config["hidden_size"]), _n_head(config)
    rope = rope_parameters(config)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_rope_scaling_orig_ctx_len(_original_context(config))
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(_n_kv(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(int(float(rope.get("partial_rotary_factor", 1.0)) * n_embd) // n_head)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_sliding_window(int(config.get("sliding_window") or 0))
    if _rope_type(rope) == "longrope":
        writer.add_rope_scaling_attn_factors(_longrope_attn_factor(config))


@dataclass(frozen=True)
class Family:
    """How llama.cpp's converter (convert_hf_to_gguf.py, one model class per Hugging Face architecture) writes a
    family: its GGUF architecture, whether Q/K rows go to llama.cpp's rotary order, the shift added to norm weights,
    the rope scaling types it writes, and its metadata keys. Names come from gguf-py's tensor map of ``arch``."""

    arch: MODEL_ARCH
    hparams: Callable[[GGUFWriter, dict[str, Any]], None] = _text_hparams
    permute_qk: bool = False
    norm_shift: float = 0.0
    rope_types: tuple[str, ...] = ("linear", "yarn")
    sliding_window: bool = False


#: tensors the converter drops: llama.cpp computes them
SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")

_LLAMA = Family(MODEL_ARCH.LLAMA, _llama_hparams, permute_qk=True, rope_types=("linear", "yarn", "llama3"))
#: Hugging Face architecture → its converter class's choices; Mistral is written as llama (as the converter does)
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "MixtralForCausalLM": _LLAMA,  # experts and their keys: gguf_moe.MOE_LAYOUTS
    "Qwen2ForCausalLM": Family(MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": Family(MODEL_ARCH.QWEN3),
    "Qwen3MoeForCausalLM": Family(MODEL_ARCH.QWEN3MOE),
    # Gemma3RMSNorm computes x·(1 + w), llama.cpp x·w
    "Gemma3ForCausalLM": Family(
        MODEL_ARCH.GEMMA3, _gemma3_hparams, norm_shift=1.0, rope_types=("linear",), sliding_window=True
    ),
    "Phi3ForCausalLM": Family(MODEL_ARCH.PHI3, _phi3_hparams, rope_types=("longrope",), sliding_window=True),
}


def _n_head(config: dict[str, Any]) -> int:
    return int(config["num_attention_heads"])


def _n_kv(config: dict[str, Any]) -> int:
    return int(config.get("num_key_value_heads") or _n_head(config))


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or int(config["hidden_size"]) // _n_head(config))


def _sliding_layers(config: dict[str, Any]) -> list[bool]:
    """Per layer, whether it attends through the sliding window (``layer_types``; none when the config has no
    window)."""
    if not config.get("sliding_window"):
        return [False] * int(config["num_hidden_layers"])
    kinds = config.get("layer_types") or ["sliding_attention"] * int(config["num_hidden_layers"])
    return [k == "sliding_attention" for k in kinds]


@functools.lru_cache(maxsize=16)
def _tensor_map(arch: MODEL_ARCH, n_blocks: int) -> Any:
    return get_tensor_name_map(arch, n_blocks)


class GGUFLayout:
    """One model as llama.cpp reads it: architecture, tensor names, Q/K rotary order, norm shifts, metadata and the
    tensors the converter generates (rope_freqs for llama3 rope, rope_factors_* for Phi-3 longrope)."""

    def __init__(self, config: dict[str, Any]):
        archs = [a for a in config.get("architectures") or [_causal_lm_class(config)] if a in FAMILIES]
        if not archs:
            known = ", ".join(sorted(FAMILIES))
            raise GGUFError(
                f"no GGUF layout for architecture {config.get('architectures') or '(none)'}: "
                f"the GGUF writer knows {known}"
            )
        self.config = config
        self.hf_arch = archs[0]
        self.family = FAMILIES[self.hf_arch]
        self.arch = MODEL_ARCH_NAMES[self.family.arch]
        self.n_blocks = int(config["num_hidden_layers"])

    def name(self, hf_name: str) -> str | None:
        """GGUF name of an HF weight or bias by gguf-py's tensor map (``model.layers.3.mlp.up_proj.weight`` ->
        ``blk.3.ffn_up.weight``); None where the map has none."""
        if not hf_name.endswith((".weight", ".bias")) or skipped(hf_name):
            return None
        if self.hf_arch in gguf_moe.MOE_LAYOUTS and (split := gguf_moe.expert_index(hf_name)) is not None:
            hf_name = split[0]  # one expert of a stack: named as the converter names the stack
        return _tensor_map(self.family.arch, self.n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def qk_heads(self, hf_name: str) -> int | None:
        """Heads to permute rows by (:func:`permute_qk_rows`) for a q/k weight or bias where llama.cpp expects
        its rotary order (Llama / Mistral); None for every other tensor and family."""
        if not self.family.permute_qk:
            return None
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return _n_head(self.config)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return _n_kv(self.config)
        return None

    def norm_shift(self, hf_name: str) -> float:
        """What llama.cpp's converter adds to this tensor (Gemma 3: 1.0 to every ``*norm.weight``)."""
        return self.family.norm_shift if hf_name.endswith("norm.weight") else 0.0

    def add_metadata(self, writer: GGUFWriter, *, name: str, file_type: int) -> None:
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(2)
        writer.add_block_count(self.n_blocks)
        self.family.hparams(writer, self.config)
        if self.hf_arch in gguf_moe.MOE_LAYOUTS:
            gguf_moe.moe_hparams(writer, self.config, self.hf_arch)

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        """(GGUF name, float32 data) of the tensors llama.cpp's converter generates from the config."""
        rope = rope_parameters(self.config)
        kind = _rope_type(rope)
        if kind == "llama3":
            return [(f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight", llama3_rope_factors(self.config))]
        if kind == "longrope":
            return [
                (f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FACTORS_LONG]}.weight", np.asarray(rope["long_factor"], np.float32)),
                (
                    f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FACTORS_SHORT]}.weight",
                    np.asarray(rope["short_factor"], np.float32),
                ),
            ]
        return []


def _causal_lm_class(config: dict[str, Any]) -> str | None:
    """The causal-LM class transformers builds for a config that names no architecture (by its model_type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(config.get("model_type")))


def skipped(hf_name: str) -> bool:
    """Buffers llama.cpp's converter leaves out (rotary inverse frequencies, attention masks)."""
    return hf_name.endswith(SKIPPED_SUFFIXES)


def hf_to_gguf_name(name: str, config: dict[str, Any] | None = None) -> str | None:
    """GGUF name of an HF tensor name in the model of ``config`` (default: a Llama model)."""
    layout = GGUFLayout(config or {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": _any_blocks(name)})
    return layout.name(name)


def _any_blocks(name: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else 1


def permute_qk_rows(t: T, n_head: int) -> T:
    """Rows in llama.cpp's rotary order: ``out[h*D + 2j + i] = t[h*D + i*D/2 + j]`` with D = rows // n_head.

    Works on anything whose dim 0 is the output rows (weights, codes, scales, zeros; torch or numpy).
    """
    rows = t.shape[0]
    if n_head < 1 or rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"cannot permute {rows} rows for {n_head} heads: rows per head must be even")
    d = rows // n_head
    rest = tuple(t.shape[1:])
    return t.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def permute_qk_result(result: QuantizedLinear, n_head: int) -> QuantizedLinear:
    """The same result with codes, scales and zeros rows permuted by :func:`permute_qk_rows`."""
    return QuantizedLinear(
        spec=result.spec,
        codes=permute_qk_rows(result.codes, n_head).contiguous(),
        scales=permute_qk_rows(result.scales, n_head).contiguous(),
        zeros=permute_qk_rows(result.zeros, n_head).contiguous(),
        g_idx=result.g_idx,
        method=result.method,
        perm=result.perm,
        params=dict(result.params),
    )


# ----------------------------------------------------------------------------------------------- block encoders

#: the legacy block types a solver's result can be written into without re-quantizing, and what each holds:
#: exactly (the file dequantizes to the solver's weights bit for bit) or nearly (Q4_1: its offset m is one
#: fp16 per block, so −scale·z is rounded to fp16)
EXACT_TYPES = ("Q4_0", "Q5_0", "Q8_0")
CARRY_TYPES = (*EXACT_TYPES, "Q4_1")
#: types written by re-quantizing the dequantized solver output with llama.cpp
REQUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S",
                 "Q5_K_M", "Q6_K")  # fmt: skip


def carry_kind(ggml_type: str, bits: int, sym: bool) -> str | None:
    """How a legacy block type holds a ``bits``-bit result: "exact", "nearly" (Q4_1) or None (cannot).

    Q4_0: symmetric ≤ 4-bit (q − z ∈ [−8, 7]); Q5_0: any ≤ 4-bit (q − z ∈ [−15, 15] ⊂ [−16, 15]);
    Q8_0: any ≤ 4-bit or symmetric 8-bit (q − z fits int8); Q4_1: any ≤ 4-bit, m = fp16(−scale·z).
    """
    t = ggml_type.upper()
    if t == "Q4_0":
        return "exact" if bits <= 4 and sym else None
    if t == "Q5_0":
        return "exact" if bits <= 4 else None
    if t == "Q8_0":
        return "exact" if bits <= 4 or (bits == 8 and sym) else None
    if t == "Q4_1":
        return "nearly" if bits <= 4 else None
    return None


def exact_type(bits: int, sym: bool) -> str | None:
    """The smallest legacy type holding a result exactly: sym ≤ 4-bit → Q4_0, asym ≤ 4-bit → Q5_0,
    sym 8-bit → Q8_0; None for asymmetric 8-bit."""
    return next((t for t in EXACT_TYPES if carry_kind(t, bits, sym) == "exact"), None)


def _check_layout(result: QuantizedLinear, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [N, K] uint8 and, per 32-value block, fp16 scales and uint8 zeros [N, K//32]; ValueError if the
    groups do not line up with ggml's 32-value blocks (K or G not a multiple of 32, act-order g_idx)."""
    spec = result.spec
    n, k = result.shape
    if k % QK:
        raise ValueError(f"{fmt} needs in_features to be a multiple of {QK}, got K={k}")
    g = spec.group_len(k)
    if g % QK:
        raise ValueError(f"{fmt} needs a group size that is a multiple of {QK} (or -1), got {spec.group_size}")
    if not result.groups_in_order:
        raise ValueError(f"{fmt} needs g_idx[k] == k // {g} (act-order without static groups is not exact)")
    n_groups = math.ceil(k / g)
    if tuple(result.scales.shape) != (n, n_groups) or result.scales.dtype != torch.float16:
        raise ValueError(
            f"scales must be float16 [{n}, {n_groups}], got {result.scales.dtype} {tuple(result.scales.shape)}"
        )
    if tuple(result.zeros.shape) != (n, n_groups):
        raise ValueError(f"zeros must be [{n}, {n_groups}], got {tuple(result.zeros.shape)}")
    if int(result.codes.max()) > spec.maxq or int(result.zeros.max()) > spec.maxq:
        raise ValueError(f"codes or zeros exceed the {spec.bits}-bit range")
    if spec.sym and not bool((result.zeros == spec.sym_zero).all()):
        raise ValueError(f"{fmt}: a symmetric result needs every zero point equal to {spec.sym_zero}")
    block_group = torch.arange(k // QK) * QK // g
    d = result.scales.cpu()[:, block_group].contiguous().numpy()  # [N, K//32] float16
    z = result.zeros.cpu()[:, block_group].contiguous().numpy().astype(np.uint8)
    return result.codes.cpu().numpy().astype(np.uint8, copy=False), d, z


def _check_carry(result: QuantizedLinear, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spec = result.spec
    if carry_kind(fmt, spec.bits, spec.sym) is None:
        if fmt == "Q4_0" and spec.bits <= 4:
            raise ValueError("Q4_0 is symmetric; an asymmetric result cannot be carried exactly (use Q5_0 or Q8_0)")
        if fmt == "Q8_0" and spec.bits == 8:
            raise ValueError("Q8_0 holds symmetric 8-bit results only: asymmetric 8-bit q − z does not fit int8")
        most = "8-bit symmetric or ≤ 4-bit" if fmt == "Q8_0" else "≤ 4-bit"
        raise ValueError(f"{fmt} carries {most} results, got {spec.bits}-bit {'sym' if spec.sym else 'asym'}")
    return _check_layout(result, fmt)


def _blocks(n: int, k: int, d: np.ndarray, *parts: np.ndarray) -> np.ndarray:
    """Concatenate per-block fields ([N, K//32, bytes] uint8 each, d first) into [N, K//32 * block bytes]."""
    fields = [d.reshape(n, k // QK, 1).view(np.uint8), *parts]
    out = np.concatenate(fields, axis=-1)
    return np.ascontiguousarray(out.reshape(n, -1))


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[N, B, 32] values 0..15 → [N, B, 16] bytes: byte j holds q[j] (low) and q[j + 16] (high)."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def encode_q4_0(result: QuantizedLinear) -> np.ndarray:
    """Q4_0 blocks (uint8 [N, K//32*18]) carrying a symmetric ≤ 4-bit result exactly: d = scale, q − z + 8."""
    q, d, z = _check_carry(result, "Q4_0")
    n, k = q.shape
    signed = q.reshape(n, k // QK, QK).astype(np.int16) - z[..., None] + 8
    return _blocks(n, k, d, _nibbles(signed.astype(np.uint8)))


def encode_q5_0(result: QuantizedLinear) -> np.ndarray:
    """Q5_0 blocks (uint8 [N, K//32*22]) carrying any ≤ 4-bit result exactly: d = scale, q5 = q − z + 16 ∈ [1, 31]
    (fifth bits in a little-endian u32, bit j for value j; low nibbles as Q4_0)."""
    q, d, z = _check_carry(result, "Q5_0")
    n, k = q.shape
    q5 = (q.reshape(n, k // QK, QK).astype(np.int16) - z[..., None] + 16).astype(np.uint8)
    qh = np.packbits((q5 >> 4) & 1, axis=-1, bitorder="little")  # [N, B, 4]: bit j of the u32 = value j
    return _blocks(n, k, d, qh, _nibbles(q5))


def encode_q8_0(result: QuantizedLinear) -> np.ndarray:
    """Q8_0 blocks (uint8 [N, K//32*34]) carrying a symmetric 8-bit or any ≤ 4-bit result exactly:
    d = scale, int8 q − z."""
    q, d, z = _check_carry(result, "Q8_0")
    n, k = q.shape
    signed = q.reshape(n, k // QK, QK).astype(np.int16) - z[..., None]
    return _blocks(n, k, d, signed.astype(np.int8).view(np.uint8))


def encode_q4_1(result: QuantizedLinear) -> np.ndarray:
    """Q4_1 blocks (uint8 [N, K//32*20]) carrying a ≤ 4-bit result nearly exactly: d = scale, m = fp16(−scale·z),
    codes unchanged; x = d·q + m differs from scale·(q − z) by the fp16 rounding of m only."""
    q, d, z = _check_carry(result, "Q4_1")
    n, k = q.shape
    m = (-(d.astype(np.float32) * z.astype(np.float32))).astype(np.float16)
    return _blocks(n, k, d, m.reshape(n, k // QK, 1).view(np.uint8), _nibbles(q.reshape(n, k // QK, QK)))


ENCODERS = {"Q4_0": encode_q4_0, "Q4_1": encode_q4_1, "Q5_0": encode_q5_0, "Q8_0": encode_q8_0}


def encode(result: QuantizedLinear, ggml_type: str) -> np.ndarray:
    """The blocks of ``result`` in one of :data:`CARRY_TYPES`."""
    try:
        return ENCODERS[ggml_type.upper()](result)
    except KeyError:
        raise ValueError(f"{ggml_type} cannot carry a solver's result (one of {', '.join(CARRY_TYPES)})") from None


def quantize_float(array: np.ndarray, ggml_type: str) -> np.ndarray:
    """A float tensor (embeddings, lm_head) as F32 / F16 / BF16 data or gguf-py-quantized legacy blocks."""
    from gguf.quants import quantize

    t = _ggml_type(ggml_type)
    if t == GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if t == GGMLQuantizationType.F16:
        return array.astype(np.float16)
    if t.name in KQUANT_TENSOR_TYPES:  # gguf-py has no K-quant quantizer: llama.cpp's searches in workers/ggml.py
        return pack(rtn_ggml(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), t.name))
    return quantize(array.astype(np.float32), t)


# ----------------------------------------------------------------------------------------------- tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_byte_level(component: dict[str, Any] | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    parts = component.get("pretokenizers") or component.get("decoders") or component.get("processors") or []
    return any(_is_byte_level(p) for p in parts)


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _template_adds(post: dict[str, Any] | None, token_id: int | None, first: bool) -> bool | None:
    """Whether a TemplateProcessing post-processor puts ``token_id`` first (or last) in a single sequence."""
    if not post or token_id is None:
        return None
    if post.get("type") == "Sequence":
        found = [_template_adds(p, token_id, first) for p in post.get("processors", [])]
        return next((f for f in found if f is not None), None)
    if post.get("type") != "TemplateProcessing" or not post.get("single"):
        return None
    piece = post["single"][0 if first else -1]
    if "SpecialToken" not in piece:
        return False
    ids = post.get("special_tokens", {}).get(piece["SpecialToken"]["id"], {}).get("ids", [])
    return ids == [token_id]


def _uses_metaspace(tok: dict[str, Any]) -> bool:
    """Whether spaces become ▁ (a Metaspace pre-tokenizer or a Replace normalizer), as SentencePiece does."""
    text = json.dumps([tok.get("normalizer"), tok.get("pre_tokenizer")], ensure_ascii=False)
    return "Metaspace" in text or "▁" in text


def _spm_fields(tokens: list[str], token_types: list[int], merges: list[str], tok: dict[str, Any]) -> dict[str, Any]:
    """SentencePiece ("llama") fields of a byte-fallback BPE: a score per token, −(rank of the first merge that
    makes it), so llama.cpp's highest-score-first merging follows the BPE merge order; ``<0xNN>`` tokens typed
    BYTE, ``<unk>`` UNKNOWN; whether a ▁ is prepended to the text (a Prepend normalizer or Metaspace prepend)."""
    rank: dict[str, int] = {}
    for i, m in enumerate(merges):
        a, _, b = m.partition(" ")
        rank.setdefault(a + b, i)
    scores = [
        -float(rank[t]) if t in rank else (-1000.0 if token_types[i] != TokenType.NORMAL else 0.0)
        for i, t in enumerate(tokens)
    ]
    unk = tok.get("model", {}).get("unk_token")
    for i, t in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            token_types[i] = int(TokenType.BYTE)
        elif t == unk:
            token_types[i] = int(TokenType.UNKNOWN)
    text = json.dumps([tok.get("normalizer"), tok.get("pre_tokenizer")], ensure_ascii=False)
    prefix = '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"add_prefix_space": true' in text
    return {"scores": scores, "add_space_prefix": prefix}


def tokenizer_metadata(tokenizer_dir: str, vocab_size: int | None = None) -> dict[str, Any]:
    """GGUF tokenizer fields of a BPE HF tokenizer directory: byte-level (gpt2-style) or SentencePiece-style
    (byte fallback, ▁ for spaces: Gemma, Llama 2, Mistral).

    Returns ``model`` ("gpt2" / "llama"), ``tokens`` (by id, padded with ``[PADi]`` up to ``vocab_size``),
    ``token_types``, ``merges`` ("a b"; gpt2) or ``scores`` and ``add_space_prefix`` (llama, see
    :func:`_spm_fields`), ``bos/eos/unk/pad_token_id`` (int or None), ``add_bos_token``, ``add_eos_token`` and
    ``chat_template`` (or None).
    """
    root = Path(tokenizer_dir)
    tok = _read_json(root / "tokenizer.json")
    if not tok:
        raise ValueError(
            f"{root / 'tokenizer.json'} not found; only fast (tokenizer.json) BPE tokenizers are supported"
        )
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(
            f"tokenizer model {model.get('type')!r} is not supported: only byte-level BPE is "
            "(SentencePiece / Unigram is not supported yet)"
        )
    byte_level = _is_byte_level(tok.get("pre_tokenizer")) or _is_byte_level(tok.get("decoder"))
    spm = not byte_level and bool(model.get("byte_fallback")) and _uses_metaspace(tok)
    if not (byte_level or spm):
        raise ValueError(
            "BPE tokenizer is neither byte-level nor SentencePiece-style (byte fallback, ▁ for spaces): not supported"
        )
    cfg = _read_json(root / "tokenizer_config.json")
    special_map = _read_json(root / "special_tokens_map.json")
    model_cfg = _read_json(root / "config.json")

    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: int(TokenType.NORMAL) for i in by_id}
    added = list(tok.get("added_tokens", []))
    for a in added:
        i = int(a["id"])
        by_id[i] = a["content"]
        types[i] = int(TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    n_tokens = max(by_id) + 1 if by_id else 0
    if vocab_size is not None:
        if vocab_size < n_tokens:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {n_tokens} tokens")
        n_tokens = vocab_size
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_tokens)]
    token_types = [types.get(i, int(TokenType.UNUSED)) for i in range(n_tokens)]

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    extra: dict[str, Any] = {"merges": merges}
    if spm:
        extra = _spm_fields(tokens, token_types, merges, tok)

    ids = {t: i for i, t in by_id.items()}

    def special_id(key: str) -> int | None:
        for source in (cfg, special_map):
            content = _token_content(source.get(key))
            if content is not None and content in ids:
                return ids[content]
        value = model_cfg.get(f"{key}_id")
        if isinstance(value, list):
            value = value[0] if value else None
        return int(value) if value is not None else None

    bos, eos, unk, pad = (special_id(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token"))
    post = tok.get("post_processor")
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:
        add_bos = bool(_template_adds(post, bos, first=True))
    add_eos = cfg.get("add_eos_token")
    if add_eos is None:
        add_eos = bool(_template_adds(post, eos, first=False))

    chat_template = cfg.get("chat_template")
    jinja = root / "chat_template.jinja"
    if chat_template is None and jinja.is_file():
        chat_template = jinja.read_text(encoding="utf-8")

    return {
        "model": "llama" if spm else "gpt2",
        "tokens": tokens,
        "token_types": token_types,
        **extra,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "unk_token_id": unk,
        "pad_token_id": pad,
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(add_eos),
        "chat_template": chat_template,
    }


# ----------------------------------------------------------------------------------------------- writer


def _ggml_type(t: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    if isinstance(t, str):
        try:
            return GGMLQuantizationType[t.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type {t!r}") from None
    return GGMLQuantizationType(t)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rope parameters of the full-attention layers (``rope_parameters`` or the older ``rope_scaling``;
    Gemma 3 nests them per layer kind), as llama.cpp's converter reads them."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return dict(params.get("full_attention", params))


def _rope_type(rope: dict[str, Any]) -> str:
    kind = rope.get("rope_type", rope.get("type")) or "default"
    return "longrope" if kind == "su" else str(kind).lower()


def _rope_theta(config: dict[str, Any]) -> float:
    theta = rope_parameters(config).get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise GGUFError("model config has no rope_theta (neither rope_parameters.rope_theta nor rope_theta)")
    return float(theta)


def _local_rope_theta(config: dict[str, Any]) -> float | None:
    """Rope base of the sliding-window layers where it differs by layer kind (Gemma 3)."""
    params = config.get("rope_parameters") or {}
    local = (params.get("sliding_attention") or {}).get("rope_theta", config.get("rope_local_base_freq"))
    return None if local is None else float(local)


def _original_context(config: dict[str, Any]) -> int:
    rope = rope_parameters(config)
    value = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    if value is None:
        raise GGUFError(f"rope type {_rope_type(rope)!r} needs original_max_position_embeddings in the model config")
    return int(value)


def _add_rope_scaling(writer: GGUFWriter, config: dict[str, Any]) -> None:
    """Rope scaling keys as ``TextModel.set_gguf_parameters`` writes them (llama3 is a tensor, not a key)."""
    rope = rope_parameters(config)
    kind = _rope_type(rope)
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(_original_context(config))
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if rope.get(key) is not None:
                add(float(rope[key]))


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for rope_type llama3: per rotary frequency
    f_i = θ^(−2i/d), with wavelength λ = 2π / f_i and L = original_max_position_embeddings, the divisor
    1 where λ < L / high_freq_factor, ``factor`` where λ > L / low_freq_factor, and between them
    1 / ((1 − s) / factor + s) with s = (L / λ − low) / (high − low). float32 [d / 2]."""
    rope = rope_parameters(config)
    dim = _head_dim(config)
    freqs = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _longrope_attn_factor(config: dict[str, Any]) -> float:
    """Phi-3 longrope's attention factor, as the converter computes it: √(1 + ln s / ln L) for s = context / L > 1."""
    orig = _original_context(config)
    scale = int(config["max_position_embeddings"]) / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def _check_rope(layout: GGUFLayout) -> None:
    config, family = layout.config, layout.family
    rope = rope_parameters(config)
    kind = _rope_type(rope)
    if kind != "default" and kind not in family.rope_types:
        allowed = ", ".join(family.rope_types)
        raise GGUFError(
            f"rope type {kind!r} of {layout.hf_arch} has no GGUF form llama.cpp reads for architecture "
            f"{layout.arch!r} (it writes: default, {allowed})"
        )
    if kind in ("linear", "yarn") and rope.get("factor") is None:
        raise GGUFError(f"rope type {kind!r} needs a factor in the model config")
    if kind in ("yarn", "longrope"):
        _original_context(config)
    if kind == "longrope":
        half = int(float(rope.get("partial_rotary_factor", 1.0)) * int(config["hidden_size"])) // _n_head(config) // 2
        for key in ("long_factor", "short_factor"):
            if len(rope.get(key) or []) != half:
                raise GGUFError(f"longrope needs {key} of {half} values (one per rotary pair)")


def _check_family(layout: GGUFLayout) -> None:
    """Family-specific limits of what llama.cpp computes."""
    config = layout.config
    swa = _sliding_layers(config)
    if any(swa) and not layout.family.sliding_window:
        raise GGUFError(
            f"{layout.hf_arch} has sliding-window layers; llama.cpp's {layout.arch!r} architecture has none"
        )
    if layout.family.arch == MODEL_ARCH.GEMMA3:
        if config.get("attn_logit_softcapping") is not None:
            raise GGUFError("Gemma 3 with attn_logit_softcapping has no GGUF form (llama.cpp's gemma3 has none)")
        # llama.cpp scales queries by 1/√head_dim (27B, 62 blocks: 1/√(hidden / heads))
        want = int(config["hidden_size"]) // _n_head(config) if layout.n_blocks == 62 else _head_dim(config)
        scalar = config.get("query_pre_attn_scalar", want)
        if scalar is not None and float(scalar) != float(want):
            raise GGUFError(
                f"Gemma 3 query_pre_attn_scalar {scalar} differs from the {want} llama.cpp scales queries by"
            )
    if layout.family.permute_qk and _head_dim(config) % 2:
        raise GGUFError(f"cannot put Q/K rows in llama.cpp's rotary order: head_dim {_head_dim(config)} is odd")


def check_gguf(
    config: dict[str, Any],
    tensor_names: Iterable[str] = (),
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> GGUFLayout:
    """Every reason this model cannot become a GGUF llama.cpp reads, found before any work: the architecture
    (no layout), its rope type, family limits (sliding window, Gemma 3 query scaling), a tensor gguf-py's map
    cannot name, and the tokenizer. Raises :class:`GGUFError` naming the problem; returns the layout."""
    layout = GGUFLayout(config)
    _check_rope(layout)
    _check_family(layout)
    tensor_names = list(tensor_names)
    try:
        gguf_moe.check_moe_gguf(layout.hf_arch, config, tensor_names, layout.name)
    except ValueError as err:
        raise GGUFError(str(err)) from None
    unnamed = [n for n in tensor_names if not skipped(n) and layout.name(n) is None]
    if unnamed:
        shown = ", ".join(unnamed[:3]) + (" …" if len(unnamed) > 3 else "")
        raise GGUFError(f"no GGUF name for {len(unnamed)} tensor(s) of {layout.hf_arch} in gguf-py's map: {shown}")
    if tokenizer_dir is not None:
        try:
            tokenizer_metadata(str(tokenizer_dir), vocab_size=int(config["vocab_size"]))
        except ValueError as err:
            raise GGUFError(f"GGUF tokenizer: {err}") from None
    return layout


def vocab_writer(model_config: dict[str, Any], meta: dict[str, Any]):
    """``write(path, pre)``: a vocabulary-only GGUF of this model (its architecture's keys, the tokenizer of
    :func:`tokenizer_metadata`'s ``meta``, ``pre`` as tokenizer.ggml.pre), the file llama.cpp loads with vocab_only."""
    layout = GGUFLayout(model_config)

    def write(path: str, pre: str) -> None:
        writer = GGUFWriter(path, layout.arch)
        layout.add_metadata(writer, name="vocab", file_type=1)
        add_tokenizer_metadata(writer, meta, pre=pre)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()

    return write


def pre_for(tokenizer_dir: str | os.PathLike[str], model_config: dict[str, Any], meta: dict[str, Any]):
    """:func:`gguf_pre.find_pre` for this model, asked with its own vocabulary-only GGUFs (:func:`vocab_writer`)."""
    from strata_quant.pipeline.formats.gguf_pre import find_pre

    return find_pre(tokenizer_dir, model_config.get("model_type"), vocab_writer(model_config, meta))


def add_tokenizer_metadata(writer: GGUFWriter, meta: dict[str, Any], *, pre: str) -> None:
    """``tokenizer.*`` keys from :func:`tokenizer_metadata`'s dict."""
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    if "merges" in meta:
        writer.add_token_merges(meta["merges"])
    if "scores" in meta:
        writer.add_token_scores(meta["scores"])
        writer.add_add_space_prefix(bool(meta["add_space_prefix"]))
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if meta.get(key) is not None:
            add(int(meta[key]))
    writer.add_add_bos_token(bool(meta["add_bos_token"]))
    writer.add_add_eos_token(bool(meta["add_eos_token"]))
    if meta.get("chat_template"):
        writer.add_chat_template(meta["chat_template"])


def add_extra_metadata(writer: GGUFWriter, metadata: dict[str, Any]) -> None:
    """Extra keys (e.g. ``strata.*``): bool, int (u32, or i64 when negative or large), float (f32), str."""
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            if 0 <= value < 2**32:
                writer.add_uint32(key, value)
            else:
                writer.add_int64(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            raise ValueError(f"metadata {key}: unsupported value type {type(value).__name__}")


def read_metadata(path: str | os.PathLike[str], prefix: str = "strata.") -> dict[str, Any]:
    """Scalar keys of a GGUF file starting with ``prefix`` (default: strata's own keys)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {k: f.contents() for k, f in fields.items() if k.startswith(prefix)}


class GGUFStreamWriter:
    """A Llama GGUF written tensor by tensor: infos first, then the header, then the data in info order."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        model_config: dict[str, Any],
        tokenizer_dir: str | None,
        *,
        tokenizer_pre: str = "default",
        name: str = "model",
        file_type: int = 2,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.layout = check_gguf(model_config)
        self._writer = GGUFWriter(self.path, self.layout.arch)
        self.layout.add_metadata(self._writer, name=name, file_type=file_type)
        if tokenizer_dir is not None:
            meta = tokenizer_metadata(tokenizer_dir, vocab_size=int(model_config["vocab_size"]))
            if tokenizer_pre == "auto":  # the name llama.cpp splits text by as the model does (gguf_pre.py)
                tokenizer_pre = pre_for(tokenizer_dir, model_config, meta).pre
            add_tokenizer_metadata(self._writer, meta, pre=tokenizer_pre)
        add_extra_metadata(self._writer, metadata or {})
        self._pending: list[tuple[str, GGMLQuantizationType, int]] = []  # name, type, nbytes, in write order
        self._next = 0
        self._header_written = False
        self._closed = False

    def add_tensor_info(
        self,
        name: str,
        ggml_type: str | int | GGMLQuantizationType,
        torch_shape: Sequence[int],
        nbytes: int | None = None,
    ) -> int:
        """Declare a tensor by its element shape in torch order (a [N, K] weight); returns its byte size."""
        if self._header_written:
            raise RuntimeError("add_tensor_info after write_header")
        qtype = _ggml_type(ggml_type)
        shape = tuple(int(s) for s in torch_shape)
        if qtype in _FLOAT_DTYPES:
            dtype = _FLOAT_DTYPES[qtype]
            stored_shape = shape
        elif qtype in GGML_QUANT_SIZES:
            dtype = np.dtype(np.uint8)
            stored_shape = quant_shape_to_byte_shape(shape, qtype)  # gguf-py maps it back to element shape
        else:
            raise ValueError(f"unsupported ggml type {qtype.name}")
        size = math.prod(stored_shape) * dtype.itemsize
        if nbytes is not None and nbytes != size:
            raise ValueError(f"{name}: {qtype.name} {shape} takes {size} bytes, caller said {nbytes}")
        raw = None if qtype in _FLOAT_DTYPES else qtype
        self._writer.add_tensor_info(name, stored_shape, dtype, size, raw_dtype=raw)
        self._pending.append((name, qtype, size))
        return size

    def write_header(self) -> None:
        """Write the header, the metadata and the tensor infos."""
        if self._header_written:
            raise RuntimeError("header already written")
        self._writer.write_header_to_file()
        self._writer.write_kv_data_to_file()
        self._writer.write_ti_data_to_file()
        self._header_written = True

    def write_data(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor's data; ``name`` must be the next declared tensor."""
        if not self._header_written:
            raise RuntimeError("write_header must come before write_data")
        if self._next >= len(self._pending):
            raise ValueError(f"unexpected tensor {name!r}: all declared tensors are written")
        want, qtype, size = self._pending[self._next]
        if name != want:
            raise ValueError(f"tensors must be written in declaration order: expected {want!r}, got {name!r}")
        expected_dtype = _FLOAT_DTYPES.get(qtype, np.dtype(np.uint8))
        if array.dtype != expected_dtype:
            raise ValueError(f"{name}: {qtype.name} data must be {expected_dtype}, got {array.dtype}")
        if array.nbytes != size:
            raise ValueError(f"{name}: expected {size} bytes of {qtype.name} data, got {array.nbytes}")
        self._writer.write_tensor_data(np.ascontiguousarray(array))
        self._next += 1

    def close(self) -> None:
        """Flush and close; raises if declared tensors were not all written."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        missing = [n for n, _, _ in self._pending[self._next :]]
        if not self._header_written or missing:
            raise RuntimeError(f"incomplete GGUF {self.path}: header={self._header_written}, missing {missing[:5]}")

    def close_sparse(self) -> None:
        """Close after the header with every tensor's data declared but not written: the file is truncated to
        its full size, so the data region is a hole (a sparse file) that readers see as zeros."""
        if not self._header_written:
            raise RuntimeError("close_sparse before write_header")
        self._closed = True
        self._writer.close()
        align = self._writer.data_alignment
        start = GGUFWriter.ggml_pad(self.path.stat().st_size, align)
        os.truncate(self.path, start + sum(GGUFWriter.ggml_pad(size, align) for _, _, size in self._pending))

    def __enter__(self) -> GGUFStreamWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            self._writer.close()


def write_gguf(
    path: str,
    model_config: dict[str, Any],
    tokenizer_dir: str | None,
    descriptors: Sequence[tuple[str, str | GGMLQuantizationType, tuple[int, ...]]],
    arrays: Iterable[np.ndarray],
    *,
    tokenizer_pre: str = "default",
    name: str = "model",
    file_type: int = 2,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write a Llama GGUF: ``descriptors`` = (gguf name, ggml type, torch element shape) for the header, then
    ``arrays`` (any iterable, e.g. a generator, consumed one at a time) with the data in the same order.

    Float data is float32 (F32) / float16 (F16); quantized data is the uint8 blocks of :func:`encode_q4_0` etc.
    """
    with GGUFStreamWriter(
        path,
        model_config,
        tokenizer_dir,
        tokenizer_pre=tokenizer_pre,
        name=name,
        file_type=file_type,
        metadata=metadata,
    ) as w:
        for tensor_name, ggml_type, shape in descriptors:
            w.add_tensor_info(tensor_name, ggml_type, shape)
        w.write_header()
        it = iter(arrays)
        for tensor_name, _, _ in descriptors:
            try:
                array = next(it)
            except StopIteration:
                raise ValueError(f"arrays ended before tensor {tensor_name!r}") from None
            w.write_data(tensor_name, array)
        if next(it, None) is not None:
            raise ValueError("more arrays than descriptors")


# ----------------------------------------------------------------------------------------------- type choice


#: llama.cpp's ``llama_ftype`` of a file whose weights are mostly of a given type
FILE_TYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "BF16": 32,
}
#: ggml tensor types (by name) llama.cpp can give embeddings / output through ``llama_model_quantize``
KQUANT_TENSOR_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
#: tensor types gguf-py writes itself (floats and legacy blocks)
NATIVE_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def resolve_type(gguf_type: str, bits: int, sym: bool) -> tuple[str, str]:
    """(file type, how the solver's result gets there): "exact", "nearly" (Q4_1: fp16 offset) or "requantized"
    (llama.cpp re-quantizes the dequantized result). ``auto`` is the exact type of the result."""
    t = gguf_type.upper()
    if t == "AUTO":
        exact = exact_type(bits, sym)
        if exact is None:
            raise ValueError(
                f"no GGUF type holds an asymmetric {bits}-bit result exactly; name a type to re-quantize to "
                "(output.gguf_type, e.g. Q8_0 or Q6_K)"
            )
        return exact, "exact"
    if t not in REQUANT_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}: one of auto, {', '.join(REQUANT_TYPES)}")
    return t, carry_kind(t, bits, sym) or "requantized"


# ----------------------------------------------------------------------------------------------- llama.cpp


def llama_quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    file_type: str,
    *,
    token_embedding_type: str | None = None,
    output_tensor_type: str | None = None,
    allow_requantize: bool = False,
    nthread: int = 0,
) -> None:
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp (llama-cpp-python's ``llama_model_quantize``).

    ``file_type`` names a llama_ftype (Q4_K_M, Q6_K, Q4_0 …); tensors already of the type llama.cpp picks for
    them are copied as they are. ``token_embedding_type`` / ``output_tensor_type`` name ggml types for
    token_embd / output. Every key of ``src`` (strata.* included) is carried into ``dst``.
    """
    import ctypes

    try:
        import llama_cpp
    except ImportError as err:
        raise RuntimeError("re-quantizing to a k-quant needs llama-cpp-python (pip install 'strata[readers]')") from err
    if file_type.upper() not in FILE_TYPES:
        raise ValueError(f"unknown llama.cpp file type {file_type!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(nthread)
    params.ftype = FILE_TYPES[file_type.upper()]
    params.allow_requantize = bool(allow_requantize)
    if token_embedding_type is not None:
        params.token_embedding_type = int(_ggml_type(token_embedding_type))
    if output_tensor_type is not None:
        params.output_tensor_type = int(_ggml_type(output_tensor_type))
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise RuntimeError(f"llama_model_quantize({src} → {file_type}) failed with code {rc}")


# ------------------------------------------------------------------------------- llama.cpp's mix, dry run

_LOG_LOCK = threading.Lock()  # llama.cpp has one log callback per process

# llama_model_quantize_impl's line per tensor: "[  i/  n] name - [shape], type = cur, size = a -> b (new)\n",
# or "size = a MiB\n" without "(new)" when the tensor keeps its type
_DRY_RUN_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\], type =\s*(\w+), size =[^\n(]*(?:\((\w+)\))?\n")


def dry_run_types(gguf_path: str | os.PathLike[str], mix: str) -> dict[str, str]:
    """{tensor name: ggml type} that llama.cpp's ``llama_model_quantize`` gives every tensor of the GGUF at
    ``gguf_path`` in the file type ``mix`` (Q4_K_M, Q6_K …), from its dry run (``params.dry_run``: the
    per-tensor choice, llama_tensor_get_type with its fallbacks, is made and logged; no data is read or
    written). The choice is read from llama.cpp's log, captured through ``llama_log_set`` for the call.
    Without an importance matrix, as a strata file has none: only the Q4_0 / Q5_0 file types choose otherwise
    with one. RuntimeError when llama-cpp-python is missing or llama.cpp refuses the file."""
    try:
        import llama_cpp
    except ImportError as err:
        raise RuntimeError("llama.cpp's mixes need llama-cpp-python (pip install 'strata[readers]')") from err
    if mix.upper() not in FILE_TYPES:
        raise ValueError(f"unknown llama.cpp file type {mix!r}")
    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(_level, text, _user):
        chunks.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[mix.upper()]
    params.allow_requantize = True
    params.dry_run = True
    params.nthread = 1
    with _LOG_LOCK:
        llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
        try:
            rc = llama_cpp.llama_model_quantize(os.fsencode(gguf_path), os.fsencode(os.devnull), ctypes.byref(params))
        finally:
            restore = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None)
            llama_cpp.llama_log_set(restore, ctypes.c_void_p(0))
    text = "".join(chunks)
    types = {m[1]: (m[3] or m[2]).upper() for m in _DRY_RUN_LINE.finditer(text)}
    if rc != 0 or not types:
        tail = " | ".join(line for line in text.splitlines()[-3:] if line.strip())
        raise RuntimeError(f"llama.cpp's dry run of {mix} on {gguf_path} failed (code {rc}): {tail}")
    return types


def mix_types(reader, mix: str) -> dict[str, str]:
    """{GGUF tensor name: ggml type} of the checkpoint ``reader`` in llama.cpp's ``mix``, without writing the
    model: a skeleton GGUF (the model's metadata and tensor infos, every weight declared F16, the data region a
    hole in a sparse file) is given to :func:`dry_run_types`. Tensors llama.cpp keeps as they are read F32/F16."""
    with tempfile.TemporaryDirectory(prefix="strata-mix-") as tmp:
        path = write_skeleton(reader, Path(tmp) / "skeleton.gguf")
        return dry_run_types(path, mix)


# ------------------------------------------------------------------------------------------- the artifact


@dataclass(frozen=True)
class GGUFTypes:
    """The types one GGUF artifact gets, resolved from the run record and the options before anything is written."""

    bits: int  # the majority width
    sym: bool
    group_size: int | None
    target: str  # the file's type
    carry: str  # "exact", "nearly" or "requantized"
    linear_types: dict[str, str]  # mixed precision: {linear: the exact type of its own width}
    emb: str | None  # token_embd / output as asked (None: llama.cpp's recipe)
    emb_native: str  # ... as written by gguf-py (k-quants go in F16, for llama.cpp to quantize)
    tensor_types: dict[str, str] = field(default_factory=dict)  # a solved mix: {GGUF name: type} of the others

    @property
    def requant(self) -> bool:
        return self.carry == "requantized"

    @property
    def needs_llama(self) -> bool:
        return self.requant or (self.emb is not None and self.emb != self.emb_native)


def resolve_types(results, config: dict[str, Any], gguf_type: str, embedding_type: str) -> GGUFTypes:
    """The file, linear and embedding types of a GGUF of ``results``; AssembleError naming what no GGUF holds."""
    specs = {(bool(e["sym"]), e.get("group_size")) for e in results.entries.values()}
    if len(specs) != 1:
        raise AssembleError(f"one GGUF holds one grid (sym, group size); the run record has {sorted(specs, key=str)}")
    sym, group_size = next(iter(specs))
    bits, mixed = linear_bits(results)  # mixed precision: {linear: its width} where it differs
    try:
        target, carry = resolve_type(gguf_type, bits, sym)
        linear_types = {n: resolve_type("auto", b, sym)[0] for n, b in mixed.items()}
    except ValueError as err:
        raise AssembleError(str(err)) from err
    requant = carry == "requantized"
    if mixed and (requant or gguf_type.upper() != "AUTO"):
        raise AssembleError("per-linear bits need gguf_type auto: each tensor gets the exact type of its own width")
    emb = embedding_type.upper()
    if emb == "AUTO":
        emb = None if requant else "F16"  # llama.cpp's own recipe for re-quantized files
    elif emb not in NATIVE_TENSOR_TYPES and emb not in KQUANT_TENSOR_TYPES:
        raise AssembleError(f"unknown embedding type {embedding_type!r}")
    hidden = int(config["hidden_size"])
    block = 256 if emb in KQUANT_TENSOR_TYPES else 32
    if emb not in (None, "F32", "F16", "BF16") and hidden % block:
        raise AssembleError(
            f"embedding type {emb} needs rows of a multiple of {block} values; hidden_size is {hidden} "
            "(pick F16, Q8_0 or another legacy type)"
        )
    emb_native = emb if emb in NATIVE_TENSOR_TYPES else "F16"
    return GGUFTypes(bits, sym, group_size, target, carry, linear_types, emb, emb_native)


def solved_types(
    reader, results, gguf_type: str, embedding_type: str, overrides: dict[str, str] | None = None
) -> GGUFTypes | None:
    """The types of a GGUF of a run that solved llama.cpp's mix (its linears' results are ggml blocks): every
    tensor as llama.cpp's dry run of ``gguf_type`` gives it (:func:`mix_types`), but the linears ``overrides``
    (``output.gguf_types``, a mix of strata's own) names, each linear's result of exactly its type. None for a
    run whose results are not ggml blocks; AssembleError on a mismatch."""
    entries = results.entries
    solved = {n for n, e in entries.items() if e.get("kind") == "ggml"}
    if not solved:
        return None
    if len(solved) != len(entries):
        raise AssembleError(f"{len(solved)} of {len(entries)} linears were solved on ggml grids: one GGUF, one mix")
    from strata_quant.pipeline.formats.gguf_solved import llama_file_type

    try:
        mix = mix_types(reader, llama_file_type(gguf_type))
    except (RuntimeError, ValueError) as err:
        raise AssembleError(f"gguf_type {gguf_type}: {err}") from None
    layout = check_gguf(reader.config, reader.tensor_names)
    from strata_quant.pipeline.overrides import type_overrides

    linear_types = {n: e["ggml_type"] for n, e in entries.items()}
    try:
        own = type_overrides(overrides, sorted(linear_types)) if overrides else {}
    except ConfigError as err:
        raise AssembleError(str(err)) from None
    for n, t in linear_types.items():
        want = own.get(n) or mix.get(layout.name(f"{n}.weight") or "")
        if t != want:
            whose = "output.gguf_types" if n in own else f"llama.cpp's {gguf_type}"
            raise AssembleError(f"{n} was solved as {t}; {whose} gives it {want} (another mix's run)")
    others = {g: t for g, t in mix.items() if g in ("token_embd.weight", "output.weight") or not g.startswith("blk.")}
    if embedding_type.upper() != "AUTO":
        others.update({g: embedding_type.upper() for g in ("token_embd.weight", "output.weight")})
    widths = [GRIDS[t].bits for t in linear_types.values()]
    bits = max(set(widths), key=widths.count)  # the majority width, as strata.bits says of other files
    return GGUFTypes(bits, True, None, llama_file_type(gguf_type), "solved", linear_types, None, "F16", others)


def artifact_metadata(types: GGUFTypes, method: str, tool_version: str) -> dict[str, Any]:
    """The ``strata.*`` keys: how the file was made from the solver's result. A file solved on llama.cpp's mix
    says only what its tensor types do not (version, method, carry, the mix): every tensor's type is in the
    file, and the keys are all the file has beyond llama.cpp's own file of the mix, which it must not outgrow."""
    metadata = {
        "strata.version": tool_version,
        "strata.method": method,
        "strata.carry": types.carry,
        "strata.target_type": types.target,
    }
    if types.carry == "solved":
        return metadata
    metadata |= {
        "strata.bits": int(types.bits),
        "strata.sym": bool(types.sym),
        "strata.requantized": types.requant,
        "strata.source_type": "F16 (dequantized solver output)" if types.requant else types.target,
        "strata.embedding_type": types.emb or "llama.cpp default",
    }
    if types.group_size is not None:
        metadata["strata.group_size"] = int(types.group_size)
    if types.linear_types:
        metadata["strata.mixed_linears"] = len(types.linear_types)
    return metadata


def tensor_plan(reader, results, layout: GGUFLayout, types: GGUFTypes, extra: dict) -> list[tuple]:
    """(hf name, gguf name, type, torch shape) of every tensor, in file order: the tensors generated
    from the config (rope_freqs …) first, as the converter writes them, then the checkpoint's. A MoE
    stack of experts is one entry, at its first expert, whose hf name is the list of its experts' tensors."""
    linear_type = "F16" if types.requant else types.target
    plan: list[tuple] = [("", g, "F32", tuple(d.shape)) for g, d in extra.items()]
    stacks = gguf_moe.expert_stacks(reader.tensor_names, layout.name)  # {GGUF name: one tensor per expert}
    for tname in reader.tensor_names:
        if skipped(tname):
            continue
        gname = layout.name(tname)
        linear, _, leaf = tname.rpartition(".")
        shape = reader.shape(tname)
        if gname in stacks:  # planned once, at its first expert
            if tname == stacks[gname][0]:
                gtype = stack_type(stacks[gname], results, types.linear_types, linear_type)
                plan.append((stacks[gname], gname, gtype, (len(stacks[gname]), *shape)))
        elif linear in results and leaf == "weight":
            plan.append((tname, gname, types.linear_types.get(linear, linear_type), shape))
        elif len(shape) == 1 or gguf_moe.is_router(gname):
            plan.append((tname, gname, "F32", shape))
        elif gname in ("token_embd.weight", "output.weight"):
            plan.append((tname, gname, types.tensor_types.get(gname, types.emb_native), shape))
        else:
            plan.append((tname, gname, types.tensor_types.get(gname, "F16"), shape))
    return plan


def stack_type(members: list[str], results, linear_types: dict[str, str], linear_type: str) -> str:
    """The GGUF type of a stack of experts (one tensor: one type): the type of its experts' results, F16 when
    none is quantized; AssembleError when they differ."""
    linears = [m.rpartition(".")[0] for m in members]
    found = {linear_types.get(lin, linear_type) if lin in results else "F16" for lin in linears}
    if len(found) != 1:
        raise AssembleError(f"the experts of {linears[0]} … need {sorted(found)}: one GGUF expert stack has one type")
    return found.pop()


def expert_stack(members: list[str], reader, results, gtype: str, requant: bool) -> np.ndarray:
    """The data of a stack of experts, expert by expert (expert e's rows after expert e − 1's): each quantized
    expert's result encoded as it is (exact), or dequantized to F16 for llama.cpp to re-quantize; unquantized
    experts as stored in F16. Memory: the stack's data, one expert's result at a time."""
    parts = []
    for member in members:
        linear = member.rpartition(".")[0]
        if linear in results:
            result = results.get(linear)
            if isinstance(result, GGMLQuantized):
                parts.append(pack(result))
                continue
            try:
                parts.append(dequantize_half(result).numpy() if requant else encode(result, gtype))
            except ValueError as err:
                raise AssembleError(f"{linear}: {err}") from err
            del result
        else:
            parts.append(results.float_tensor(reader, member).to(torch.float16).numpy())
    return np.concatenate(parts, axis=0)


def _float_data(array: np.ndarray, gtype: str) -> np.ndarray:
    """A float tensor's GGUF data: the array itself when it already has the type's dtype
    (F16 from fp16, F32 from fp32: no copy), else :func:`quantize_float`'s conversion."""
    if (gtype, array.dtype) in (("F16", np.float16), ("F32", np.float32)):
        return array
    return quantize_float(array, gtype)


def tensor_data(reader, results, layout: GGUFLayout, tname: str, gtype: str, requant: bool) -> np.ndarray:
    """One checkpoint tensor as the GGUF stores it: a quantized linear from its stored result (its
    blocks carried over, or dequantized to F16 for llama.cpp), any other tensor from the checkpoint
    (as published), Q/K rows permuted as llama.cpp's rotary wants them, norms shifted where the family does."""
    linear = tname.rpartition(".")[0]
    heads = layout.qk_heads(tname)
    if linear in results and tname.endswith(".weight"):
        result = results.get(linear)
        if isinstance(result, GGMLQuantized):  # solved on the mix's type: its blocks, whole rows permuted
            return pack(result) if heads is None else permute_qk_rows(pack(result), heads)
        if heads is not None:
            result = permute_qk_result(result, heads)
        try:
            return dequantize_half(result).numpy() if requant else encode(result, gtype)
        except ValueError as err:
            raise AssembleError(f"{linear}: {err}") from err
    tensor = results.float_tensor(reader, tname)
    if gtype not in ("F16", "F32") or tensor.dtype not in (torch.float16, torch.float32):
        tensor = tensor.float()  # gguf-py quantizes from float32; bf16 has no numpy form
    if heads is not None:
        tensor = permute_qk_rows(tensor, heads)
    if shift := layout.norm_shift(tname):
        tensor = tensor.float() + shift
    return _float_data(tensor.numpy(), gtype)


def planned_data(
    tname: str | list[str] | None,
    gname: str,
    gtype: str,
    reader,
    results,
    layout: GGUFLayout,
    extra: dict,
    requant: bool,
) -> np.ndarray:
    """The data of one :func:`tensor_plan` entry: a tensor of the layout's own (``extra``, no checkpoint name),
    a stack of experts (:func:`expert_stack`) or one checkpoint tensor (:func:`tensor_data`)."""
    if not tname:
        return extra[gname]
    if isinstance(tname, list):
        return expert_stack(tname, reader, results, gtype, requant)
    return tensor_data(reader, results, layout, tname, gtype, requant)


def write_skeleton(reader, path: Path, tokenizer_dir: str | None = None, name: str = "model") -> Path:
    """The checkpoint's GGUF as the converter lays it out (metadata, tensor names, shapes; every weight F16,
    norms F32), with no data written: the data region is a hole of the file's full size (a sparse file, zeros
    to a reader). What llama.cpp's quantize dry run reads to choose a mix's types (:func:`mix_types`); with
    ``tokenizer_dir`` the vocabulary too, as an artifact's header has it."""
    try:
        layout = check_gguf(reader.config, reader.tensor_names)
    except GGUFError as err:
        raise AssembleError(str(err)) from None
    floats = GGUFTypes(16, True, None, "F16", "requantized", {}, None, "F16")
    extra = dict(layout.extra_tensors())
    writer = GGUFStreamWriter(str(path), reader.config, tokenizer_dir, name=name, file_type=FILE_TYPES["F16"])
    for _, gname, gtype, shape in tensor_plan(reader, {}, layout, floats, extra):
        writer.add_tensor_info(gname, gtype, shape)
    writer.write_header()
    writer.close_sparse()
    return path


class GGUFFormat(Format, name="gguf"):
    """A llama.cpp GGUF of the solver's result; norms F32, embeddings / output per ``embedding_type``.

    ``gguf_type`` "auto" (or a type that holds the result exactly) writes the solver's codes and scales as they
    are: symmetric ≤ 4-bit → Q4_0, asymmetric ≤ 4-bit → Q5_0 (or Q8_0 when named), symmetric 8-bit → Q8_0;
    Q4_1 holds ≤ 4-bit results with the offset −scale·z rounded to fp16 ("nearly" exact). Any other type
    (Q4_K_M, Q6_K …) is a named fallback: an F16 GGUF of the dequantized solver output is written first and
    re-quantized by llama.cpp. The file says which in ``strata.carry`` / ``strata.requantized`` /
    ``strata.source_type``; :func:`pipeline.verify.verify_gguf` measures the difference.
    """

    verifier = "verify_gguf"
    loader = "llama.cpp (llama-cpp-python), gguf-py, transformers (gguf_file=)"

    @classmethod
    def artifact_name(cls, job: str, bits: int, sym: bool, options) -> str:
        from strata_quant.pipeline.formats.gguf_solved import SOLVED_MIXES

        t = options.gguf_type.upper()  # a mix solved in the run is named as asked (MOSTLY_Q4_0 is not Q4_0)
        return f"{job}-{t if t in SOLVED_MIXES else resolve_type(t, bits, sym)[0]}.gguf"

    def check(self, result: QuantizedLinear, options) -> None:
        from strata_quant.pipeline.formats.gguf_solved import solves_mix

        if solves_mix(options.gguf_type, result.method):  # ggml grids: the plan checked each linear's type itself
            return
        gtype, carry = resolve_type(options.gguf_type, result.spec.bits, result.spec.sym)
        if carry != "requantized":  # the solver's blocks are written as they are: one row shows the layout
            encode(result.rows(0, 1), gtype)
        elif result.shape[1] % QK:
            raise ValueError(f"in_features {result.shape[1]} is not a multiple of ggml's block of {QK}")

    def write(self, reader, results, dest: Path, options) -> Path:
        if dest.exists() and not options.overwrite:
            raise AssembleError(f"output {dest} exists; pass --overwrite (output.overwrite: true) to replace it")
        try:
            layout = check_gguf(reader.config, reader.tensor_names)
        except GGUFError as err:
            raise AssembleError(str(err)) from None
        types = solved_types(
            reader, results, options.gguf_type, options.embedding_type, options.gguf_types
        ) or resolve_types(results, reader.config, options.gguf_type, options.embedding_type)
        metadata = artifact_metadata(types, results.get(next(iter(results.entries))).method, options.tool_version)
        extra = dict(layout.extra_tensors())
        plan = tensor_plan(reader, results, layout, types, extra)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        first = dest.with_name(f".{dest.name}.src.tmp") if types.needs_llama else tmp
        writer = GGUFStreamWriter(
            str(first),
            reader.config,
            str(reader.path),
            tokenizer_pre=options.tokenizer_pre,
            name=options.name,
            file_type=FILE_TYPES["F16" if types.requant else types.target],
            metadata=metadata,
        )
        try:
            for _, gname, gtype, shape in plan:
                writer.add_tensor_info(gname, gtype, shape)
            writer.write_header()
            for tname, gname, gtype, _ in plan:  # one tensor's data alive at a time
                data = planned_data(tname, gname, gtype, reader, results, layout, extra, types.requant)
                writer.write_data(gname, data)
                del data
            writer.close()
            if types.needs_llama:
                emb = types.emb
                llama_quantize(
                    first, tmp, types.target, token_embedding_type=emb, output_tensor_type=emb, nthread=options.threads
                )
        except BaseException:
            for p in {first, tmp}:
                p.unlink(missing_ok=True)
            raise
        finally:
            if types.needs_llama:
                first.unlink(missing_ok=True)
        os.replace(tmp, dest)
        return dest
