"""A solved linear as the worker stores it: deterministic safetensors bytes of its result (or of a
float tensor AWQ folded), and the record entry that names them (key, sha256, grid, errors)."""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from strata_quant.workers.gptq import relative_output_error
from strata_quant.workers.methods import Result, result_from_tensors, result_kind

FLOAT_SCHEMA_VERSION = 1


def result_to_bytes(result: Result) -> bytes:
    """Deterministic safetensors bytes of any result (QuantizedLinear, NF4Linear, FP8Linear,
    KeptLinear): its tensors and one JSON metadata entry (``strata_result``, sorted keys)."""
    tensors, metadata = result.to_tensors()
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def result_from_bytes(data: bytes) -> Result:
    tensors = load_safetensors(data)
    metadata = _safetensors_metadata(data)
    return result_from_tensors(tensors, metadata)


def grid_fields(result: Result) -> dict:
    """The record fields that describe a result's grid: bits / group_size / sym for every kind
    (NF4: 4-bit, its block as the group; FP8: 8-bit, per channel = -1; kept: 16-bit, null), plus
    ``kind`` and the method's own settings for the non-integer kinds."""
    kind = result_kind(result)
    if kind == "int":
        return {"bits": result.spec.bits, "group_size": result.spec.group_size, "sym": result.spec.sym}
    if kind == "nf4":
        return {
            "bits": 4,
            "group_size": result.blocksize,
            "sym": True,
            "kind": "nf4",
            "double_quant": result.double_quant,
            "bits_per_weight": result.bits_per_weight(),
        }
    if kind == "fp8":
        return {
            "bits": 8,
            "group_size": -1 if result.block is None else result.block[1],
            "sym": True,
            "kind": "fp8",
            "fp8_type": result.fmt,
            "fp8_block": list(result.block) if result.block else None,
            "bits_per_weight": result.bits_per_weight(),
        }
    if kind == "ggml":  # a ggml type's grid: its code width, block, offset and name
        g = result.grid
        return {"bits": g.bits, "group_size": g.block, "sym": not g.affine, "kind": "ggml", "ggml_type": g.name}
    return {"bits": 16, "group_size": None, "sym": None, "kind": "kept", "skipped": True, "reason": result.reason}


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {})


def _tensor_bytes(name: str, tensor: torch.Tensor, tag: str, meta: dict) -> bytes:
    """One tensor under ``name`` as deterministic safetensors bytes, ``meta`` as sorted JSON under ``tag``."""
    return save_safetensors(
        {name: tensor.detach().cpu().contiguous()},
        metadata={tag: json.dumps({"schema": FLOAT_SCHEMA_VERSION, **meta}, sort_keys=True)},
    )


def float_to_bytes(name: str, tensor: torch.Tensor, meta: dict) -> bytes:
    """One float tensor (under its checkpoint name) as deterministic safetensors bytes, in float32."""
    return _tensor_bytes(name, tensor.float(), "strata_float", meta)


def float_from_bytes(data: bytes, name: str) -> torch.Tensor:
    """The inverse of :func:`float_to_bytes`: the tensor stored under ``name``."""
    return load_safetensors(data)[name]


def read_statistics(store, entry: dict, name: str, device: torch.device) -> torch.Tensor:
    """The Hessian a statistics entry names, checked against its sha256 (``name``: the group's first
    linear, full name)."""
    return float_from_bytes(_checked(store, entry), f"{name}.hessian").to(device)


def result_entry(
    full_name: str,
    key: str,
    digest: str,
    data: bytes,
    result: Result,
    weight: torch.Tensor,
    dequant: torch.Tensor,
    hessian: torch.Tensor | None,
    output_error: float | None = None,
) -> dict:
    """The record entry of a stored result: where its bytes are, its grid, ‖W − Ŵ‖² / ‖W‖² and,
    with H, the relative output error tr(E H Eᵀ) / tr(W H Wᵀ) (``output_error``: summed from the
    workers' shares of a split solve); GPTQ's damping and dead inputs."""
    info = {
        "name": full_name,
        "key": key,
        "sha256": digest,
        "bytes": len(data),
        "shape": list(result.shape),
        **grid_fields(result),
        "weight_rel_error": float((weight - dequant).pow(2).sum() / weight.pow(2).sum().clamp(min=1e-30)),
    }
    params = getattr(result, "params", {})
    if "damp_used" in params:  # GPTQ: the damping the Cholesky needed, and the inputs it zeroed (H[k, k] = 0)
        info["damp"] = float(params["damp"])
        info["damp_used"] = float(params["damp_used"])
        info["dead_inputs"] = int(params.get("dead_inputs", 0))
    if output_error is not None:
        info["output_rel_error"] = output_error
    elif hessian is not None:
        info["output_rel_error"] = relative_output_error(weight, dequant, hessian)
    return info


class ResultWriter:
    """A run's block results into its store, under ``{run_prefix}/blocks/{b:05d}/`` and their
    checkpoint names (``{layers_path}.{b}.{name}``): the bytes go to ``uploads`` (an object whose
    ``put(key, data)`` stores them, possibly later, and returns their sha256), the record entry
    comes back at once."""

    def __init__(self, uploads, run_prefix: str, layers_path: str, method: str):
        self.uploads, self.run_prefix, self.layers_path, self.method = uploads, run_prefix, layers_path, method

    def _put(self, b: int, name: str, suffix: str, data: bytes) -> tuple[str, str, str]:
        full_name = f"{self.layers_path}.{b}.{name}"
        key = f"{self.run_prefix}/blocks/{b:05d}/{full_name}{suffix}"
        return full_name, key, self.uploads.put(key, data)

    def result(self, b, name, result, weight, dequant, hessian, output_error: float | None = None) -> dict:
        """A linear's result stored and its record entry (:func:`result_entry`)."""
        data = result_to_bytes(result)
        full_name, key, digest = self._put(b, name, ".safetensors", data)
        return result_entry(full_name, key, digest, data, result, weight, dequant, hessian, output_error)

    def folded(self, b: int, name: str, tensor: torch.Tensor, folded_from: list[str]) -> dict:
        """A float tensor AWQ folded scales into (a norm weight, a bias), stored as float32."""
        full_name = f"{self.layers_path}.{b}.{name}"
        data = float_to_bytes(full_name, tensor, {"method": self.method, "folded_from": folded_from})
        _, key, digest = self._put(b, name, ".float.safetensors", data)
        return {
            "name": full_name,
            "key": key,
            "sha256": digest,
            "bytes": len(data),
            "shape": list(tensor.shape),
            "dtype": "float32",
        }

    def activations(self, b: int, name: str, gram: torch.Tensor, tokens: int) -> dict:
        """The linear's input statistics for an importance matrix: in_sum2[k] = Σ_t x_tk² over the
        run's calibration tokens (all workers'), = diag(H)·n/2 for H = 2·XᵀX/n; float32 [K]."""
        full_name = f"{self.layers_path}.{b}.{name}"
        in_sum2 = torch.diagonal(gram).double() * (tokens / 2.0)
        data = float_to_bytes(f"{full_name}.in_sum2", in_sum2.float(), {"tokens": int(tokens)})
        _, key, digest = self._put(b, name, ".activations.safetensors", data)
        return {"key": key, "sha256": digest, "tokens": int(tokens), "in_features": int(gram.shape[0])}

    def statistics(self, b: int, names: list[str], stage: int, hessian: torch.Tensor, tokens: int) -> dict:
        """A shared-input group's H = 2·XᵀX / n as its solve used it, stored under the group's first
        linear (``.hessian.safetensors``); the entry names the group, its true-sequential stage and n,
        what a run solving from it (``calibration.statistics``) rebuilds the block's plan from."""
        full_name = f"{self.layers_path}.{b}.{names[0]}"
        meta = {"group": list(names), "stage": stage, "tokens": int(tokens)}
        # in the dtype the solve used (float64 by default): a solve from it is the solve that was
        data = _tensor_bytes(f"{full_name}.hessian", hessian, "strata_statistics", meta)
        _, key, digest = self._put(b, names[0], ".hessian.safetensors", data)
        return {"key": key, "sha256": digest, "bytes": len(data), **meta}


def read_block_results(
    store, prefix: str, record: dict, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Dequantized weights and folded float tensors of a finished block (its ``record``), each
    checked against its sha256, by name inside the block (``prefix``: ``{layers_path}.{b}.``)."""
    weights, floats = {}, {}
    for entry in record["results"]:
        weights[entry["name"][len(prefix) :]] = result_from_bytes(_checked(store, entry)).dequantize().to(device)
        for f in entry.get("float_results", []):
            floats[f["name"][len(prefix) :]] = float_from_bytes(_checked(store, f), f["name"]).to(device)
    return weights, floats


def _checked(store, entry: dict) -> bytes:
    data = store.get_bytes(entry["key"])
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"stored result {entry['key']} does not match its record")
    return data
