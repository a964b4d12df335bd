"""compressed-tensors "float-quantized" (FP8 E4M3 weights) safetensors.

Per quantized Linear ``<m>`` with W [N, K] (checked against compressed-tensors 0.20's
``FloatQuantizationCompressor`` / ``dequantize`` and transformers 5.24's loader):

* ``<m>.weight`` float8_e4m3fn [N, K];
* ``<m>.weight_scale`` [N, 1] (strategy "channel") or [⌈N/bn⌉, ⌈K/bk⌉] (strategy "block",
  ``block_structure`` [bn, bk]), float32 (or bfloat16) — the reader dequantizes
  ``float(q) · scale`` in the scale's dtype, so float32 scales reproduce our fp32 weights.

``quantization_config``: quant_method "compressed-tensors", format "float-quantized",
one config group over Linear with weights {num_bits 8, type "float", symmetric, strategy,
block_structure}, ``ignore`` ["lm_head"] and status "compressed". Weight-only by default;
``dynamic_activations=True`` adds dynamic FP8 input activations (per token for channel,
per group of bk for block), as llm-compressor's FP8_DYNAMIC / FP8_BLOCK schemes, which is
what vLLM's FP8 kernels want. compressed-tensors has no E5M2 weight type: E5M2 is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from strata_quant.pipeline.formats.base import (
    SafetensorsFormat,
    checkpoint_float_dtype,
    unquantized_linears,
)
from strata_quant.workers.fp8 import FP8Linear


def linear_tensors(result: FP8Linear, prefix: str, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    if result.fmt != "e4m3":
        raise ValueError(f"compressed-tensors float-quantized stores E4M3 weights only, got {result.fmt}")
    out = {f"{prefix}.weight": result.weight.contiguous(), f"{prefix}.weight_scale": result.scale.contiguous()}
    if bias is not None:
        out[f"{prefix}.bias"] = bias
    return out


def decode_linear(tensors: dict[str, torch.Tensor], prefix: str, block: tuple[int, int] | None) -> torch.Tensor:
    """Reference decoder: float(q) · scale broadcast over the channel or block, fp32."""
    from strata_quant.workers.fp8 import expand_scale

    q = tensors[f"{prefix}.weight"]
    return q.float() * expand_scale(tensors[f"{prefix}.weight_scale"], tuple(q.shape), block)  # type: ignore[arg-type]


def quantization_config(block: tuple[int, int] | None, dynamic_activations: bool = False) -> dict:
    weights = {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": "channel" if block is None else "block",
        "block_structure": list(block) if block is not None else None,
        "group_size": None,
        "dynamic": False,
        "observer": "minmax",
    }
    acts = None
    if dynamic_activations:
        acts = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "dynamic": True,
            "strategy": "token" if block is None else "group",
            "group_size": None if block is None else block[1],
            "observer": None,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": acts,
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def export_model(
    src: str | Path,
    results: dict[str, FP8Linear],
    out: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    dynamic_activations: bool = False,
) -> Path:
    """Write a float-quantized checkpoint from ``src`` with the linears in ``results`` replaced.

    Every quantized linear must share one strategy/block (one config group); the others
    (lm_head, embeddings, norms) are written in ``dtype``. Single shard, in memory.
    """
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = {r.block for r in results.values()}
    if len(blocks) != 1:
        raise ValueError(f"one strategy per checkpoint, got blocks {blocks}")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    for name, result in results.items():
        tensors.pop(f"{name}.weight")
        tensors.update(linear_tensors(result, name))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config(blocks.pop(), dynamic_activations)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and (
            f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json")
        ):
            shutil.copy(f, out / f.name)
    return out


class FP8Format(SafetensorsFormat, name="compressed-tensors", methods=("fp8",)):
    """compressed-tensors float-quantized (FP8 E4M3): each FP8 result as its float8 weight and
    scale; one strategy (channel, or one block shape) for all linears; unquantized linears
    under ``ignore``; biases and config dtype as the checkpoint's."""

    verifier = "verify_fp8"
    suffix = "compressed-tensors"
    loader = "transformers AutoModelForCausalLM with compressed-tensors (vLLM FP8 kernels)"
    bias_dtype = None

    def __init__(self) -> None:
        self.blocks: set = set()

    def pack(self, result, module: str) -> dict[str, torch.Tensor]:
        if not isinstance(result, FP8Linear):
            raise ValueError(f"float-quantized output holds FP8 results, got {type(result).__name__}")
        self.blocks.add(result.block)
        if len(self.blocks) > 1:
            raise ValueError(f"one FP8 strategy per checkpoint, the run has blocks {sorted(self.blocks, key=str)}")
        return linear_tensors(result, module)

    def quantization_config(self, reader, results) -> dict:
        qcfg = quantization_config(next(iter(self.blocks)))
        qcfg["ignore"] = ["lm_head", *unquantized_linears(reader, results)]
        return qcfg

    def config_dtype(self, reader) -> torch.dtype:
        return checkpoint_float_dtype(reader)
