"""Job configuration: YAML, validated on load, with errors that name the bad key."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(_Strict):
    source: str = Field(description="text/jsonl/parquet file, fixture:austen/<novel>, or hf:<dataset name>")
    num_samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=8)
    sampling: Literal["even", "random"] = "even"
    seed: int = 0
    text_field: str = "text"


class QuantConfig(_Strict):
    method: Literal["gptq", "rtn", "awq", "awq_gptq"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 64
    sym: bool = True
    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    act_order: bool = False
    static_groups: bool = True
    mse_grid: int = Field(0, ge=0, description="shrink steps of the scale search; 0 = min/max")
    true_sequential: bool = Field(
        True, description="solve q/k/v, o, gate/up, down in turn, each on inputs through the quantized ones before it"
    )
    allow_partial_group: bool = Field(
        False, description="accept K % group_size != 0 (a last, partial group) instead of failing"
    )
    awq_grid: int = Field(20, ge=1, description="AWQ: α grid size (α = i / n) and clip-ratio steps")
    awq_duo: bool = Field(False, description="AWQ: duo scaling s = mean|x|^α / mean|w|^(1−α)")
    awq_clip: bool = Field(True, description="AWQ (method awq): per-group clip search after scaling")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 8:
            raise ValueError("group_size must be -1 (whole row) or at least 8")
        return v


class RunConfig(_Strict):
    workers: int = Field(1, ge=1)
    propagate: Literal["quantized", "float"] = "quantized"
    batch_size: int = Field(8, ge=1)
    store: str = "runs"
    run_id: str | None = None
    hessian_dtype: Literal["float32", "float64"] = "float64"
    threads_per_worker: int | None = Field(None, ge=1)
    max_restarts: int = Field(3, ge=0, description="worker-group restarts after lost workers before the run fails")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError("run_id must be a plain name (no '/', not starting with '.')")
        return v


class OutputConfig(_Strict):
    dir: str = "out"
    formats: list[Literal["gptq", "awq", "compressed-tensors", "gguf"]] = ["gptq", "gguf"]
    shard_size: str = "5GB"
    gguf_tokenizer_pre: str = "default"
    gguf_type: Literal[
        "auto", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"
    ] = Field("auto", description="auto = the type holding the result exactly; others may re-quantize (llama.cpp)")
    gguf_embedding_type: Literal["auto", "F32", "F16", "BF16", "Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"] = Field(
        "auto", description="token_embd / output type; auto = F16 (exact files) or llama.cpp's recipe (re-quantized)"
    )
    max_ppl_increase: float | None = Field(
        None, description="release gate: fail the job when perplexity rises more than this fraction (0.05 = 5%)"
    )
    overwrite: bool = False


class EvalConfig(_Strict):
    text: str = "fixture:austen/persuasion"
    windows: int = Field(32, ge=1)
    seq_len: int = Field(512, ge=8)
    baselines: list[Literal["rtn"]] = ["rtn"]


class JobConfig(_Strict):
    name: str = "job"
    model: str
    calibration: CalibrationConfig
    quant: QuantConfig = QuantConfig()
    run: RunConfig = RunConfig()
    output: OutputConfig = OutputConfig()
    eval: EvalConfig | None = EvalConfig()

    @model_validator(mode="after")
    def _compatible(self) -> JobConfig:
        if "awq" in self.output.formats and (self.quant.bits != 4 or self.quant.group_size == -1):
            raise ValueError("awq output holds 4-bit results with a group size (not -1) only")
        if "compressed-tensors" in self.output.formats and self.quant.bits == 3:
            raise ValueError("compressed-tensors output does not take 3-bit results (use 2, 4 or 8)")
        if "gguf" in self.output.formats:
            from pipeline.formats.gguf import resolve_type

            try:
                _, carry = resolve_type(self.output.gguf_type, self.quant.bits, self.quant.sym)
            except ValueError as err:
                raise ValueError(f"gguf output: {err}") from None
            if carry != "requantized":  # the solver's blocks go into the file: they must line up with ggml's
                if self.quant.group_size != -1 and self.quant.group_size % 32:
                    raise ValueError("gguf output needs a group size that is a multiple of 32 (its block size)")
                if self.quant.act_order and not self.quant.static_groups:
                    raise ValueError("gguf output needs static groups with act_order")
        if self.output.max_ppl_increase is not None and self.eval is None:
            raise ValueError("output.max_ppl_increase needs an eval section (the gate compares held-out perplexity)")
        return self


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key")
        else:
            lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: dict, origin: str = "config") -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid job config {origin}:\n{_format_errors(err)}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> JobConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(data, str(path))


def check_against_model(cfg: JobConfig, model_config: dict) -> None:
    """Checks that need the model: group size against every linear's input width."""
    g = cfg.quant.group_size
    if g == -1:
        return
    widths = {int(model_config["hidden_size"]), int(model_config["intermediate_size"])}
    bad = sorted(k for k in widths if k % g)
    if bad and not cfg.quant.allow_partial_group:
        raise ConfigError(
            f"quant.group_size {g} does not divide the input width(s) {bad} of this model; "
            f"pick a divisor (e.g. {', '.join(str(d) for d in (32, 64, 128) if all(k % d == 0 for k in widths))}) "
            "or set quant.allow_partial_group: true"
        )
    if bad and "gguf" in cfg.output.formats and any(k % 32 for k in bad):
        raise ConfigError(f"gguf output needs input widths that are multiples of 32; got {bad}")
