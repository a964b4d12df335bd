"""llama.cpp's quantization mixes (llama-quantize's ftypes) as data: which ggml type each tensor gets.

Transcribed from llama_tensor_get_type / llama_tensor_get_type_impl / tensor_type_fallback in
vendor/llama.cpp/src/llama-quant.cpp (llama-cpp-python 0.3.36) for the mixes strata writes, on
non-Falcon architectures. A mix is a base type and, per tensor category, an ordered list of
rules (layer predicate → type); the first rule that holds wins, else the base type:

* attention-V-like tensors (attn_v, attn_qkv, attn_kv_b) count through llama.cpp's
  i_attention_wv, ffn_down through i_ffn_down; for a model with one of each per layer (every
  dense and MoE decoder) both equal the layer index, which is what :func:`tensor_type` takes;
* ``more_bits`` is llama.cpp's use_more_bits: i < n/8, i ≥ 7n/8, or (i − n/8) % 3 == 2;
* the output head, and the token embedding when it is tied to it, get Q6_K (Q8_0 in the Q8_0
  mix, and Q8_0 whenever a row is not a multiple of the base type's block);
* 8-expert models bump attn_v and attn_k to Q8_0 and attn_output to Q5_K in the low mixes;
  Llama-70B-like models (8 query heads per KV head at 70B) bump attn_v from Q3_K/Q4_K to Q5_K;
* last, the fallback for a row length the chosen type cannot hold: Q2_K, Q3_K → Q4_0,
  Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, and F16 when even that block (32) does not divide it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from strata_quant.pipeline.formats.gguf_solved import llama_file_type

# values per block of each type strata writes (gguf.GGML_QUANT_SIZES agrees)
BLOCK = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32,
         "Q5_1": 32, "Q8_0": 32, "F16": 1}  # fmt: skip
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# layer predicates (i, n, model) → bool; model carries n_gqa
_WHEN: dict[str, Callable[[int, int, ModelShape], bool]] = {
    "all": lambda i, n, m: True,
    "more_bits": lambda i, n, m: use_more_bits(i, n),
    "first_eighth": lambda i, n, m: i < n // 8,
    "first_sixteenth": lambda i, n, m: i < n // 16,
    "first_2": lambda i, n, m: i < 2,
    "first_4": lambda i, n, m: i < 4,
    "gqa_4": lambda i, n, m: m.n_gqa >= 4,
}


@dataclass(frozen=True)
class ModelShape:
    """What llama.cpp's rules read of the model besides the tensor: layers, query heads per KV
    head, experts, and whether it is a 70B (llama.cpp's LLM_TYPE_70B)."""

    n_layers: int
    n_gqa: int = 1
    n_expert: int = 0
    is_70b: bool = False


@dataclass(frozen=True)
class Mix:
    base: str
    rules: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)


MIXES: dict[str, Mix] = {
    "Q2_K": Mix("Q2_K", {
        "attn_v": (("gqa_4", "Q4_K"), ("all", "Q3_K")),
        "ffn_down": (("all", "Q3_K"),),
        "attn_output": (("all", "Q3_K"),),
    }),
    "Q3_K_M": Mix("Q3_K", {
        "attn_v": (("first_2", "Q5_K"), ("all", "Q4_K")),
        "ffn_down": (("first_sixteenth", "Q5_K"), ("all", "Q4_K")),
        "attn_output": (("all", "Q4_K"),),
    }),
    "Q3_K_L": Mix("Q3_K", {
        "attn_v": (("all", "Q5_K"),),
        "ffn_down": (("all", "Q5_K"),),
        "attn_output": (("all", "Q5_K"),),
    }),
    "Q4_K_S": Mix("Q4_K", {
        "attn_v": (("first_4", "Q5_K"),),
        "ffn_down": (("first_eighth", "Q5_K"),),
    }),
    "Q4_K_M": Mix("Q4_K", {
        "attn_v": (("more_bits", "Q6_K"),),
        "ffn_down": (("more_bits", "Q6_K"),),
    }),
    "Q5_K_S": Mix("Q5_K"),
    "Q5_K_M": Mix("Q5_K", {
        "attn_v": (("more_bits", "Q6_K"),),
        "ffn_down": (("more_bits", "Q6_K"),),
    }),
    "Q6_K": Mix("Q6_K"),
    "Q8_0": Mix("Q8_0"),
}  # fmt: skip

# 8-expert models: attn_output → Q5_K in these mixes (llama.cpp's list, restricted to MIXES)
_EXPERT8_ATTN_OUTPUT = {"Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M"}

_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "ssm_conv1d",
                  "shortconv.conv.weight", "attn_rel_b.weight", "position_embd", "token_types.weight")  # fmt: skip


def category(name: str) -> str:
    """llama.cpp's tensor_get_category, by name."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):  # fmt: skip
        if key in name:
            return cat
    return "other"


def _layer(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def fallback(ggml_type: str, row: int) -> str:
    """tensor_type_fallback: the type a row of ``row`` values can be stored in."""
    if row % BLOCK[ggml_type] == 0:
        return ggml_type
    alt = FALLBACK.get(ggml_type, ggml_type)
    return alt if row % BLOCK[alt] == 0 else "F16"


def tensor_type(mix: str, name: str, shape: tuple[int, ...], model: ModelShape, *, tied: bool) -> str | None:
    """The ggml type llama-quantize gives tensor ``name`` (torch shape, rows along the last dim)
    in ``mix``; None for a tensor it leaves as it is (1-D, norms, routers). ``tied``: the model has
    no output.weight, so token_embd is also the output head."""
    if mix not in MIXES:
        raise ValueError(f"unknown GGUF mix {mix!r}; one of {', '.join(MIXES)}")
    if not name.endswith("weight") or len(shape) < 2 or any(key in name for key in _NOT_QUANTIZED):
        return None
    spec, row, cat = MIXES[mix], shape[-1], category(name)
    chosen = spec.base
    if cat == "output" or (tied and cat == "token_embd"):
        if row % BLOCK[spec.base]:
            chosen = "Q8_0"
        elif spec.base != "Q8_0":
            chosen = "Q6_K"
        return fallback(chosen, row)
    i = _layer(name)
    for when, ggml_type in spec.rules.get(cat, ()):
        if i is not None and _WHEN[when](i, model.n_layers, model):
            chosen = ggml_type
            break
    if cat == "attn_v" and model.is_70b and chosen in ("Q3_K", "Q4_K"):
        chosen = "Q5_K"
    if model.n_expert == 8 and mix != "Q8_0":
        if cat in ("attn_v", "attn_k"):
            chosen = "Q8_0"
        elif cat == "attn_output" and mix in _EXPERT8_ATTN_OUTPUT:
            chosen = "Q5_K"
    return fallback(chosen, row)


# ------------------------------------------------------------------------------------- a mix solved in the run


def linear_types(reader, mix: str, linears: list[str]) -> dict[str, str]:
    """{linear's full name: ggml type} of the decoder ``linears`` in llama.cpp's ``mix`` (its dry run on the
    checkpoint's skeleton, :func:`pipeline.formats.gguf.mix_types`). ConfigError when llama-cpp-python is missing, or when llama.cpp
    gives a linear a type strata has no grid for (F16: a row no quantized type holds)."""
    from strata_quant.pipeline.errors import ConfigError
    from strata_quant.pipeline.formats.gguf import check_gguf, mix_types
    from strata_quant.workers.ggml import GRIDS

    try:
        types = mix_types(reader, llama_file_type(mix))
    except RuntimeError as err:
        raise ConfigError(f"output.gguf_type {mix}: {err}") from None
    layout = check_gguf(reader.config, reader.tensor_names)
    out = {}
    for linear in linears:
        gname = layout.name(f"{linear}.weight")
        gtype = types.get(gname or "")
        if gtype not in GRIDS:
            raise ConfigError(
                f"output.gguf_type {mix}: llama.cpp gives {linear} ({gname}) type {gtype}, which has no quantized "
                f"grid (its rows of {reader.shape(f'{linear}.weight')[-1]} values fit no fallback of the mix)"
            )
        out[linear] = gtype
    return out


def own_linear_types(reader, overrides: dict[str, str], linears: list[str]) -> dict[str, str]:
    """``output.gguf_types`` (a mix of strata's own) on the decoder ``linears``: {linear: type} of every linear
    a key matches (:func:`pipeline.overrides.type_overrides`). ConfigError, before block 0, for a key that
    matches nothing or a type whose block does not divide the linear's rows."""
    from strata_quant.pipeline.errors import ConfigError
    from strata_quant.pipeline.overrides import type_overrides

    if not overrides:
        return {}
    out = type_overrides(overrides, linears)
    for linear, ggml_type in out.items():
        row = reader.shape(f"{linear}.weight")[-1]
        if row % BLOCK[ggml_type]:
            raise ConfigError(
                f"output.gguf_types: {linear} cannot be {ggml_type}: its rows of {row} values are not a multiple "
                f"of the type's block of {BLOCK[ggml_type]}"
            )
    return out
