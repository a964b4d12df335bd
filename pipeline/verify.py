"""Verify artifacts against the run record and in the readers users load them with."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.assemble import ResultSource
from pipeline.checkpoint import CheckpointReader
from pipeline.formats import gptq as gptq_format


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


def verify_gptq(folder: Path, reader: CheckpointReader, results: ResultSource) -> dict:
    """Every tensor present with the right dtype and shape; packed linears decode (by the
    FORMATS.md rule) to exactly the solver's dequantized weights; other tensors equal."""
    config = json.loads((folder / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "gptq":
        raise VerifyError(f"{folder}/config.json has no gptq quantization_config")
    bits, fmt = int(qcfg["bits"]), qcfg["checkpoint_format"]
    paths = _open_safetensors(folder)
    linears = exact = others = 0
    for name in reader.tensor_names:
        linear, _, leaf = name.rpartition(".")
        if linear in results and leaf == "weight":
            result = results.get(linear)
            n_rows, n_cols = result.shape
            n_groups = result.scales.shape[1]
            tensors = _load(paths, [f"{linear}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")])
            expected = {
                "qweight": ((n_cols * bits // 32, n_rows), torch.int32),
                "qzeros": ((n_groups, n_rows * bits // 32), torch.int32),
                "scales": ((n_groups, n_rows), torch.float16),
                "g_idx": ((n_cols,), torch.int32),
            }
            for suffix, (shape, dtype) in expected.items():
                t = tensors[f"{linear}.{suffix}"]
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise VerifyError(f"{linear}.{suffix}: {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
            decoded = gptq_format.unpack_linear(tensors, linear, bits, fmt)
            if not torch.equal(decoded, result.dequantize()):
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
    return {"format": "gptq", "quantized_linears": linears, "bit_exact_linears": exact, "other_tensors": others}


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
