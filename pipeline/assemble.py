"""Assemble published artifacts from the run record, streaming one tensor at a time.

Every artifact is written into a hidden temporary folder next to its destination and
renamed into place only when complete, so a reader never sees a partial artifact.

Memory is bounded by the largest tensor, not the model: one tensor (a checkpoint tensor,
or one linear's stored result and its packed form) is alive at a time and dropped before
the next is read; shards are written through a data file and never held whole; tensors
go to disk from their own buffer (no ``bytes`` copy); the NaN/Inf check of a float tensor
runs in chunks (:data:`pipeline.checkpoint.FINITE_CHUNK` values) (``torch.isfinite`` on a whole fp16 tensor
builds temporaries ~4.5× its size, which made the embedding of a 4 GB model cost 1.7 GB).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from strata_quant.pipeline.checkpoint import CheckpointError, CheckpointReader, nonfinite_count
from strata_quant.pipeline.formats import gptq as gptq_format
from strata_quant.pipeline.store import sha256_bytes
from strata_quant.workers.records import result_from_bytes
from strata_quant.workers.result import QuantizedLinear, QuantSpec

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


class AssembleError(RuntimeError):
    pass


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    """CheckpointError naming ``name`` if the float ``tensor`` holds a NaN or Inf; checked
    chunk by chunk, so it allocates O(chunk), not O(tensor)."""
    if not tensor.is_floating_point():
        return
    bad = nonfinite_count(tensor)
    if bad:
        raise CheckpointError(
            f"tensor {name!r} ({where}) holds {bad} NaN/Inf value(s) of {tensor.numel()}; the checkpoint is damaged"
        )


@dataclass(frozen=True)
class ResultSummary:
    """What a checkpoint's quantization_config needs of its results, without their tensors."""

    spec: QuantSpec
    method: str
    params: dict

    @classmethod
    def of(cls, result: QuantizedLinear) -> ResultSummary:
        return cls(spec=result.spec, method=result.method, params=dict(result.params))


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


class ResultSource:
    """Stored solver results by linear name, each checked against its record hash on read."""

    def __init__(self, store, records: dict[int, dict]):
        self.store = store
        self.entries = {e["name"]: e for r in records.values() for e in r["results"]}
        self.floats = {f["name"]: f for e in self.entries.values() for f in e.get("float_results", [])}
        self.kept: set[str] = set()  # linears the run recorded as left in 16-bit (set by quantized_only)

    def __contains__(self, linear_name: str) -> bool:
        return linear_name in self.entries

    def float_tensor(self, reader: CheckpointReader, name: str) -> torch.Tensor:
        """A float tensor as published: the method's changed copy when the run stored one
        (AWQ folds its scales into norms and biases), else the checkpoint's, in its dtype."""
        original = reader.load([name], check_finite=False)[name]
        check_finite(name, original, f"shard {reader.weight_map[name]!r}")
        entry = self.floats.get(name)
        if entry is None:
            return original
        data = self.store.get_bytes(entry["key"])
        if sha256_bytes(data) != entry["sha256"]:
            raise AssembleError(f"stored float result {entry['key']} does not match the hash in its block record")
        return load_safetensors(data)[name].to(original.dtype)

    def get(self, linear_name: str) -> QuantizedLinear:
        """The stored result of one linear, read fresh each call: callers drop it after use
        (nothing here caches results, so assembly holds one at a time)."""
        entry = self.entries[linear_name]
        data = self.store.get_bytes(entry["key"])
        if sha256_bytes(data) != entry["sha256"]:
            raise AssembleError(f"stored result {entry['key']} does not match the hash in its block record")
        return result_from_bytes(data)


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class ShardedSafetensorsWriter:
    """Writes tensors into safetensors shards of at most ``shard_bytes`` and an index.

    Streams: each tensor's bytes go to a data file as soon as it is added, straight from
    the tensor's own buffer, and a shard is finished by writing its header and copying the
    data behind it in chunks, so memory stays at the tensor being added whatever the shard
    size (safetensors' own ``save_file`` needs the whole shard in memory, twice).
    """

    def __init__(self, folder: Path, shard_bytes: int, metadata: dict[str, str]):
        self.folder, self.shard_bytes, self.metadata = folder, shard_bytes, metadata
        self.entries: dict[str, dict] = {}
        self.pending_bytes = 0
        self.data = None
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.entries and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        if self.data is None:
            self.data = open(self.folder / f".data-{len(self.files):05d}", "wb")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.data.write(memoryview(raw))  # from the tensor's buffer: no bytes copy of it
        self.entries[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.pending_bytes, self.pending_bytes + nbytes],
        }
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        name = f"part-{len(self.files):05d}.safetensors"
        data_path = self.folder / f".data-{len(self.files):05d}"
        if self.data is None:  # an empty shard (a model without tensors is refused upstream)
            self.data = open(data_path, "wb")
        self.data.close()
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
        with open(self.folder / name, "wb") as out, open(data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 << 20)
        data_path.unlink()
        self.files.append((name, list(self.entries)))
        self.entries, self.pending_bytes, self.data = {}, 0, None

    def close(self) -> list[str]:
        if self.entries or not self.files:
            self._flush()
        n = len(self.files)
        weight_map, names = {}, []
        for i, (tmp_name, tensor_names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / final)
            names.append(final)
            weight_map.update({t: final for t in tensor_names})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def staging_folder(dest: Path, overwrite: bool) -> Path:
    if dest.exists() and not overwrite:
        raise AssembleError(f"output {dest} exists; pass --overwrite (output.overwrite: true) to replace it")
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_folder(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _write_quantized_checkpoint(
    reader: CheckpointReader,
    results: ResultSource,
    tmp: Path,
    pack: Callable[[QuantizedLinear, str], dict[str, torch.Tensor]],
    shard_size: str,
    mixed_bits: bool = False,
    rename: dict[str, str] | None = None,
) -> tuple[ResultSummary, list[str]]:
    """Stream every tensor into safetensors shards in ``tmp``: quantized linears through
    ``pack`` (their biases as float16), every other tensor as stored; ``rename`` gives the
    names a reader wants where they differ from the checkpoint's (MoE experts for GPTQModel:
    pipeline.formats.moe.defused_names), by tensor and by linear. Returns the first
    result's spec, method and params (all must share its spec: a checkpoint has one
    quantization_config) and the modules with a 2-D weight that were left unquantized (for
    the config's ignore list). On AssembleError the staging folder is removed."""
    try:
        return _write_tensors(reader, results, tmp, pack, shard_size, mixed_bits, rename or {})
    except AssembleError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tensors(
    reader, results, tmp, pack, shard_size, mixed_bits=False, rename: dict[str, str] | None = None
) -> tuple[ResultSummary, list[str]]:
    rename = rename or {}
    writer = ShardedSafetensorsWriter(tmp, parse_size(shard_size), {"format": "pt"})
    first: ResultSummary | None = None  # a summary, not the result: no result outlives its tensor
    unquantized: list[str] = []
    for name in reader.tensor_names:
        linear, _, leaf = name.rpartition(".")
        if linear in results and leaf == "weight":
            result = results.get(linear)
            if first is None:
                first = ResultSummary.of(result)
            elif result.spec != first.spec and not (mixed_bits and _same_but_bits(result.spec, first.spec)):
                raise AssembleError(f"{linear}: {result.spec} differs from {first.spec}; one config holds one spec")
            try:
                packed = pack(result, rename.get(linear, linear))
            except ValueError as err:
                raise AssembleError(f"{linear}: {err}") from err
            del result  # the codes go before the packed tensors are written
            for tname in list(packed):
                writer.add(tname, packed.pop(tname))
            del packed
        elif linear in results and leaf == "bias":
            writer.add(rename.get(name, name), results.float_tensor(reader, name).to(torch.float16))
        else:
            if leaf == "weight" and len(reader.shape(name)) == 2:
                unquantized.append(rename.get(linear, linear))
            writer.add(rename.get(name, name), results.float_tensor(reader, name))
    writer.close()
    if first is None:
        raise AssembleError("the run record lists no quantized linear")
    return first, unquantized


def _finish_checkpoint(reader: CheckpointReader, tmp: Path, dest: Path, qcfg: dict, *, quantize_config: bool) -> Path:
    config = dict(reader.config)
    config["quantization_config"] = qcfg
    config["dtype"] = "float16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if quantize_config:
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    copy_tokenizer(reader.path, tmp)
    commit_folder(tmp, dest)
    return dest


def _float_data(array: np.ndarray, gtype: str, quantize_float) -> np.ndarray:
    """A float tensor's GGUF data: the array itself when it already has the type's dtype
    (F16 from fp16, F32 from fp32: no copy), else ``quantize_float``'s conversion."""
    if (gtype, array.dtype) in (("F16", np.float16), ("F32", np.float32)):
        return array
    return quantize_float(array, gtype)


DEQUANT_CHUNK = 1 << 20  # values per row chunk of _dequantize_half (fp32 temporaries of ~4 MB each)


def _dequantize_half(result: QuantizedLinear) -> torch.Tensor:
    """``result.dequantize()`` as float16, computed in fp32 a few rows at a time: the same
    values, with fp32 temporaries of :data:`DEQUANT_CHUNK` values instead of ~5× the
    weight in fp32."""
    n_rows, n_cols = result.shape
    out = torch.empty(n_rows, n_cols, dtype=torch.float16)
    step = max(1, DEQUANT_CHUNK // max(1, n_cols))
    for start in range(0, n_rows, step):
        end = min(n_rows, start + step)
        out[start:end] = result.rows(start, end).dequantize(torch.float32).half()
    return out


def _same_but_bits(a: QuantSpec, b: QuantSpec) -> bool:
    return a.group_size == b.group_size and a.sym == b.sym


def linear_bits(results: ResultSource) -> tuple[int, dict[str, int]]:
    """Mixed precision: the width most linears have (ties: the lower) and {linear: bits} of the others."""
    bits = {name: int(e["bits"]) for name, e in results.entries.items()}
    counts = {b: list(bits.values()).count(b) for b in set(bits.values())}
    base = min(counts, key=lambda b: (-counts[b], b))
    return base, {n: b for n, b in bits.items() if b != base}


def _not_converted(unquantized: list[str]) -> list[str]:
    """Unquantized modules with 2-D weights, less embeddings and lm_head (readers skip those)."""
    return [m for m in unquantized if not m.endswith(("embed_tokens", "lm_head", "wte", "wpe"))]


def assemble_gptq(
    reader: CheckpointReader,
    results: ResultSource,
    dest: Path,
    *,
    shard_size: str = "5GB",
    overwrite: bool = False,
    tool_version: str = "0.1.0",
) -> Path:
    """A GPTQ checkpoint: quantized linears packed, every other tensor copied as stored.
    Per-linear widths (mixed precision) go in as ``dynamic`` overrides of the majority width."""
    from strata_quant.pipeline.formats import moe as moe_format

    rename = moe_format.defused_names(reader)  # MoE: GPTQModel's per-expert names
    tmp = staging_folder(dest, overwrite)
    result, _ = _write_quantized_checkpoint(
        reader, results, tmp, gptq_format.pack_linear, shard_size, mixed_bits=True, rename=rename
    )
    base, others = linear_bits(results)
    spec = QuantSpec(base, result.spec.group_size, result.spec.sym)
    qcfg = gptq_format.quantization_config(spec, result.params, tool_version, dynamic_bits=others)
    return _finish_checkpoint(reader, tmp, dest, qcfg, quantize_config=True)


def assemble_awq(
    reader: CheckpointReader,
    results: ResultSource,
    dest: Path,
    *,
    shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """An AWQ GEMM checkpoint (4-bit, zero point): quantized linears packed, every other
    tensor copied as stored. Results AWQ cannot hold (see pipeline.formats.awq) raise
    AssembleError before anything is published."""
    from strata_quant.pipeline.formats import awq as awq_format
    from strata_quant.pipeline.formats import moe as moe_format

    rename = moe_format.defused_names(reader)  # MoE: GPTQModel's per-expert names
    tmp = staging_folder(dest, overwrite)
    result, unquantized = _write_quantized_checkpoint(
        reader, results, tmp, awq_format.pack_linear, shard_size, rename=rename
    )
    qcfg = awq_format.quantization_config(result.spec)
    qcfg["modules_to_not_convert"] = _not_converted(unquantized) or None
    return _finish_checkpoint(reader, tmp, dest, qcfg, quantize_config=True)


def assemble_compressed_tensors(
    reader: CheckpointReader,
    results: ResultSource,
    dest: Path,
    *,
    shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """A compressed-tensors "pack-quantized" checkpoint: quantized linears packed, every
    other tensor copied as stored; unquantized linears are listed under ``ignore``."""
    from strata_quant.pipeline.formats import compressed_tensors as ct_format

    tmp = staging_folder(dest, overwrite)
    result, unquantized = _write_quantized_checkpoint(reader, results, tmp, ct_format.pack_linear, shard_size)
    qcfg = ct_format.quantization_config(result.spec, result.params)
    qcfg["ignore"] = ["lm_head", *_not_converted(unquantized)]
    return _finish_checkpoint(reader, tmp, dest, qcfg, quantize_config=False)


def assemble_gguf(
    reader: CheckpointReader,
    results: ResultSource,
    dest: Path,
    *,
    tokenizer_pre: str = "default",
    overwrite: bool = False,
    name: str = "model",
    gguf_type: str = "auto",
    embedding_type: str = "auto",
    tool_version: str = "0.1.0",
    threads: int = 0,
) -> Path:
    """A llama.cpp GGUF of the solver's result; norms F32, embeddings / output per ``embedding_type``.

    ``gguf_type`` "auto" (or a type that holds the result exactly) writes the solver's codes and scales as they
    are: symmetric ≤ 4-bit → Q4_0, asymmetric ≤ 4-bit → Q5_0 (or Q8_0 when named), symmetric 8-bit → Q8_0;
    Q4_1 holds ≤ 4-bit results with the offset −scale·z rounded to fp16 ("nearly" exact). Any other type
    (Q4_K_M, Q6_K …) is a named fallback: an F16 GGUF of the dequantized solver output is written first and
    re-quantized by llama.cpp. The file says which in ``strata.carry`` / ``strata.requantized`` /
    ``strata.source_type``; :func:`pipeline.verify.verify_gguf` measures the difference.
    """
    from strata_quant.pipeline.formats import gguf as gguf_format
    from strata_quant.pipeline.formats import gguf_moe

    if dest.exists() and not overwrite:
        raise AssembleError(f"output {dest} exists; pass --overwrite (output.overwrite: true) to replace it")
    config = reader.config
    try:
        layout = gguf_format.check_gguf(config, reader.tensor_names)
    except gguf_format.GGUFError as err:
        raise AssembleError(str(err)) from None
    specs = {(bool(e["sym"]), e.get("group_size")) for e in results.entries.values()}
    if len(specs) != 1:
        raise AssembleError(f"one GGUF holds one grid (sym, group size); the run record has {sorted(specs, key=str)}")
    sym, group_size = next(iter(specs))
    bits, mixed = linear_bits(results)  # mixed precision: {linear: its width} where it differs
    try:
        target, carry = gguf_format.resolve_type(gguf_type, bits, sym)
        linear_types = {n: gguf_format.resolve_type("auto", b, sym)[0] for n, b in mixed.items()}
    except ValueError as err:
        raise AssembleError(str(err)) from err
    requant = carry == "requantized"
    if mixed and (requant or gguf_type.upper() != "AUTO"):
        raise AssembleError("per-linear bits need gguf_type auto: each tensor gets the exact type of its own width")
    emb = embedding_type.upper()
    if emb == "AUTO":
        emb = None if requant else "F16"  # llama.cpp's own recipe for re-quantized files
    elif emb not in gguf_format.NATIVE_TENSOR_TYPES and emb not in gguf_format.KQUANT_TENSOR_TYPES:
        raise AssembleError(f"unknown embedding type {embedding_type!r}")
    hidden = int(config["hidden_size"])
    block = 256 if emb in gguf_format.KQUANT_TENSOR_TYPES else 32
    if emb not in (None, "F32", "F16", "BF16") and hidden % block:
        raise AssembleError(
            f"embedding type {emb} needs rows of a multiple of {block} values; hidden_size is {hidden} "
            "(pick F16, Q8_0 or another legacy type)"
        )
    # embeddings llama.cpp has to quantize (k-quants) are written F16 and handed to llama_model_quantize
    emb_native = emb if emb in gguf_format.NATIVE_TENSOR_TYPES else "F16"
    linear_type = "F16" if requant else target

    metadata = {
        "strata.version": tool_version,
        "strata.method": results.get(next(iter(results.entries))).method,
        "strata.bits": int(bits),
        "strata.sym": bool(sym),
        "strata.carry": carry,
        "strata.requantized": requant,
        "strata.source_type": "F16 (dequantized solver output)" if requant else target,
        "strata.target_type": target,
        "strata.embedding_type": emb or "llama.cpp default",
    }
    if group_size is not None:
        metadata["strata.group_size"] = int(group_size)
    if mixed:
        metadata["strata.mixed_linears"] = len(mixed)

    plan: list[tuple[str, str, str, tuple[int, ...]]] = []  # (hf name, gguf name, type, torch shape)
    extra = dict(layout.extra_tensors())  # generated from the config (rope_freqs …): first, as the converter
    plan.extend(("", gname, "F32", tuple(data.shape)) for gname, data in extra.items())
    stacks = gguf_moe.expert_stacks(reader.tensor_names, layout.name)  # {GGUF name: one tensor per expert}
    for tname in reader.tensor_names:
        if gguf_format.skipped(tname):
            continue
        gname = layout.name(tname)
        linear, _, leaf = tname.rpartition(".")
        shape = reader.shape(tname)
        if gname in stacks:  # planned once, at its first expert
            if tname == stacks[gname][0]:
                gtype = _stack_type(stacks[gname], results, linear_types, linear_type)
                plan.append((stacks[gname], gname, gtype, (len(stacks[gname]), *shape)))
        elif linear in results and leaf == "weight":
            plan.append((tname, gname, linear_types.get(linear, linear_type), shape))
        elif len(shape) == 1 or gguf_moe.is_router(gname):
            plan.append((tname, gname, "F32", shape))
        elif gname in ("token_embd.weight", "output.weight"):
            plan.append((tname, gname, emb_native, shape))
        else:
            plan.append((tname, gname, "F16", shape))

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    needs_llama = requant or (emb is not None and emb != emb_native)
    first = dest.with_name(f".{dest.name}.src.tmp") if needs_llama else tmp
    file_type = gguf_format.FILE_TYPES["F16" if requant else target]
    writer = gguf_format.GGUFStreamWriter(
        str(first),
        config,
        str(reader.path),
        tokenizer_pre=tokenizer_pre,
        name=name,
        file_type=file_type,
        metadata=metadata,
    )
    try:
        for _, gname, gtype, shape in plan:
            writer.add_tensor_info(gname, gtype, shape)
        writer.write_header()
        for tname, gname, gtype, _ in plan:
            if isinstance(tname, list):
                data = _expert_stack(tname, reader, results, gtype, requant)
                writer.write_data(gname, data)
                del data
                continue
            linear = tname.rpartition(".")[0]
            heads = layout.qk_heads(tname)
            if not tname:
                data = extra[gname]
            elif linear in results and tname.endswith(".weight"):
                result = results.get(linear)
                if heads is not None:
                    result = gguf_format.permute_qk_result(result, heads)
                try:
                    data = _dequantize_half(result).numpy() if requant else gguf_format.encode(result, gtype)
                except ValueError as err:
                    raise AssembleError(f"{linear}: {err}") from err
                del result
            else:
                tensor = results.float_tensor(reader, tname)
                if gtype not in ("F16", "F32") or tensor.dtype not in (torch.float16, torch.float32):
                    tensor = tensor.float()  # gguf-py quantizes from float32; bf16 has no numpy form
                if heads is not None:
                    tensor = gguf_format.permute_qk_rows(tensor, heads)
                if shift := layout.norm_shift(tname):
                    tensor = tensor.float() + shift
                data = _float_data(tensor.numpy(), gtype, gguf_format.quantize_float)
                del tensor
            writer.write_data(gname, data)
            del data
        writer.close()
        if needs_llama:
            gguf_format.llama_quantize(
                first,
                tmp,
                target,
                token_embedding_type=emb,
                output_tensor_type=emb,
                nthread=threads,
            )
    except BaseException:
        for p in {first, tmp}:
            p.unlink(missing_ok=True)
        raise
    finally:
        if needs_llama:
            first.unlink(missing_ok=True)
    os.replace(tmp, dest)
    return dest


def _stack_type(members: list[str], results: ResultSource, linear_types: dict[str, str], linear_type: str) -> str:
    """The GGUF type of a stack of experts (one tensor: one type): the type of its experts' results, F16 when
    none is quantized; AssembleError when they differ."""
    linears = [m.rpartition(".")[0] for m in members]
    types = {linear_types.get(lin, linear_type) if lin in results else "F16" for lin in linears}
    if len(types) != 1:
        raise AssembleError(f"the experts of {linears[0]} … need {sorted(types)}: one GGUF expert stack has one type")
    return types.pop()


def _expert_stack(members: list[str], reader: CheckpointReader, results: ResultSource, gtype: str, requant: bool):
    """The data of a stack of experts, expert by expert (expert e's rows after expert e − 1's): each quantized
    expert's result encoded as it is (exact), or dequantized to F16 for llama.cpp to re-quantize; unquantized
    experts as stored in F16. Memory: the stack's data, one expert's result at a time."""
    from strata_quant.pipeline.formats import gguf as gguf_format

    parts = []
    for member in members:
        linear = member.rpartition(".")[0]
        if linear in results:
            result = results.get(linear)
            try:
                parts.append(_dequantize_half(result).numpy() if requant else gguf_format.encode(result, gtype))
            except ValueError as err:
                raise AssembleError(f"{linear}: {err}") from err
            del result
        else:
            parts.append(results.float_tensor(reader, member).to(torch.float16).numpy())
    return np.concatenate(parts, axis=0)
