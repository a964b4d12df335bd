"""bitsandbytes 4-bit (NF4) safetensors, the layout transformers loads for ``load_in_4bit``.

Per quantized Linear ``<m>`` with W [N, K] (checked against bitsandbytes 0.50.2
``QuantState.as_dict(packed=True)`` / ``from_dict`` and transformers 5.24's loader):

| tensor | dtype | shape |
|---|---|---|
| ``<m>.weight`` | uint8 | [⌈N·K/2⌉, 1] — flattened row-major, element 2i in the high nibble |
| ``<m>.weight.absmax`` | float32, or uint8 with double quant | [⌈N·K/64⌉] |
| ``<m>.weight.quant_map`` | float32 | [16] — the NF4 levels |
| ``<m>.weight.nested_absmax`` | float32 | [⌈N·K/64/256⌉] (double quant) |
| ``<m>.weight.nested_quant_map`` | float32 | [256] — the 8-bit dynamic map (double quant) |
| ``<m>.weight.quant_state.bitsandbytes__nf4`` | uint8 | UTF-8 JSON bytes |

The JSON holds ``quant_type`` "nf4", ``blocksize``, ``dtype`` (the dequantized dtype, e.g.
"float16"), ``shape`` [N, K] and, with double quant, ``nested_blocksize`` (256),
``nested_dtype`` "float32" and ``nested_offset`` (the mean subtracted from the absmax).

Dequantize: absmax = nested_quant_map[absmax] · nested_absmax[i // 256] + nested_offset
(double quant), then W = quant_map[code] · absmax[i // 64] in fp32, cast to ``dtype``.
config.json carries ``quantization_config`` with ``quant_method: "bitsandbytes"``,
``load_in_4bit``, ``bnb_4bit_quant_type: "nf4"``, ``bnb_4bit_use_double_quant`` and the
compute / storage dtypes; linears left in 16-bit are listed in ``llm_int8_skip_modules``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from strata_quant.pipeline.formats.base import (
    DTYPE_NAMES,
    SafetensorsFormat,
    checkpoint_float_dtype,
    unquantized_linears,
)
from strata_quant.workers.nf4 import NF4_LEVELS, NF4Linear, dynamic_map, unpack_nibbles

QS_KEY = "quant_state.bitsandbytes__nf4"


def _json_tensor(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def linear_tensors(result: NF4Linear, prefix: str, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The bitsandbytes tensors of one linear, named ``<prefix>.weight`` and ``<prefix>.weight.*``."""
    state = {
        "quant_type": "nf4",
        "blocksize": result.blocksize,
        "dtype": DTYPE_NAMES[dtype],
        "shape": list(result.shape),
    }
    out = {
        f"{prefix}.weight": result.packed(),
        f"{prefix}.weight.absmax": result.absmax.contiguous(),
        f"{prefix}.weight.quant_map": NF4_LEVELS.clone(),
    }
    if result.double_quant:
        state.update(nested_blocksize=result.nested_blocksize, nested_dtype="float32", nested_offset=result.offset)
        out[f"{prefix}.weight.nested_absmax"] = result.nested_absmax.contiguous()  # type: ignore[union-attr]
        out[f"{prefix}.weight.nested_quant_map"] = dynamic_map()
    out[f"{prefix}.weight.{QS_KEY}"] = _json_tensor(state)
    return out


def decode_linear(tensors: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference decoder, by the rule in the module docstring, independent of NF4Linear; the
    result is cast to the quant state's dtype, or to ``dtype`` when given (fp32: no rounding)."""
    state = json.loads(bytes(tensors[f"{prefix}.weight.{QS_KEY}"].tolist()).decode("utf-8"))
    shape = tuple(state["shape"])
    codes = unpack_nibbles(tensors[f"{prefix}.weight"], shape).reshape(-1).long()
    absmax = tensors[f"{prefix}.weight.absmax"]
    if "nested_absmax" in {k.rsplit(".", 1)[-1] for k in tensors if k.startswith(prefix)}:
        nb = state["nested_blocksize"]
        nested = tensors[f"{prefix}.weight.nested_absmax"].float().repeat_interleave(nb)[: absmax.numel()]
        absmax = tensors[f"{prefix}.weight.nested_quant_map"][absmax.long()] * nested + torch.tensor(
            float(state["nested_offset"]), dtype=torch.float32
        )
    scale = absmax.float().repeat_interleave(state["blocksize"])[: codes.numel()]
    w = tensors[f"{prefix}.weight.quant_map"].float()[codes] * scale
    return w.reshape(shape).to(dtype or getattr(torch, state["dtype"]))


def quantization_config(
    double_quant: bool, compute_dtype: str = "float16", skip_modules: list[str] | None = None
) -> dict:
    """config.json ``quantization_config`` as transformers' BitsAndBytesConfig.to_dict() writes it."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
    }


def export_model(
    src: str | Path, results: dict[str, NF4Linear], out: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write a bitsandbytes-NF4 checkpoint: ``src``'s tensors with each linear in ``results``
    (by module name) replaced by its NF4 tensors, plus config and tokenizer files.

    Single-shard and in memory (fixture-sized models); the streamed, sharded writer belongs
    in pipeline/assemble.py. lm_head and other linears not in ``results`` stay in ``dtype``.
    """
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    dq = {r.double_quant for r in results.values()}
    if len(dq) > 1:
        raise ValueError("mixing double-quantized and plain NF4 linears in one checkpoint is not supported")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    for name, result in results.items():
        weight = tensors.pop(f"{name}.weight")
        if tuple(weight.shape) != tuple(result.shape):
            raise ValueError(f"{name}: result shape {result.shape} != weight shape {tuple(weight.shape)}")
        tensors.update(linear_tensors(result, name, dtype))  # quant state stays float32
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = DTYPE_NAMES[dtype]
    config["quantization_config"] = quantization_config(dq.pop() if dq else True, DTYPE_NAMES[dtype])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and (
            f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json")
        ):
            shutil.copy(f, out / f.name)
    return out


class BitsandbytesFormat(SafetensorsFormat, name="bitsandbytes", methods=("nf4", "gptq_nf4")):
    """A bitsandbytes NF4 checkpoint (transformers ``load_in_4bit``): each NF4 result as the
    packed codes, absmax (nested with double quant), maps and quant state; the dequantized dtype
    is the checkpoint's float dtype; linears left unquantized go in ``llm_int8_skip_modules``."""

    verifier = "verify_bitsandbytes"
    suffix = "bnb-nf4"
    loader = "transformers AutoModelForCausalLM with bitsandbytes (load_in_4bit)"
    bias_dtype = None

    def __init__(self) -> None:
        self.double_quant: set[bool] = set()
        self.dtype: torch.dtype | None = None

    def pack(self, result, module: str) -> dict[str, torch.Tensor]:
        if not isinstance(result, NF4Linear):
            raise ValueError(f"bitsandbytes output holds NF4 results, got {type(result).__name__}")
        self.double_quant.add(result.double_quant)
        if len(self.double_quant) > 1:
            raise ValueError("double-quantized and plain NF4 linears cannot share one quantization_config")
        return linear_tensors(result, module, self.dtype)

    def write(self, reader, results, dest, options):
        self.dtype = checkpoint_float_dtype(reader)
        return super().write(reader, results, dest, options)

    def quantization_config(self, reader, results) -> dict:
        skip = ["lm_head", *unquantized_linears(reader, results)]
        return quantization_config(next(iter(self.double_quant)), DTYPE_NAMES[self.dtype], skip)

    def config_dtype(self, reader) -> torch.dtype:
        return self.dtype
