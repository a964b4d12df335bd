"""The registry of artifact formats and the streamed safetensors path they share.

Each format module under ``pipeline/formats/`` registers one :class:`Format` subclass (as
gguf-py registers one class per quant type), named by its CLI / config name and the quant
methods whose results it holds. A format says what it needs:

* :meth:`Format.check` — the plan-time refusal: one linear shape and grid, given as a
  stand-in result with zero-stride tensors, through the format's own storability rules
  (``ValueError`` naming the reason);
* :meth:`Format.write` — the artifact, streamed from the store one tensor at a time;
* ``verifier`` — the :mod:`pipeline.verify` check that reads it back against the record;
* ``loader`` — the reader that loads it.

:func:`format_for` looks a format up; :func:`registered` lists them in a fixed order (the
order artifacts are verified and reported in).

The safetensors formats share :class:`SafetensorsFormat.write`: every tensor of the
checkpoint in order into shards in a hidden staging folder (quantized linears as the
format's tensors, every other tensor as stored), config and tokenizer added, the folder
renamed into place only when complete. Memory is bounded by the largest tensor, not the
model: one tensor (a checkpoint tensor, or one linear's stored result and its packed form)
is alive at a time; shards are written through a data file and never held whole; tensors go
to disk from their own buffer (no ``bytes`` copy); the NaN/Inf check of a float tensor runs
in chunks (``torch.isfinite`` on a whole fp16 tensor builds temporaries ~4.5× its size).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load as load_safetensors

from strata_quant.pipeline.checkpoint import CheckpointError, CheckpointReader, nonfinite_count
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
# the modules that register a format, in the order artifacts are verified and reported
FORMAT_MODULES = ("gptq", "awq", "compressed_tensors", "fp8", "bnb_nf4", "gguf")
NOT_LISTED = ("embed_tokens", "lm_head", "wte", "wpe")  # unquantized 2-D weights readers skip anyway
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


class AssembleError(RuntimeError):
    pass


@dataclass(frozen=True)
class AssembleOptions:
    """What a format's writer takes from the job besides the results (``output.*`` of the config)."""

    shard_size: str = "5GB"
    overwrite: bool = False
    tool_version: str = "0.1.0"
    name: str = "model"
    tokenizer_pre: str = "default"
    gguf_type: str = "auto"
    embedding_type: str = "auto"
    threads: int = 0
    gguf_types: dict[str, str] = field(default_factory=dict)  # a mix of strata's own: per-linear types


class Format:
    """One artifact format; subclasses register themselves with ``name=`` (and ``methods=``)."""

    name: ClassVar[str]
    methods: ClassVar[frozenset[str] | None] = None  # quant methods it holds; None: the integer-grid methods
    verifier: ClassVar[str]  # the pipeline.verify function that reads it back
    loader: ClassVar[str]  # the reader that loads it
    suffix: ClassVar[str]  # of the artifact's name: <job>-<suffix>

    def __init_subclass__(cls, name: str | None = None, methods: tuple[str, ...] | None = None, **kw) -> None:
        super().__init_subclass__(**kw)
        if name is None:  # an abstract base (SafetensorsFormat …)
            return
        cls.name, cls.methods = name, frozenset(methods) if methods else None
        key = (name, cls.methods)
        if key in _REGISTRY:
            raise TypeError(f"format {name!r} for methods {methods} is registered twice")
        _REGISTRY[key] = cls

    def check(self, result: QuantizedLinear, options: AssembleOptions) -> None:
        """Raise ValueError when this format cannot hold a result of ``result``'s shape and grid."""

    def write(self, reader: CheckpointReader, results: ResultSource, dest: Path, options: AssembleOptions) -> Path:
        raise NotImplementedError

    @classmethod
    def artifact_name(cls, job: str, bits: int, sym: bool, options: AssembleOptions) -> str:
        """The artifact's file or folder name for job ``job``."""
        return f"{job}-{cls.suffix}"


_REGISTRY: dict[tuple[str, frozenset[str] | None], type[Format]] = {}


def registered() -> list[type[Format]]:
    """Every registered format class, in :data:`FORMAT_MODULES` order (importing the modules once)."""
    for module in FORMAT_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return sorted(_REGISTRY.values(), key=lambda cls: FORMAT_MODULES.index(cls.__module__.rpartition(".")[2]))


def format_for(name: str, method: str | None = None) -> type[Format]:
    """The format class that writes ``method``'s results as ``name`` (the integer-grid one when
    ``method`` is None or no class names it). AssembleError when there is none."""
    candidates = [cls for cls in registered() if cls.name == name]
    for cls in candidates:
        if cls.methods is not None and method in cls.methods:
            return cls
    for cls in candidates:
        if cls.methods is None and (method is None or method not in _toolbox_methods()):
            return cls
    raise AssembleError(f"no {name!r} output for method {method!r} results")


def _toolbox_methods() -> set[str]:
    return {m for cls in _REGISTRY.values() for m in cls.methods or ()}


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


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


@dataclass(frozen=True)
class ResultSummary:
    """What a checkpoint's quantization_config needs of its results, without their tensors."""

    spec: QuantSpec
    method: str
    params: dict

    @classmethod
    def of(cls, result: QuantizedLinear) -> ResultSummary:
        return cls(spec=result.spec, method=result.method, params=dict(result.params))


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


def quantized_only(store, records: dict[int, dict]) -> ResultSource:
    """The run's results less the linears it kept in 16-bit (entries marked ``skipped``):
    formats and the evaluation see those as unquantized, i.e. the checkpoint's float weights."""
    kept = {b: {**r, "results": [e for e in r["results"] if not e.get("skipped")]} for b, r in records.items()}
    source = ResultSource(store, kept)
    source.kept = set(skipped_linears(records))
    return source


def skipped_linears(records: dict[int, dict]) -> dict[str, str]:
    """Linear name → why the run kept it in 16-bit (``modules_to_not_convert`` or ``outliers``)."""
    return {e["name"]: e.get("reason", "") for r in records.values() for e in r["results"] if e.get("skipped")}


def checkpoint_float_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype of the checkpoint's floating-point tensors (the first one found; float16 if none)."""
    for name in reader.tensor_names:
        dtype = _SAFETENSORS_FLOATS.get(reader.tensor_info[name][0])
        if dtype is not None:
            return dtype
    return torch.float16


def unquantized_linears(reader: CheckpointReader, results: ResultSource) -> list[str]:
    """Modules with a 2-D weight that are not quantized, less embeddings and lm_head."""
    out = []
    for name in reader.tensor_names:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module not in results and len(reader.shape(name)) == 2:
            if not module.endswith(NOT_LISTED):
                out.append(module)
    return out


def linear_bits(results: ResultSource) -> tuple[int, dict[str, int]]:
    """Mixed precision: the width most linears have (ties: the lower) and {linear: bits} of the others."""
    bits = {name: int(e["bits"]) for name, e in results.entries.items()}
    counts = {b: list(bits.values()).count(b) for b in set(bits.values())}
    base = min(counts, key=lambda b: (-counts[b], b))
    return base, {n: b for n, b in bits.items() if b != base}


DEQUANT_CHUNK = 1 << 20  # values per row chunk of dequantize_half (fp32 temporaries of ~4 MB each)


def dequantize_half(result: QuantizedLinear, chunk: int = DEQUANT_CHUNK) -> torch.Tensor:
    """``result.dequantize()`` as float16, computed in fp32 a few rows at a time: the same
    values, with fp32 temporaries of ``chunk`` values instead of ~5× the weight in fp32."""
    n_rows, n_cols = result.shape
    out = torch.empty(n_rows, n_cols, dtype=torch.float16)
    step = max(1, chunk // max(1, n_cols))
    for start in range(0, n_rows, step):
        end = min(n_rows, start + step)
        out[start:end] = result.rows(start, end).dequantize(torch.float32).half()
    return out


def stream_checkpoint(
    reader: CheckpointReader,
    results: ResultSource,
    tmp: Path,
    fmt: SafetensorsFormat,
    shard_size: str,
    rename: dict[str, str] | None = None,
) -> None:
    """Every checkpoint tensor into safetensors shards in ``tmp``, in the checkpoint's order:
    a quantized linear's weight through ``fmt.pack`` (its result dropped before the packed
    tensors are written), its bias cast to ``fmt.bias_dtype``, every other tensor as
    published (:meth:`ResultSource.float_tensor`); each under its ``rename`` name where it
    has one (:meth:`SafetensorsFormat.loader_names`). The staging folder is removed on failure."""
    rename = rename or {}
    try:
        writer = ShardedSafetensorsWriter(tmp, parse_size(shard_size), {"format": "pt"})
        written = 0
        for name in reader.tensor_names:
            linear, _, leaf = name.rpartition(".")
            if linear in results and leaf == "weight":
                result = results.get(linear)
                try:
                    packed = fmt.pack(result, rename.get(linear, linear))
                except ValueError as err:
                    raise AssembleError(f"{linear}: {err}") from err
                del result  # the codes go before the packed tensors are written
                for tname in list(packed):
                    writer.add(tname, packed.pop(tname))
                del packed
                written += 1
            elif linear in results and leaf == "bias" and fmt.bias_dtype is not None:
                writer.add(rename.get(name, name), results.float_tensor(reader, name).to(fmt.bias_dtype))
            else:
                writer.add(rename.get(name, name), results.float_tensor(reader, name))
        writer.close()
        if not written:
            raise AssembleError("the run record lists no quantized linear")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class SafetensorsFormat(Format):
    """A safetensors checkpoint folder: tensors streamed by :func:`stream_checkpoint`, then
    config.json carrying :meth:`quantization_config` (and quantize_config.json where the
    format's readers look for it) and the tokenizer files; renamed into place when complete."""

    bias_dtype: ClassVar[torch.dtype | None] = torch.float16  # None: biases as stored
    quantize_config_file: ClassVar[bool] = False

    def pack(self, result, module: str) -> dict[str, torch.Tensor]:
        """The format's tensors of one linear (ValueError when it cannot hold ``result``)."""
        raise NotImplementedError

    def loader_names(self, reader: CheckpointReader) -> dict[str, str]:
        """Checkpoint name → the name this format's reader wants, by tensor and by linear, where they differ
        (a MoE's experts for GPTQModel: pipeline.formats.moe.DefusedExperts); empty: the checkpoint's names."""
        return {}

    def quantization_config(self, reader: CheckpointReader, results: ResultSource) -> dict:
        """config.json's ``quantization_config``, from what :meth:`pack` saw."""
        raise NotImplementedError

    def config_dtype(self, reader: CheckpointReader) -> torch.dtype:
        return torch.float16

    def write(self, reader: CheckpointReader, results: ResultSource, dest: Path, options: AssembleOptions) -> Path:
        self.options = options
        self.rename = self.loader_names(reader)
        tmp = staging_folder(dest, options.overwrite)
        stream_checkpoint(reader, results, tmp, self, options.shard_size, self.rename)
        qcfg = self.quantization_config(reader, results)
        config = dict(reader.config)
        config["quantization_config"] = qcfg
        config["dtype"] = DTYPE_NAMES[self.config_dtype(reader)]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if self.quantize_config_file:
            (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
        copy_tokenizer(reader.path, tmp)
        commit_folder(tmp, dest)
        return dest


class IntegerSafetensorsFormat(SafetensorsFormat):
    """A safetensors format of integer-grid results (codes, scales, zeros): one spec for all
    linears (one quantization_config), or one group size and symmetry with ``mixed_bits``."""

    mixed_bits: ClassVar[bool] = False

    def __init__(self) -> None:
        self.first: ResultSummary | None = None  # a summary, not the result: no result outlives its tensor

    def pack_linear(self, result: QuantizedLinear, module: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pack(self, result, module: str) -> dict[str, torch.Tensor]:
        if self.first is None:
            self.first = ResultSummary.of(result)
        elif result.spec != self.first.spec and not (self.mixed_bits and _same_but_bits(result.spec, self.first.spec)):
            raise ValueError(f"{result.spec} differs from {self.first.spec}; one config holds one spec")
        return self.pack_linear(result, module)


def _same_but_bits(a: QuantSpec, b: QuantSpec) -> bool:
    return a.group_size == b.group_size and a.sym == b.sym
