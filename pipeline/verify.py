"""Verify artifacts against the run record and in the readers users load them with."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.assemble import ResultSource
from pipeline.checkpoint import CheckpointReader
from pipeline.formats import awq as awq_format
from pipeline.formats import compressed_tensors as ct_format
from pipeline.formats import gptq as gptq_format
from workers.result import QuantizedLinear


class VerifyError(RuntimeError):
    pass


def _open_safetensors(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {name: folder / "model.safetensors" for name in f.keys()}


def _load(paths: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        if name not in paths:
            raise VerifyError(f"tensor {name} is missing from the artifact")
        with safe_open(paths[name], "pt") as f:
            out[name] = f.get_tensor(name)
    return out


Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _verify_packed(
    folder: Path,
    reader: CheckpointReader,
    results: ResultSource,
    fmt: str,
    expected: Callable[[QuantizedLinear], Expected],
    decode: Callable[[dict[str, torch.Tensor], str, QuantizedLinear], torch.Tensor],
) -> dict:
    """Every tensor present with the right dtype and shape; packed linears decode (by the
    FORMATS.md rule) to exactly the solver's dequantized weights; other tensors equal."""
    paths = _open_safetensors(folder)
    linears = exact = others = 0
    for name in reader.tensor_names:
        linear, _, leaf = name.rpartition(".")
        if linear in results and leaf == "weight":
            result = results.get(linear)
            shapes = expected(result)
            tensors = _load(paths, [f"{linear}.{suffix}" for suffix in shapes])
            for suffix, (shape, dtype) in shapes.items():
                t = tensors[f"{linear}.{suffix}"]
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise VerifyError(f"{linear}.{suffix}: {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
            if not torch.equal(decode(tensors, linear, result), result.dequantize()):
                raise VerifyError(f"{linear}: packed weights differ from the solver's result")
            linears += 1
            exact += 1
        elif linear in results and leaf == "bias":
            _load(paths, [name])
        else:
            got = _load(paths, [name])[name]
            want = reader.load([name])[name]
            if got.dtype != want.dtype or not torch.equal(got, want):
                raise VerifyError(f"{name} differs from the checkpoint")
            others += 1
    return {"format": fmt, "quantized_linears": linears, "bit_exact_linears": exact, "other_tensors": others}


def _quantization_config(folder: Path, method: str) -> dict:
    config = json.loads((folder / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != method:
        raise VerifyError(f"{folder}/config.json has no {method} quantization_config")
    return qcfg


def verify_gptq(folder: Path, reader: CheckpointReader, results: ResultSource) -> dict:
    """Every tensor present with the right dtype and shape; packed linears decode (by the
    FORMATS.md rule) to exactly the solver's dequantized weights; other tensors equal."""
    qcfg = _quantization_config(folder, "gptq")
    bits, fmt = int(qcfg["bits"]), qcfg["checkpoint_format"]

    def expected(result: QuantizedLinear) -> Expected:
        n_rows, n_cols = result.shape
        n_groups = result.scales.shape[1]
        return {
            "qweight": ((n_cols * bits // 32, n_rows), torch.int32),
            "qzeros": ((n_groups, n_rows * bits // 32), torch.int32),
            "scales": ((n_groups, n_rows), torch.float16),
            "g_idx": ((n_cols,), torch.int32),
        }

    def decode(tensors, linear, _result):
        return gptq_format.unpack_linear(tensors, linear, bits, fmt)

    return _verify_packed(folder, reader, results, "gptq", expected, decode)


def verify_awq(folder: Path, reader: CheckpointReader, results: ResultSource) -> dict:
    """AWQ GEMM: config, tensor shapes and dtypes, and every packed linear decoding (by the
    FORMATS.md rule, ORDER-interleaved nibbles) to exactly the solver's weights."""
    qcfg = _quantization_config(folder, "awq")
    if int(qcfg["bits"]) != 4 or qcfg.get("version") != "gemm" or not qcfg.get("zero_point"):
        raise VerifyError(f"{folder}: expected a 4-bit zero-point GEMM AWQ config, got {qcfg}")
    group = int(qcfg["group_size"])

    def expected(result: QuantizedLinear) -> Expected:
        n_rows, n_cols = result.shape
        return {
            "qweight": ((n_cols, n_rows // 8), torch.int32),
            "qzeros": ((n_cols // group, n_rows // 8), torch.int32),
            "scales": ((n_cols // group, n_rows), torch.float16),
        }

    def decode(tensors, linear, _result):
        return awq_format.unpack_linear(tensors, linear, group)

    return _verify_packed(folder, reader, results, "awq", expected, decode)


def verify_compressed_tensors(folder: Path, reader: CheckpointReader, results: ResultSource) -> dict:
    """compressed-tensors pack-quantized: config, tensor shapes and dtypes (zero points
    only when asymmetric), and every packed linear decoding to exactly the solver's weights."""
    qcfg = _quantization_config(folder, "compressed-tensors")
    if qcfg.get("format") != "pack-quantized" or qcfg.get("quantization_status") != "compressed":
        raise VerifyError(f"{folder}: expected a compressed pack-quantized config")
    groups = list(qcfg["config_groups"].values())
    if len(groups) != 1:
        raise VerifyError(f"{folder}: expected one config group, got {len(groups)}")
    weights = groups[0]["weights"]
    bits, sym = int(weights["num_bits"]), bool(weights["symmetric"])

    def expected(result: QuantizedLinear) -> Expected:
        n_rows, n_cols = result.shape
        n_groups = result.scales.shape[1]
        out = {
            "weight_packed": ((n_rows, math.ceil(n_cols * bits / 32)), torch.int32),
            "weight_scale": ((n_rows, n_groups), torch.float16),
            "weight_shape": ((2,), torch.int64),
        }
        if not sym:
            out["weight_zero_point"] = ((math.ceil(n_rows * bits / 32), n_groups), torch.int32)
        return out

    def decode(tensors, linear, _result):
        return ct_format.unpack_linear(tensors, linear, bits, sym)

    return _verify_packed(folder, reader, results, "compressed-tensors", expected, decode)


def verify_gguf(path: Path, reader: CheckpointReader, results: ResultSource):
    """Load the GGUF with transformers (gguf-py's dequantizer) and compare every weight:
    quantized linears must equal the solver's dequantized weights bit for bit, other
    tensors the checkpoint's. Returns the summary and the loaded model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    state = model.state_dict()
    linears = others = 0
    for name in reader.tensor_names:
        linear, _, leaf = name.rpartition(".")
        if name not in state:
            raise VerifyError(f"{path.name}: transformers did not load {name}")
        if linear in results and leaf == "weight":
            if not torch.equal(state[name], results.get(linear).dequantize()):
                diff = (state[name] - results.get(linear).dequantize()).abs().max()
                raise VerifyError(f"{path.name}: {name} differs from the solver's result (max |Δ| {diff:g})")
            linears += 1
        else:
            want = reader.load([name])[name].float()
            if not torch.equal(state[name], want):
                raise VerifyError(f"{path.name}: {name} differs from the checkpoint")
            others += 1
    summary = {
        "format": "gguf",
        "reader": "transformers (gguf-py)",
        "bit_exact_linears": linears,
        "other_tensors": others,
    }
    return summary, model
