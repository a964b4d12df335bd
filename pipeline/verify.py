"""Verify artifacts against the run record and in the readers users load them with."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from strata_quant.pipeline.checkpoint import CheckpointReader
from strata_quant.pipeline.formats import awq as awq_format
from strata_quant.pipeline.formats import compressed_tensors as ct_format
from strata_quant.pipeline.formats import gptq as gptq_format
from strata_quant.pipeline.formats.base import Format, ResultSource, registered, unquantized_linears
from strata_quant.pipeline.prompts import LLAMACPP_PASSAGE, LLAMACPP_PROMPT
from strata_quant.workers.result import QuantizedLinear


class VerifyError(RuntimeError):
    pass


def _open_safetensors(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {name: folder / "model.safetensors" for name in f.keys()}


def _load(paths: dict[str, Path | tuple[Path, str]], names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors by name from their files (a (file, stored name) entry: stored under another name)."""
    out = {}
    for name in names:
        if name not in paths:
            raise VerifyError(f"tensor {name} is missing from the artifact")
        path, stored = paths[name] if isinstance(paths[name], tuple) else (paths[name], name)
        with safe_open(path, "pt") as f:
            out[name] = f.get_tensor(stored)
    return out


Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]


def check_every_linear(reader: CheckpointReader, results: ResultSource) -> None:
    """Every linear of every block of the model (as its own class builds them) has a result in
    the run record, quantized or recorded as kept in 16-bit: an artifact is verified against the
    model, not only against the linears a record happens to list."""
    from strata_quant.pipeline.structure import block_linear_names

    kept = getattr(results, "kept", set())
    missing = [n for names in block_linear_names(reader).values() for n in names if n not in results and n not in kept]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise VerifyError(
            f"{len(missing)} linear(s) of the model have no result in the run record ({shown}): the record is "
            "incomplete and the artifact holds float weights where a quantized linear belongs"
        )


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
    check_every_linear(reader, results)
    paths = _checkpoint_side(_open_safetensors(folder), reader, fmt)
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
        elif linear in results and leaf == "bias":  # carried as float16 (AWQ's folded copy where it has one)
            got = _load(paths, [name])[name]
            if got.dtype != torch.float16 or not torch.equal(got, results.float_tensor(reader, name).half()):
                raise VerifyError(f"{name} differs from the checkpoint's bias (as float16)")
            others += 1
        else:
            got = _load(paths, [name])[name]
            want = results.float_tensor(reader, name)
            if got.dtype != want.dtype or not torch.equal(got, want):
                raise VerifyError(f"{name} differs from the checkpoint")
            others += 1
    return {"format": fmt, "quantized_linears": linears, "bit_exact_linears": exact, "other_tensors": others}


def _checkpoint_side(paths: dict[str, Path], reader: CheckpointReader, fmt: str) -> dict:
    """The artifact's tensors under the checkpoint's names: a MoE written for GPTQModel names its experts
    as GPTQModel reads them (pipeline.formats.moe.defused_names), mapped back here by tensor or by linear."""
    from strata_quant.pipeline.formats.moe import DefusedExperts

    defused = any(cls.name == fmt and issubclass(cls, DefusedExperts) for cls in registered())
    rename = DefusedExperts().loader_names(reader) if defused else None
    if not rename:
        return paths
    back = {v: k for k, v in rename.items()}
    out = {}
    for name, path in paths.items():
        linear, _, suffix = name.rpartition(".")
        out[back[name] if name in back else f"{back[linear]}.{suffix}" if linear in back else name] = (path, name)
    return out


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
    base_bits, fmt = int(qcfg["bits"]), qcfg["checkpoint_format"]
    try:  # mixed precision: per-module widths as ``dynamic`` overrides
        declared = gptq_format.dynamic_module_bits(qcfg)
    except ValueError as err:
        raise VerifyError(f"{folder}/config.json: {err}") from None
    stray = sorted(set(declared) - set(results.entries))
    if stray:
        raise VerifyError(f"{folder}/config.json: dynamic overrides name modules the run did not quantize: {stray[:3]}")
    for linear, entry in results.entries.items():
        if declared.get(linear, base_bits) != int(entry["bits"]):
            raise VerifyError(
                f"{linear}: config declares {declared.get(linear, base_bits)} bits, the run solved {entry['bits']}"
            )

    def expected(result: QuantizedLinear) -> Expected:
        bits = result.spec.bits  # equal to the declared width (checked above)
        n_rows, n_cols = result.shape
        n_groups = result.scales.shape[1]
        return {
            "qweight": ((n_cols * bits // 32, n_rows), torch.int32),
            "qzeros": ((n_groups, n_rows * bits // 32), torch.int32),
            "scales": ((n_groups, n_rows), torch.float16),
            "g_idx": ((n_cols,), torch.int32),
        }

    def decode(tensors, linear, _result):
        return gptq_format.unpack_linear(tensors, linear, declared.get(linear, base_bits), fmt)

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


def _weight_error(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got - want).abs()
    return {
        "max_abs": float(diff.max()),
        "sum_abs": float(diff.double().sum()),
        "sq_err": float((got - want).double().pow(2).sum()),
        "sq_ref": float(want.double().pow(2).sum()),
        "n": diff.numel(),
    }


def _merge_errors(parts: list[dict]) -> dict:
    if not parts:
        return {}
    n = sum(p["n"] for p in parts)
    return {
        "max_abs": max(p["max_abs"] for p in parts),
        "mean_abs": sum(p["sum_abs"] for p in parts) / n,
        "rel_rms": math.sqrt(sum(p["sq_err"] for p in parts) / max(sum(p["sq_ref"] for p in parts), 1e-30)),
    }


#: fp32 bytes of a model up to which verify_gguf also loads the whole file in transformers (and
#: llama.cpp) and compares it with gguf-py's reading (``output.whole_model_check_limit``)
WHOLE_MODEL_CHECK_LIMIT = 8 * 10**9
#: float32 bytes of one slice of rows compared at a time
ROWS_BYTES = 64 << 20


class GGUFTensors:
    """A GGUF file's tensors by HF name, read a slice of rows at a time with gguf-py's dequantizer
    (no memory map is kept: each slice is read with pread, so the resident set stays one slice).
    Q/K rows come back in HF order (the inverse of gguf.permute_qk_rows, per whole head, where the family's
    layout permutes them)."""

    def __init__(self, path: Path, config: dict):
        from gguf import GGUFReader

        from strata_quant.pipeline.formats import gguf as gguf_format
        from strata_quant.pipeline.formats import gguf_moe

        self.path = path
        self.by_gguf_name = {
            t.name: (
                t.tensor_type,
                tuple(int(d) for d in reversed(t.shape.tolist())),
                int(t.data_offset),
                int(t.n_bytes),
            )
            for t in GGUFReader(path).tensors
        }
        self.layout = gguf_format.GGUFLayout(config)
        self.moe = self.layout.hf_arch in gguf_moe.MOE_LAYOUTS
        if self.moe:  # a stack of experts [E, N, K]: expert e's rows as tensor "<name>#e" of its own
            for gname, (qtype, shape, offset, n_bytes) in list(self.by_gguf_name.items()):
                if len(shape) == 3:
                    each = n_bytes // shape[0]
                    for e in range(shape[0]):
                        self.by_gguf_name[f"{gname}#{e}"] = (qtype, shape[1:], offset + e * each, each)

    def hf_to_gguf(self, name: str) -> str | None:
        from strata_quant.pipeline.formats import gguf_moe

        gname = self.layout.name(name)
        split = gguf_moe.expert_index(name) if self.moe else None
        return f"{gname}#{split[1]}" if gname is not None and split is not None else gname

    def type_name(self, name: str) -> str:
        entry = self.by_gguf_name.get(self.hf_to_gguf(name) or "")
        return entry[0].name if entry else "?"

    def shape(self, name: str) -> tuple[int, ...]:
        gname = self.hf_to_gguf(name)
        if gname not in self.by_gguf_name:
            raise VerifyError(f"{self.path.name}: tensor {name} ({gname}) is missing")
        return self.by_gguf_name[gname][1]

    def row_slices(self, name: str) -> list[tuple[int, int]]:
        """[start, end) row ranges of about ROWS_BYTES in fp32, whole heads for Q/K."""
        shape = self.shape(name)
        rows, width = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
        heads = self._heads(name)
        unit = rows // heads if heads else 1
        step = max(unit, ROWS_BYTES // (4 * width) // unit * unit)
        return [(r, min(r + step, rows)) for r in range(0, rows, step)]

    def _heads(self, name: str) -> int | None:
        return self.layout.qk_heads(name)

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """float32 rows [start, end) of HF tensor ``name`` (a 1-D tensor whole)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        qtype, shape, offset, n_bytes = self.by_gguf_name[self.hf_to_gguf(name)]
        if len(shape) == 1:
            start, end, rows, width = 0, 1, 1, shape[0]
        else:
            rows, width = shape[0], math.prod(shape[1:])
        row_bytes = n_bytes // rows
        buf = np.empty((end - start) * row_bytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(offset + start * row_bytes)
            if f.readinto(memoryview(buf)) != buf.nbytes:
                raise VerifyError(f"{self.path.name}: {name} is truncated")
        if qtype == GGMLQuantizationType.F32:
            data = buf.view(np.float32)
        elif qtype == GGMLQuantizationType.F16:
            data = buf.view(np.float16).astype(np.float32)
        elif qtype == GGMLQuantizationType.BF16:
            data = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif qtype in GGML_QUANT_SIZES:
            data = dequantize(buf.reshape(end - start, row_bytes), qtype)
        else:
            raise VerifyError(f"{self.path.name}: {name} has ggml type {qtype.name}, which gguf-py cannot read")
        out = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(end - start, width)
        heads = self._heads(name)
        if heads:  # undo the interleaving of each head's rotary halves (whole heads per slice)
            head_dim = rows // heads
            out = out.reshape(-1, head_dim // 2, 2, width).transpose(1, 2).reshape(end - start, width)
        return out.reshape(shape) if len(shape) == 1 else out

    def tensor(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0]).reshape(shape)


def _add_errors(total: dict | None, part: dict) -> dict:
    if total is None:
        return dict(part)
    return {
        "max_abs": max(total["max_abs"], part["max_abs"]),
        **{k: total[k] + part[k] for k in ("sum_abs", "sq_err", "sq_ref", "n")},
    }


def verify_gguf(
    path: Path,
    reader: CheckpointReader,
    results: ResultSource,
    *,
    llamacpp: bool = False,
    prompt: str = LLAMACPP_PROMPT,
    whole_model_limit: int = WHOLE_MODEL_CHECK_LIMIT,
):
    """Read the GGUF tensor by tensor with gguf-py (a slice of rows at a time) and compare every weight
    with the run record and the checkpoint.

    Files that carry the solver's result exactly (``strata.carry`` "exact" or "solved", or no strata keys) must give the
    solver's dequantized weights bit for bit. Q4_1 ("nearly": fp16 offsets) and re-quantized files
    (``strata.requantized``) are measured instead: max / mean |Δ| and relative RMS error against the solver's
    weights, bounded so that a broken layout fails (Q4_1: the fp16 rounding of −scale·z; re-quantized:
    relative RMS < 0.5). Other tensors must equal the checkpoint's unless ``strata.embedding_type`` quantized
    them. Memory: one slice of rows (and one stored result) at a time, whatever the model's size.

    Models whose fp32 size is at most ``whole_model_limit`` are also loaded whole by transformers, which must
    give the very tensors gguf-py gave; with ``llamacpp`` the file is then loaded in llama.cpp too and its
    logits on ``prompt`` compared with transformers' (:func:`compare_logits`). Larger models skip both whole-
    model loads (the summary says so). Returns the summary and the transformers model (or None).
    """
    from strata_quant.pipeline.formats import gguf as gguf_format

    check_every_linear(reader, results)
    meta = gguf_format.read_metadata(path)
    carry = meta.get("strata.carry", "exact")
    layout = gguf_format.GGUFLayout(reader.config)
    types: dict[str, int] = {}
    gguf = GGUFTensors(path, reader.config)
    linears = exact = others = 0
    errors: list[dict] = []
    quantized_other: dict[str, dict] = {}
    for name in reader.tensor_names:
        linear, _, leaf = name.rpartition(".")
        if gguf_format.skipped(name):
            continue
        if tuple(gguf.shape(name)) != tuple(reader.shape(name)):
            raise VerifyError(f"{path.name}: {name} has shape {gguf.shape(name)}, the checkpoint {reader.shape(name)}")
        gtype = gguf.type_name(name)
        if linear in results and leaf == "weight":
            types[gtype] = types.get(gtype, 0) + 1
            linears += 1
            err, equal = _gguf_linear(path, gguf, name, results.get(linear), carry)
            errors.append(err)
            exact += equal
        else:
            rel = _gguf_other(path, gguf, name, gtype, reader, results, layout)
            if rel is not None:
                quantized_other[name] = {"type": gtype, "rel_rms": rel}
            others += 1
    summary = {
        "format": "gguf",
        "reader": "gguf-py",
        "gguf_type": meta.get("strata.target_type"),
        "carry": carry,
        "requantized": bool(meta.get("strata.requantized", False)),
        "source_type": meta.get("strata.source_type"),
        "linear_types": types,
        "quantized_linears": linears,
        "bit_exact_linears": exact,
        "other_tensors": others,
    }
    if carry not in ("exact", "solved"):
        summary["weight_error"] = _merge_errors(errors)
    if quantized_other:
        summary["quantized_other_tensors"] = quantized_other
    model = _whole_model_checks(summary, path, reader, gguf, llamacpp, prompt, whole_model_limit)
    return summary, model


def _gguf_linear(path: Path, gguf: GGUFTensors, name: str, result: QuantizedLinear, carry: str) -> tuple[dict, bool]:
    """One quantized linear of a GGUF against the solver's result, a slice of rows at a time: (its error,
    whether bit-exact). VerifyError where a file that carries the result exactly differs, a Q4_1 ("nearly")
    is off by more than its fp16 offset rounding, or a re-quantized one has a relative RMS error over 0.5."""
    err, equal = None, True
    for start, end in gguf.row_slices(name):
        got, want = gguf.rows(name, start, end), result.rows(start, end).dequantize()
        same = torch.equal(got, want)
        if not same and carry in ("exact", "solved"):  # the solver's blocks (or a solved mix's) as they are
            diff = (got - want).abs().max()
            raise VerifyError(f"{path.name}: {name} differs from the solver's result (max |Δ| {diff:g})")
        equal &= same
        err = _add_errors(err, _weight_error(got, want))
    if equal:
        return err, True
    if carry == "nearly":
        offset = (result.scales.float() * result.zeros.float()).abs().max()
        bound = 2.0**-10 * float(offset) + 1e-6
        if err["max_abs"] > bound:
            raise VerifyError(f"{path.name}: {name} is off by {err['max_abs']:g} (> {bound:g}) in Q4_1")
    elif math.sqrt(err["sq_err"] / max(err["sq_ref"], 1e-30)) > 0.5:
        raise VerifyError(f"{path.name}: {name} re-quantized is far from the solver's result: {err}")
    return err, False


def _gguf_other(path: Path, gguf: GGUFTensors, name: str, gtype: str, reader, results, layout) -> float | None:
    """One tensor that is not a quantized linear against the checkpoint (as published: AWQ's folded copy where
    there is one): equal in a float type, rounded to it; None then, else (an embedding / output quantized on
    request, output.gguf_embedding_type) its relative RMS error, VerifyError over 0.5."""
    folded = name in results.floats  # AWQ's folded norms / biases: small, read whole
    err = None
    for start, end in gguf.row_slices(name):
        got = gguf.rows(name, start, end)
        if folded:
            want = results.float_tensor(reader, name)
        elif len(reader.shape(name)) == 1:
            want = reader.load([name])[name]
        else:
            want = reader.load_rows(name, start, end)
        if gtype in ("F32", "F16", "BF16"):  # as stored, rounded to the file's float type
            # a shifted norm (Gemma: w + 1 in the file) is compared as the file holds it
            shift = layout.norm_shift(name)
            want = want.float() + shift if shift else want
            want = want.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[gtype]).float()
            if not torch.equal(got, want.reshape(got.shape)):
                raise VerifyError(f"{path.name}: {name} differs from the checkpoint")
        else:
            err = _add_errors(err, _weight_error(got, want.float().reshape(got.shape)))
    if err is None:
        return None
    rel = math.sqrt(err["sq_err"] / max(err["sq_ref"], 1e-30))
    if rel > 0.5:
        raise VerifyError(f"{path.name}: {name} ({gtype}) is far from the checkpoint: rel RMS {rel:.3f}")
    return rel


def _whole_model_checks(summary: dict, path: Path, reader, gguf: GGUFTensors, llamacpp: bool, prompt: str, limit: int):
    """transformers (and with ``llamacpp`` llama.cpp) load the whole GGUF when its fp32 size is at most ``limit``
    and not a MoE; ``summary`` says which readers ran or why none did. Returns the transformers model or None."""
    fp32_bytes = reader.num_params() * 4
    if gguf.moe:  # the per-expert rows are checked above; the readers' logits are compared by the tests
        summary["whole_model_checks"] = (
            "skipped: transformers' GGUF reader builds Mixtral (llama with experts) without experts and Qwen3-MoE "
            "without its expert width"
        )
        return None
    if fp32_bytes > limit:
        summary["whole_model_checks"] = (
            f"skipped: the model is {fp32_bytes / 1e9:.1f} GB in fp32, over output.whole_model_check_limit "
            f"{limit / 1e9:.1f} GB (transformers{' and llama.cpp' if llamacpp else ''} not loaded)"
        )
        return None
    model = _transformers_cross_check(path, reader, gguf)
    summary["reader"] += " + transformers"
    if llamacpp:
        summary["llamacpp"] = check_llamacpp(path, model, reader.path, prompt)
        summary["reader"] += " + llama.cpp"
    return model


def _transformers_cross_check(path: Path, reader: CheckpointReader, gguf: GGUFTensors):
    """transformers loads the whole GGUF to exactly the tensors gguf-py gave, tensor by tensor."""
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline.eval import transformers_config
    from strata_quant.pipeline.formats import gguf as gguf_format

    config = transformers_config(path)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32
    ).eval()
    state = model.state_dict()
    for name in reader.tensor_names:
        if gguf_format.skipped(name):
            continue
        if name not in state:
            raise VerifyError(f"{path.name}: transformers did not load {name}")
        shift = gguf.layout.norm_shift(name)  # transformers takes a shifted norm (Gemma: w + 1) back off
        got = gguf.tensor(name) - shift if shift else gguf.tensor(name)
        if not torch.equal(state[name], got.reshape(state[name].shape)):
            raise VerifyError(f"{path.name}: transformers reads {name} differently from gguf-py")
    return model


# ------------------------------------------------------------------------------------------------ llama.cpp


def load_llamacpp(path: Path, n_ctx: int = 512, n_threads: int | None = None):
    """The GGUF in llama.cpp (llama-cpp-python), every position's logits kept."""
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise VerifyError("checking in llama.cpp needs llama-cpp-python (pip install 'strata[readers]')") from err
    threads = n_threads or max(1, min(4, os.cpu_count() or 1))
    try:
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    except Exception as err:  # llama.cpp refused the file: its layout or metadata is wrong
        raise VerifyError(f"llama.cpp could not load {path}: {err}") from err


def llamacpp_logits(llm, ids: list[int]) -> torch.Tensor:
    """float32 [T, vocab] logits of one sequence evaluated from an empty context."""
    llm.reset()
    llm.eval(list(ids))
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def compare_logits(got: torch.Tensor, want: torch.Tensor) -> dict:
    """max / mean |Δ| of two [T, vocab] logit tensors, want's std, top-1 agreement, and the flip margin:
    max over positions t where the argmaxes differ of want[t].max − want[t, argmax got[t]] (0 when none
    differ), i.e. how far below want's best token got's pick was where they disagree."""
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    pick = got.argmax(-1)
    flips = pick != want.argmax(-1)
    margin = want.max(-1).values - want.gather(-1, pick[:, None])[:, 0]
    return {
        "tokens": int(want.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_std": float(want.std()),
        "top1_agreement": float((~flips).float().mean()),
        "top1_flip_margin": float(margin[flips].max()) if bool(flips.any()) else 0.0,
    }


# check_llamacpp's limits, in the reference logits' std
MEAN_DIFF_LIMIT = 0.1
FLIP_MARGIN_LIMIT = 0.25


def llamacpp_disagreements(got: torch.Tensor, want: torch.Tensor) -> tuple[dict, list[str]]:
    """:func:`compare_logits` of llama.cpp's logits ``got`` and transformers' ``want`` (one passage, [T, vocab]),
    with ``top1_flip_margin_from_1``: the flip margin over positions 1… only; and the rules it breaks:
    mean |Δ| ≤ MEAN_DIFF_LIMIT · std over every position, and every top-1 that differs from position 1 on is
    a near tie (flip margin ≤ FLIP_MARGIN_LIMIT · std).

    llama.cpp rounds activations to 8 bits for quantized weights, so near ties flip on some CPUs and not others;
    a count of flips would pass or fail by the machine. The margin is the largest of a tail: files read exactly
    (their F16 twins agree to 100 %) reach 0.19 std by that rounding alone (docs/quality.md). Position 0 is
    left out of the margin: a passage's first token is the attention sink, whose outsized activations meet
    that rounding hardest, and there the readers' top-1 parts by 1.2–1.5 std on llama.cpp's own 3-bit files
    of Qwen2.5-Coder-1.5B. It stays in the mean, which a layout error moves."""
    out = compare_logits(got, want)
    out["top1_flip_margin_from_1"] = compare_logits(got[1:], want[1:])["top1_flip_margin"] if len(want) > 1 else 0.0
    std, broken = out["logit_std"], []
    if out["mean_abs_diff"] > MEAN_DIFF_LIMIT * std:
        broken.append(f"mean |Δ| {out['mean_abs_diff'] / std:.3f} std > {MEAN_DIFF_LIMIT}")
    if out["top1_flip_margin_from_1"] > FLIP_MARGIN_LIMIT * std:
        broken.append(
            f"a top-1 flip {out['top1_flip_margin_from_1'] / std:.3f} std below the best > {FLIP_MARGIN_LIMIT}"
        )
    return out, broken


def check_llamacpp(
    path: Path, model, tokenizer_dir: Path, prompt: str = LLAMACPP_PROMPT, passage: str = LLAMACPP_PASSAGE
) -> dict:
    """llama.cpp loads the GGUF and tokenizes ``prompt`` as the HF tokenizer does, and on the HF tokens of
    ``passage`` gives the logits transformers gives from the same file (:func:`llamacpp_disagreements` names
    the rules), or VerifyError. The passage starts as the tokenizer starts a prompt (Gemma's BOS): without it
    Gemma runs outside the regime it is used in (its perplexity triples), where 8-bit activation rounding
    parts the readers on files both read exactly."""
    from transformers import AutoTokenizer

    from strata_quant.pipeline.calibration import tokenizer_prefix

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer_prefix(tokenizer) + tokenizer.encode(passage, add_special_tokens=False)
    llm = load_llamacpp(path, n_ctx=max(64, len(ids) + 8))
    cpp_ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    if list(cpp_ids) != list(hf_ids):
        raise VerifyError(f"{path.name}: llama.cpp tokenizes the prompt differently: {cpp_ids} vs HF {hf_ids}")
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].float()
    got = llamacpp_logits(llm, ids)
    del llm
    out, broken = llamacpp_disagreements(got, want)
    out["tokenizer_matches"] = True
    if broken:
        raise VerifyError(f"{path.name}: llama.cpp's logits disagree with transformers' ({'; '.join(broken)}): {out}")
    return out


def llamacpp_perplexity(path: Path, windows: torch.Tensor, n_threads: int | None = None) -> dict:
    """Perplexity of the GGUF in llama.cpp on token windows [W, T], each from an empty context (as eval.py)."""
    llm = load_llamacpp(path, n_ctx=int(windows.shape[1]), n_threads=n_threads)
    nll, count = 0.0, 0
    for window in windows.tolist():
        logits = llamacpp_logits(llm, window)[:-1].double()
        targets = torch.tensor(window[1:])
        nll += float(-torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).sum())
        count += len(window) - 1
    del llm
    return {"ppl": math.exp(nll / count), "tokens": count}


# ------------------------------------------------------------------------------------------------ release gate


class QualityGateError(VerifyError):
    """An artifact's held-out perplexity rose more than the release allows."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


def gate_rows(rows: dict[str, dict], max_ppl_increase: float) -> dict:
    """The release gate over an evaluation's rows: every row measured on strata's result (name starting
    "strata") must raise perplexity over the reference by at most ``max_ppl_increase`` (a fraction)."""
    checked = {n: r["ppl_increase"] for n, r in rows.items() if n.lower().startswith("strata")}
    if not checked:
        raise VerifyError("the evaluation has no strata row to gate")
    worst = max(checked, key=checked.get)
    return {
        "max_ppl_increase": max_ppl_increase,
        "rows": checked,
        "worst": worst,
        "passed": all(v <= max_ppl_increase for v in checked.values()),
    }


def gate_message(gate: dict) -> str:
    worst = gate["rows"][gate["worst"]]
    verdict = "passed" if gate["passed"] else "FAILED"
    return (
        f"quality gate {verdict}: {gate['worst']} perplexity {worst:+.2%} vs the fp16 reference "
        f"(allowed {gate['max_ppl_increase']:+.2%})"
    )


def _skip_list_check(folder: Path, listed: list[str] | None, reader: CheckpointReader, results: ResultSource) -> int:
    """Every linear the run left unquantized is in the config's skip list (as its full name)."""
    kept = unquantized_linears(reader, results)
    missing = [m for m in kept if m not in (listed or [])]
    if missing:
        raise VerifyError(f"{folder}: unquantized linear(s) {missing[:3]} are not in the config's skip list")
    return len(kept)


def verify_bitsandbytes(folder: Path, reader: CheckpointReader, results: ResultSource) -> dict:
    """bitsandbytes NF4: config (nf4, double quant as the results), every linear's packed codes,
    absmax, maps and quant state present with the right dtype and shape and decoding (by the
    FORMATS.md rule, :func:`pipeline.formats.bnb_nf4.decode_linear` in fp32) to exactly the stored
    results (read hash-checked against the record); other tensors equal to the checkpoint; the
    linears kept in 16-bit listed in ``llm_int8_skip_modules``."""
    from strata_quant.pipeline.formats import bnb_nf4
    from strata_quant.workers.nf4 import NF4Linear

    qcfg = _quantization_config(folder, "bitsandbytes")
    if not qcfg.get("load_in_4bit") or qcfg.get("bnb_4bit_quant_type") != "nf4":
        raise VerifyError(f"{folder}: expected a 4-bit NF4 bitsandbytes config, got {qcfg}")
    double_quant = bool(qcfg.get("bnb_4bit_use_double_quant"))

    def expected(result) -> Expected:
        if not isinstance(result, NF4Linear):
            raise VerifyError(f"bitsandbytes artifact for a {type(result).__name__} result")
        if result.double_quant != double_quant:
            raise VerifyError(f"config says double quant {double_quant}, a result says {result.double_quant}")
        n = result.codes.numel()
        n_blocks = -(-n // result.blocksize)
        out = {
            "weight": (((n + 1) // 2, 1), torch.uint8),
            "weight.absmax": ((n_blocks,), torch.uint8 if double_quant else torch.float32),
            "weight.quant_map": ((16,), torch.float32),
        }
        if double_quant:
            out["weight.nested_absmax"] = ((-(-n_blocks // result.nested_blocksize),), torch.float32)
            out["weight.nested_quant_map"] = ((256,), torch.float32)
        return out

    def decode(tensors, linear, _result):
        state_name = f"{linear}.weight.{bnb_nf4.QS_KEY}"
        tensors = {**tensors, **_load(_open_safetensors(folder), [state_name])}
        return bnb_nf4.decode_linear(tensors, linear, torch.float32)

    summary = _verify_packed(folder, reader, results, "bitsandbytes", expected, decode)
    summary["kept_linears"] = _skip_list_check(folder, qcfg.get("llm_int8_skip_modules"), reader, results)
    return summary


def verify_fp8(folder: Path, reader: CheckpointReader, results: ResultSource) -> dict:
    """compressed-tensors float-quantized FP8: config (one group, 8-bit float weights, the results'
    strategy / block), every linear's float8 weight and scale with the right dtype and shape and
    decoding (float(q) · scale, fp32) to exactly the stored results; other tensors equal to the
    checkpoint; the linears kept in 16-bit under ``ignore``."""
    from strata_quant.pipeline.formats import fp8 as fp8_format
    from strata_quant.workers.fp8 import FP8Linear

    qcfg = _quantization_config(folder, "compressed-tensors")
    if qcfg.get("format") != "float-quantized" or qcfg.get("quantization_status") != "compressed":
        raise VerifyError(f"{folder}: expected a compressed float-quantized config")
    groups = list(qcfg["config_groups"].values())
    if len(groups) != 1:
        raise VerifyError(f"{folder}: expected one config group, got {len(groups)}")
    weights = groups[0]["weights"]
    if weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8:
        raise VerifyError(f"{folder}: expected 8-bit float weights, got {weights}")
    block = tuple(weights["block_structure"]) if weights.get("strategy") == "block" else None

    def expected(result) -> Expected:
        if not isinstance(result, FP8Linear):
            raise VerifyError(f"float-quantized artifact for a {type(result).__name__} result")
        if result.block != block:
            raise VerifyError(f"config says block {block}, a result has {result.block}")
        return {
            "weight": (tuple(result.shape), torch.float8_e4m3fn),
            "weight_scale": (tuple(result.scale.shape), result.scale.dtype),
        }

    def decode(tensors, linear, _result):
        return fp8_format.decode_linear(tensors, linear, block)

    summary = _verify_packed(folder, reader, results, "compressed-tensors", expected, decode)
    summary["kept_linears"] = _skip_list_check(folder, qcfg.get("ignore"), reader, results)
    return summary


def verify_artifact(
    fmt: type[Format],
    path: Path,
    reader: CheckpointReader,
    results: ResultSource,
    *,
    llamacpp: bool,
    whole_model_limit: int,
) -> dict:
    """Read the artifact back against the record with the check its format names (``fmt.verifier``)."""
    if fmt.verifier == "verify_gguf":  # the one check that also runs the file in llama.cpp
        summary, _ = verify_gguf(path, reader, results, llamacpp=llamacpp, whole_model_limit=whole_model_limit)
        return summary
    verifiers = {
        f.__name__: f for f in (verify_gptq, verify_awq, verify_compressed_tensors, verify_bitsandbytes, verify_fp8)
    }
    return verifiers[fmt.verifier](path, reader, results)
