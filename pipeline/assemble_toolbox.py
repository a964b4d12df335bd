"""Assemble the toolbox methods' artifacts from the run record, one tensor at a time.

* NF4 / GPTQ-on-NF4 results → a bitsandbytes 4-bit checkpoint (:mod:`pipeline.formats.bnb_nf4`);
* FP8 results → a compressed-tensors "float-quantized" checkpoint (:mod:`pipeline.formats.fp8`).

Like :func:`pipeline.assemble.assemble_gptq`: every tensor of the checkpoint is streamed in
order into safetensors shards in a hidden staging folder (quantized linears as the format's
tensors, every other tensor as stored), config and tokenizer are added, and the folder is
renamed into place only when complete. Linears the run kept in 16-bit (``modules_to_not_convert``
or outlier-heavy inputs; their record entries say ``skipped``) are not in the
:func:`quantized_only` view, so their float weights are copied from the checkpoint and they are
listed in the format's skip list (``llm_int8_skip_modules`` / ``ignore``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from strata_quant.pipeline.assemble import (
    AssembleError,
    ResultSource,
    ShardedSafetensorsWriter,
    commit_folder,
    copy_tokenizer,
    parse_size,
    staging_folder,
)
from strata_quant.pipeline.checkpoint import CheckpointReader
from strata_quant.pipeline.formats import bnb_nf4
from strata_quant.pipeline.formats import fp8 as fp8_format
from strata_quant.workers.fp8 import FP8Linear
from strata_quant.workers.nf4 import NF4Linear

_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_NOT_LISTED = ("embed_tokens", "lm_head", "wte", "wpe")


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
            if not module.endswith(_NOT_LISTED):
                out.append(module)
    return out


def _stream(reader: CheckpointReader, results: ResultSource, tmp: Path, shard_size: str, linear_tensors) -> list:
    """Every checkpoint tensor into shards in ``tmp``; quantized linears through ``linear_tensors``.
    Returns the results written (for the config). The staging folder is removed on failure."""
    try:
        writer = ShardedSafetensorsWriter(tmp, parse_size(shard_size), {"format": "pt"})
        written = []
        for name in reader.tensor_names:
            module, _, leaf = name.rpartition(".")
            if module in results and leaf == "weight":
                result = results.get(module)
                try:
                    tensors = linear_tensors(result, module)
                except ValueError as err:
                    raise AssembleError(f"{module}: {err}") from err
                for tname, tensor in tensors.items():
                    writer.add(tname, tensor)
                written.append(result)
            else:
                writer.add(name, results.float_tensor(reader, name))
        writer.close()
        if not written:
            raise AssembleError("the run record lists no quantized linear")
        return written
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(reader: CheckpointReader, tmp: Path, dest: Path, qcfg: dict, dtype: torch.dtype) -> Path:
    config = dict(reader.config)
    config["quantization_config"] = qcfg
    config["dtype"] = _DTYPE_NAMES[dtype]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(reader.path, tmp)
    commit_folder(tmp, dest)
    return dest


def assemble_bitsandbytes(
    reader: CheckpointReader,
    results: ResultSource,
    dest: Path,
    *,
    shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """A bitsandbytes NF4 checkpoint (transformers ``load_in_4bit``): each NF4 result as the
    packed codes, absmax (nested with double quant), maps and quant state; the dequantized dtype
    is the checkpoint's float dtype; linears left unquantized go in ``llm_int8_skip_modules``."""
    dtype = checkpoint_float_dtype(reader)
    double_quant: set[bool] = set()

    def linear_tensors(result, module: str) -> dict[str, torch.Tensor]:
        if not isinstance(result, NF4Linear):
            raise ValueError(f"bitsandbytes output holds NF4 results, got {type(result).__name__}")
        double_quant.add(result.double_quant)
        if len(double_quant) > 1:
            raise ValueError("double-quantized and plain NF4 linears cannot share one quantization_config")
        return bnb_nf4.linear_tensors(result, module, dtype)

    tmp = staging_folder(dest, overwrite)
    _stream(reader, results, tmp, shard_size, linear_tensors)
    skip = ["lm_head", *unquantized_linears(reader, results)]
    qcfg = bnb_nf4.quantization_config(double_quant.pop(), _DTYPE_NAMES[dtype], skip)
    return _finish(reader, tmp, dest, qcfg, dtype)


def assemble_fp8(
    reader: CheckpointReader,
    results: ResultSource,
    dest: Path,
    *,
    shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """A compressed-tensors float-quantized (FP8 E4M3) checkpoint: each FP8 result as its
    float8 weight and scale; one strategy (channel, or one block shape) for all linears; the
    unquantized linears under ``ignore``."""
    blocks: set = set()

    def linear_tensors(result, module: str) -> dict[str, torch.Tensor]:
        if not isinstance(result, FP8Linear):
            raise ValueError(f"float-quantized output holds FP8 results, got {type(result).__name__}")
        blocks.add(result.block)
        if len(blocks) > 1:
            raise ValueError(f"one FP8 strategy per checkpoint, the run has blocks {sorted(blocks, key=str)}")
        return fp8_format.linear_tensors(result, module)

    tmp = staging_folder(dest, overwrite)
    _stream(reader, results, tmp, shard_size, linear_tensors)
    qcfg = fp8_format.quantization_config(blocks.pop())
    qcfg["ignore"] = ["lm_head", *unquantized_linears(reader, results)]
    return _finish(reader, tmp, dest, qcfg, checkpoint_float_dtype(reader))


def assemble_toolbox(
    fmt: str, reader: CheckpointReader, results: ResultSource, dest: Path, *, shard_size: str, overwrite: bool
) -> Path:
    """Dispatch by output format: ``bitsandbytes`` (NF4) or ``compressed-tensors`` (FP8)."""
    if fmt == "bitsandbytes":
        return assemble_bitsandbytes(reader, results, dest, shard_size=shard_size, overwrite=overwrite)
    if fmt == "compressed-tensors":
        return assemble_fp8(reader, results, dest, shard_size=shard_size, overwrite=overwrite)
    raise AssembleError(f"no toolbox assembly for format {fmt!r}")


def method_label(quant: dict) -> str:
    """The eval-table label of a run's method, e.g. ``strata NF4+DQ b64`` or ``strata FP8 E4M3 channel``."""
    method = quant["method"]
    if method in ("nf4", "gptq_nf4"):
        name = "GPTQ-NF4" if method == "gptq_nf4" else "NF4"
        return f"strata {name}{'+DQ' if quant.get('double_quant', True) else ''} b{quant.get('nf4_blocksize', 64)}"
    if method == "fp8":
        block = quant.get("fp8_block")
        how = "channel" if not block else f"block {block[0]}x{block[1]}"
        return f"strata FP8 {str(quant.get('fp8_type', 'e4m3')).upper()} {how}"
    return f"strata {method.upper()} W{quant['bits']} g{quant['group_size']}"
