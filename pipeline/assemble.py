"""Assemble published artifacts from the run record: one streamed path for every format.

:func:`assemble` looks the format up in the registry (:mod:`pipeline.formats.base`) and has
its class write the artifact from the store, one tensor at a time, into a hidden temporary
next to its destination, renamed into place only when complete, so a reader never sees a
partial artifact. The ``assemble_<format>`` functions are that path with one format named.
"""

from __future__ import annotations

from pathlib import Path

from strata_quant.pipeline.checkpoint import CheckpointReader
from strata_quant.pipeline.formats.base import (  # noqa: F401  (re-exported: the assembly's public names)
    DEQUANT_CHUNK,
    SAFETENSORS_DTYPES,
    TOKENIZER_FILES,
    AssembleError,
    AssembleOptions,
    ResultSource,
    ResultSummary,
    ShardedSafetensorsWriter,
    check_finite,
    checkpoint_float_dtype,
    commit_folder,
    copy_tokenizer,
    dequantize_half,
    format_for,
    linear_bits,
    parse_size,
    quantized_only,
    registered,
    skipped_linears,
    staging_folder,
    unquantized_linears,
)


def assemble(
    fmt: str,
    reader: CheckpointReader,
    results: ResultSource,
    dest: Path,
    options: AssembleOptions | None = None,
    *,
    method: str | None = None,
) -> Path:
    """The ``fmt`` artifact (a config / CLI format name) of ``method``'s results at ``dest``."""
    return format_for(fmt, method)().write(reader, results, Path(dest), options or AssembleOptions())


def options_of(cfg, tool_version: str = AssembleOptions.tool_version) -> AssembleOptions:
    """A job config's assembly options (``output.*``)."""
    return AssembleOptions(
        shard_size=cfg.output.shard_size,
        overwrite=cfg.output.overwrite,
        tool_version=tool_version,
        name=cfg.name,
        tokenizer_pre=cfg.output.gguf_tokenizer_pre,
        gguf_type=cfg.output.gguf_type,
        embedding_type=cfg.output.gguf_embedding_type,
        gguf_types=dict(cfg.output.gguf_types),
    )


def artifact_paths(cfg) -> dict[str, Path]:
    """Where each artifact of a job goes ({format name: path}), in the registry's order."""
    options, paths = options_of(cfg), {}
    for name in [cls.name for cls in registered() if cls.name in cfg.output.formats]:
        if name not in paths:
            fmt = format_for(name, cfg.quant.method)
            paths[name] = Path(cfg.output.dir) / fmt.artifact_name(cfg.name, cfg.quant.bits, cfg.quant.sym, options)
    return paths


def assemble_gptq(reader, results, dest, *, shard_size="5GB", overwrite=False, tool_version="0.1.0") -> Path:
    """A GPTQ checkpoint (:class:`pipeline.formats.gptq.GPTQFormat`)."""
    opts = AssembleOptions(shard_size=shard_size, overwrite=overwrite, tool_version=tool_version)
    return assemble("gptq", reader, results, dest, opts)


def assemble_awq(reader, results, dest, *, shard_size="5GB", overwrite=False) -> Path:
    """An AWQ GEMM checkpoint (:class:`pipeline.formats.awq.AWQFormat`)."""
    return assemble("awq", reader, results, dest, AssembleOptions(shard_size=shard_size, overwrite=overwrite))


def assemble_compressed_tensors(reader, results, dest, *, shard_size="5GB", overwrite=False) -> Path:
    """A compressed-tensors pack-quantized checkpoint (:class:`pipeline.formats.compressed_tensors.CompressedTensorsFormat`)."""
    opts = AssembleOptions(shard_size=shard_size, overwrite=overwrite)
    return assemble("compressed-tensors", reader, results, dest, opts)


def assemble_bitsandbytes(reader, results, dest, *, shard_size="5GB", overwrite=False) -> Path:
    """A bitsandbytes NF4 checkpoint (:class:`pipeline.formats.bnb_nf4.BitsandbytesFormat`)."""
    opts = AssembleOptions(shard_size=shard_size, overwrite=overwrite)
    return assemble("bitsandbytes", reader, results, dest, opts, method="nf4")


def assemble_fp8(reader, results, dest, *, shard_size="5GB", overwrite=False) -> Path:
    """A compressed-tensors float-quantized checkpoint (:class:`pipeline.formats.fp8.FP8Format`)."""
    opts = AssembleOptions(shard_size=shard_size, overwrite=overwrite)
    return assemble("compressed-tensors", reader, results, dest, opts, method="fp8")


def assemble_gguf(
    reader,
    results,
    dest,
    *,
    tokenizer_pre="default",
    overwrite=False,
    name="model",
    gguf_type="auto",
    embedding_type="auto",
    tool_version="0.1.0",
    threads=0,
) -> Path:
    """A llama.cpp GGUF (:class:`pipeline.formats.gguf.GGUFFormat`)."""
    opts = AssembleOptions(
        overwrite=overwrite,
        tool_version=tool_version,
        name=name,
        tokenizer_pre=tokenizer_pre,
        gguf_type=gguf_type,
        embedding_type=embedding_type,
        threads=threads,
    )
    return assemble("gguf", reader, results, dest, opts)
