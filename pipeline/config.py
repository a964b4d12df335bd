"""Job configuration: YAML, validated on load, with errors that name the bad key."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from strata_quant.pipeline.errors import ConfigError

#: llama.cpp's types strata solves on (workers.ggml.GRIDS), as a mix of strata's own names them
GGMLType = Literal["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(_Strict):
    """The calibration text: tokenised whole with the model's tokenizer, cut into N windows of T tokens,
    sharded over the workers on batch edges."""

    source: str = Field(
        "fixture:calib-mix",
        description="a .txt / .md / .jsonl / .parquet file (a path or s3://bucket/key), fixture:austen/NOVEL, "
        "or hf:DATASET; default: strata's mix of fiction, quotations and verse by many authors, and code",
    )
    num_samples: int = Field(64, ge=1, description="N, the number of calibration windows")
    seq_len: int = Field(512, ge=8, description="T, tokens per window")
    sampling: Literal["even", "random"] = Field(
        "even", description="window starts: evenly spaced (start_i = i·⌊len/N⌋) or seeded random"
    )
    seed: int = Field(0, description="seed of the random window starts (sampling: random)")
    text_field: str = Field("text", description="the field or column holding the text in .jsonl, .parquet and hf:")
    bos: Literal["auto", "always", "never"] = Field(
        "auto",
        description="what each window starts with: auto = as the model's tokenizer starts a prompt (its BOS where "
        "it adds one), always = the BOS token, never = text only",
    )
    statistics: str | None = Field(
        None,
        description="a finished run in run.store that kept its statistics (run.keep_statistics): this run solves "
        "GPTQ from its stored Hessians, with no calibration forward (another mix, grid or solver setting for the "
        "cost of the solves); the calibration, propagation and stages are that run's, checked equal at plan time",
    )


class MoeConfig(_Strict):
    """Mixture-of-Experts: experts the calibration barely reaches. Each expert's statistics come from the
    tokens the model's own router sends it; an expert with fewer than ``min_tokens`` of them (never fewer
    than one) gets the policy's decision, recorded per expert in the block record. A worker holds the
    statistics of at most ``max_expert_stats`` experts at once; the run refuses, before block 0, a budget whose
    statistics do not fit in the memory of the Ray cluster's smallest node or, on GPUs, in any worker's free GPU
    memory."""

    min_tokens: int = Field(1, ge=0, description="routed calibration tokens an expert needs for its own statistics")
    policy: Literal["all_tokens", "rtn", "fail"] = Field(
        "rtn",
        description="an expert below min_tokens: all_tokens = its statistics from every token of the block (the "
        "forward keeps the model's routing), rtn = rounded to nearest, fail = the run stops naming it",
    )
    max_expert_stats: int = Field(
        16,
        ge=1,
        description="the most experts whose statistics a worker holds at once (8·(H² + I²) bytes each): a block's "
        "experts are gathered, reduced, solved and freed in waves of this many; the results do not depend on it",
    )


class QuantConfig(_Strict):
    """The method and its settings, the same for every quantized linear unless bits_overrides says otherwise."""

    method: Literal["gptq", "rtn", "awq", "awq_gptq", "nf4", "gptq_nf4", "fp8"] = Field(
        "gptq",
        description="gptq; rtn (round to nearest); awq (activation-aware scales, folded into the preceding op); "
        "awq_gptq (AWQ's scales, then GPTQ); nf4 and gptq_nf4 (bitsandbytes NF4, rounded or GPTQ-solved); "
        "fp8 (FP8 weights, compressed-tensors)",
    )
    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per integer code")
    group_size: int = Field(
        64, description="input columns sharing one scale and zero; -1 = one group per row (per channel)"
    )
    sym: bool = Field(True, description="symmetric grid (zero fixed at 2^(bits−1)); false: a zero point per group")
    damp: float = Field(0.01, gt=0, lt=1, description="GPTQ: added to H's diagonal as a fraction of its mean")
    block_size: int = Field(128, ge=1, description="GPTQ: columns per lazy batch update")
    act_order: bool = Field(False, description="GPTQ: solve columns in order of decreasing H diagonal")
    static_groups: bool = Field(
        True, description="with act_order: groups fixed in column order before the solve (g_idx[k] = k // G)"
    )
    mse_grid: int = Field(0, ge=0, description="shrink steps of the scale search; 0 = min/max")
    mse_weight: Literal["uniform", "hessian"] = Field(
        "uniform",
        description="GPTQ: the MSE scale search's error per input weighted equally (uniform) or by H's diagonal "
        "(hessian: mean x², the statistic of llama.cpp's importance matrix)",
    )
    diag_shrink: float = Field(
        0.0,
        ge=0,
        le=1,
        description="GPTQ: solve with H ← (1−α)·H + α·diag(H), α this value: the calibration inputs' "
        "correlations count less, their per-input importance stays (0 = GPTQ's H)",
    )
    refine_passes: int = Field(
        0,
        ge=0,
        le=16,
        description="GPTQ on a GGUF type's grid (output.gguf_type): passes of coordinate descent over the codes "
        "afterwards, each moving a code one step where that lowers the layer's error under GPTQ's H "
        "(workers.ggml.refine_codes; 0 = GPTQ's codes)",
    )
    true_sequential: bool = Field(
        True, description="solve q/k/v, o, gate/up, down in turn, each on inputs through the quantized ones before it"
    )
    allow_partial_group: bool = Field(
        False, description="accept K % group_size != 0 (a last, partial group) instead of failing"
    )
    awq_grid: int = Field(20, ge=1, description="AWQ: α grid size (α = i / n) and clip-ratio steps")
    awq_duo: bool | Literal["both"] = Field(
        False, description="AWQ: duo scaling s = mean|x|^α / mean|w|^(1−α); both: search plain and duo, keep the better"
    )
    awq_clip: bool = Field(True, description="AWQ (method awq): per-group clip search after scaling")
    awq_clip_search: Literal["block", "full", "two_sided"] = Field(
        "two_sided",
        description="AWQ clip search: each group's diagonal Gram block (block), the whole row's "
        "output error by coordinate descent (full), and with the min and max sides clipped apart (two_sided)",
    )
    nf4_blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="NF4 (nf4, gptq_nf4): weights per absmax block (bitsandbytes' blocksize)"
    )
    double_quant: bool = Field(True, description="NF4: 8-bit quantization of the absmax constants (4.127 bpw)")
    fp8_type: Literal["e4m3", "e5m2"] = Field("e4m3", description="FP8: weight format")
    fp8_block: tuple[int, int] | None = Field(
        None, description="FP8: null = one scale per output channel; [bn, bk] = one scale per bn × bk block"
    )
    modules_to_not_convert: list[str] = Field(
        [], description="linears kept in 16-bit: a module name or a dotted run of it (down_proj, layers.0.mlp)"
    )
    skip_outliers: bool = Field(
        False, description="keep in 16-bit the linears whose input has outlier channels (from the Gram statistics)"
    )
    outlier_sigma: float = Field(6.0, gt=0, description="skip_outliers: robust z-score threshold of a channel's rms")
    sensitivity_bits: list[Literal[2, 3, 4, 8]] = Field(
        [], description="mixed precision: record each linear's error at these bit widths (read by strata plan)"
    )
    sensitivity_types: list[GGMLType] = Field(
        [],
        description="mixed precision: record each linear's error on these llama.cpp types, solved by quant.method "
        "on each (read by strata plan --gguf-mix); a type that cannot hold a linear's rows is left out for it",
    )
    bits_overrides: dict[str, Literal[2, 3, 4, 8]] = Field(
        {}, description="mixed precision: per-linear bits, {exact linear name or regex (re.search): bits}"
    )
    moe: MoeConfig = Field(MoeConfig(), description="Mixture-of-Experts (section below)")

    @field_validator("fp8_block")
    @classmethod
    def _fp8_block(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError("fp8_block must be two positive sizes [rows, columns] or null")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 8:
            raise ValueError("group_size must be -1 (whole row) or at least 8")
        return v


class RunConfig(_Strict):
    """How the job runs on Ray: workers, where the run record goes, and how blocks are scheduled."""

    workers: int = Field(1, ge=1, description="W, worker actors; each holds 1/W of the calibration samples")
    propagate: Literal["quantized", "float"] = Field(
        "quantized",
        description="the next block's inputs: through the quantized block (GPTQ/AWQ's reference semantics) "
        "or the float one (solves may then overlap the forward)",
    )
    batch_size: int = Field(8, ge=1, description="calibration windows per forward batch; shards fall on batch edges")
    store: str = Field("runs", description="the run record: a local folder or s3://bucket/prefix")
    run_id: str | None = Field(
        None, description="the run's name in the store; null = NAME-F, F the first 12 hex digits of the fingerprint"
    )
    hessian_dtype: Literal["float32", "float64"] = Field(
        "float64", description="dtype of the summed statistics (each batch's Gram is formed in float32)"
    )
    hidden_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of the hidden states kept between blocks (each block's forward runs in fp32)"
    )
    overlap_depth: int = Field(
        2, ge=0, description="propagate float: blocks whose solves may queue behind the forward (0 = solve inline)"
    )
    overlap_mode: Literal["auto", "thread", "deferred"] = Field(
        "auto",
        description="how queued solves run: on a solver thread, or deferred on the forward's own thread a block "
        "or more behind it; auto: deferred for one float stage (no true-sequential, GPTQ) on a CPU",
    )
    placement: Literal["pack", "spread"] = Field(
        "pack", description="spread: one worker per node where the cluster allows (a SPREAD placement group)"
    )
    split_solves: bool = Field(
        True, description="GPTQ: every worker solves a share of each group's rows (results identical to one worker)"
    )
    stage_cache: bool = Field(
        True,
        description="true-sequential Llama blocks: each statistics pass starts from what the last one kept "
        "(same results; holds ~(2 + FFN/hidden) copies of the worker's hidden states in fp32)",
    )
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="cuda: one GPU per worker (Ray num_gpus=1), blocks and solves on it, NCCL collectives"
    )
    threads_per_worker: int | None = Field(
        None, ge=1, description="torch threads per worker; null = the node's CPU count divided by workers"
    )
    huge_pages: bool = Field(
        False,
        description="workers' large allocations on transparent huge pages (glibc.malloc.hugetlb=1, where the "
        "kernel's THP mode is madvise): about a tenth of the page faults, same results; faster on SmolLM2, "
        "not on a 1536-wide model (docs/performance.md)",
    )
    keep_statistics: bool = Field(
        False,
        description="store every shared-input group's Hessian beside its results (8·K² bytes per group, K its "
        "input width), so later runs solve from them (calibration.statistics)",
    )
    max_restarts: int = Field(3, ge=0, description="worker-group restarts after lost workers before the run fails")
    block_timeout_s: float = Field(
        7200.0,
        ge=10,
        le=7 * 24 * 3600,
        description="watchdog: the longest one block may take before the run stops with an error (the workers' "
        "setup: this or 600 s, whichever is longer); also the timeout of every collective (torch.distributed), so a "
        "hung peer ends the run instead of a wait",
    )

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError("run_id must be a plain name (no '/', not starting with '.')")
        return v


class OutputConfig(_Strict):
    """The artifacts assembled from the run record, and the release gate."""

    dir: str = Field("out", description="folder the artifacts, the report and the model cards are written to")
    formats: list[Literal["gptq", "awq", "compressed-tensors", "gguf", "bitsandbytes"]] = Field(
        ["gptq", "gguf"], description="artifacts to assemble; [] = none (the run record only)"
    )
    shard_size: str = Field("5GB", description="largest safetensors shard, e.g. 5GB or 500MB")
    gguf_tokenizer_pre: str = Field(
        "auto",
        description="GGUF tokenizer.ggml.pre: llama.cpp's name of the pre-tokenizer (smollm, llama-bpe …); auto: "
        "the first name under which llama.cpp splits probe texts as the model's tokenizer does",
    )
    gguf_type: Literal[
        "auto",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K_M",
        "Q3_K_L",
        "Q4_K_S",
        "Q4_K_M",
        "Q5_K_S",
        "Q5_K_M",
        "Q6_K",
        "MOSTLY_Q4_0",
    ] = Field(
        "auto",
        description="auto = the type holding the result exactly; a K mix (Q4_K_M …) or MOSTLY_Q4_0 (llama.cpp's Q4_0 "
        "file) with method gptq = every tensor of llama.cpp's mix, each linear solved by GPTQ on its type's grid; "
        "others re-quantize (llama.cpp)",
    )
    gguf_types: dict[str, GGMLType] = Field(
        {},
        description="a mix of strata's own: per-linear llama.cpp types over gguf_type's mix (a K mix or MOSTLY_Q4_0 "
        "with method gptq), {exact linear name or regex (re.search): type}; written by strata plan --gguf-mix",
    )
    gguf_embedding_type: Literal["auto", "F32", "F16", "BF16", "Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"] = Field(
        "auto", description="token_embd / output type; auto = F16 (exact files) or llama.cpp's recipe (re-quantized)"
    )
    whole_model_check_limit: str = Field(
        "8GB",
        description="fp32 model size up to which verify also loads the whole GGUF in transformers and llama.cpp; "
        "larger models are verified tensor by tensor with gguf-py only",
    )
    max_ppl_increase: float | None = Field(
        None, description="release gate: fail the job when perplexity rises more than this fraction (0.05 = 5%)"
    )
    overwrite: bool = Field(False, description="replace existing artifacts (otherwise an existing one is refused)")


class EvalConfig(_Strict):
    """Held-out evaluation after assembly: perplexity, KL divergence and top-1 agreement against the float model,
    each window scored alone. ``eval: null`` skips it."""

    text: str = Field("fixture:austen/persuasion", description="held-out text, any calibration.source form")
    off_domain: str | None = Field(
        "fixture:kjv",
        description="a second held-out text unlike the calibration (another author, era and genre; code for "
        "code models), scored the same way and reported beside the first; null: only the first",
    )
    windows: int = Field(
        32, ge=1, description="windows scored: the text's first non-overlapping windows of seq_len tokens"
    )
    seq_len: int = Field(
        512, ge=8, description="tokens per window, the tokenizer's prompt prefix (Gemma's BOS) first where it adds one"
    )
    baselines: list[Literal["rtn"]] = Field(["rtn"], description="extra rows computed in-process for comparison")


# output formats that can hold each method's results (integer methods: all but bitsandbytes)
TOOLBOX_FORMATS = {"nf4": ["bitsandbytes"], "gptq_nf4": ["bitsandbytes"], "fp8": ["compressed-tensors"]}
# formats that can list linears left in 16-bit (modules_to_not_convert / ignore / skip modules)
SKIP_FORMATS = ["compressed-tensors", "awq", "bitsandbytes"]


def _method_format_error(quant: QuantConfig, formats: list[str]) -> str | None:
    """Why ``quant.method`` and its options cannot be written as ``formats`` (None when they can)."""
    method = quant.method
    allowed = TOOLBOX_FORMATS.get(method)
    if allowed is not None:
        bad = [f for f in formats if f not in allowed]
        if bad:
            return (
                f"output format(s) {', '.join(bad)} cannot hold method {method} results; "
                f"allowed for {method}: {', '.join(allowed)}"
            )
    elif "bitsandbytes" in formats:
        return f"bitsandbytes output holds method nf4 / gptq_nf4 results only, not {method}"
    if method == "fp8" and quant.fp8_type != "e4m3" and "compressed-tensors" in formats:
        return "compressed-tensors stores FP8 E4M3 weights only; fp8_type e5m2 runs with output.formats: []"
    if quant.modules_to_not_convert or quant.skip_outliers:
        if method in ("awq", "awq_gptq"):
            return "modules_to_not_convert / skip_outliers do not combine with AWQ (its scales fold across linears)"
        bad = [f for f in formats if f not in SKIP_FORMATS]
        if bad:
            return (
                f"output format(s) {', '.join(bad)} cannot leave linears in 16-bit (modules_to_not_convert / "
                f"skip_outliers); use {', '.join(SKIP_FORMATS)}"
            )
    return None


class JobConfig(_Strict):
    """A job: one checkpoint, one calibration set, one method; any number of output formats.

    Made when the config is loaded, before any work (the last one when the run is planned):

    - nf4 and gptq_nf4 write bitsandbytes only, fp8 compressed-tensors only (E4M3); integer methods write
      gptq, awq, compressed-tensors and gguf, never bitsandbytes.
    - modules_to_not_convert / skip_outliers need a format that lists 16-bit linears (compressed-tensors,
      awq, bitsandbytes) and do not combine with AWQ methods.
    - awq output takes 4-bit results with a group size; compressed-tensors takes 2, 4 or 8 bits.
    - gguf output needs a GGUF type that holds the result (gguf_type auto: symmetric ≤ 4-bit → Q4_0,
      asymmetric ≤ 4-bit → Q5_0, symmetric 8-bit → Q8_0) and, where the solver's blocks are carried over,
      a group size that is a multiple of 32 and static groups with act_order.
    - bits_overrides / sensitivity_bits take methods gptq or rtn; per-linear bits export as gptq / gguf
      (gguf_type auto).
    - output.max_ppl_increase needs an eval section.
    - Against the model (at plan time): group_size divides every linear's input width (or
      allow_partial_group), gptq_nf4 needs widths that are multiples of nf4_blocksize.
    """

    name: str = Field("job", description="job name: prefix of the run id, the artifacts and the report")
    model: str = Field(
        description="a folder with config.json + *.safetensors (+ index, tokenizer), s3://bucket/prefix, "
        "or fixture:smollm2-135m"
    )
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="the calibration text (section below)"
    )
    quant: QuantConfig = Field(QuantConfig(), description="method and settings (section below)")
    run: RunConfig = Field(RunConfig(), description="workers, store, scheduling (section below)")
    output: OutputConfig = Field(OutputConfig(), description="artifacts and release gate (section below)")
    eval: EvalConfig | None = Field(EvalConfig(), description="held-out evaluation (section below); null skips it")

    @model_validator(mode="after")
    def _compatible(self) -> JobConfig:
        from strata_quant.pipeline.formats.gguf_solved import SOLVED_MIXES

        toolbox_error = _method_format_error(self.quant, self.output.formats)
        if toolbox_error:
            raise ValueError(toolbox_error)
        if "awq" in self.output.formats and (self.quant.bits != 4 or self.quant.group_size == -1):
            raise ValueError("awq output holds 4-bit results with a group size (not -1) only")
        if "compressed-tensors" in self.output.formats and self.quant.bits == 3 and self.quant.method != "fp8":
            raise ValueError("compressed-tensors output does not take 3-bit results (use 2, 4 or 8)")
        if self.output.gguf_type.startswith("MOSTLY_") and self.quant.method != "gptq":
            raise ValueError(
                f"gguf_type {self.output.gguf_type} is llama.cpp's file solved by GPTQ in the run: method gptq only "
                f"(for {self.quant.method} results name the type itself, e.g. {self.output.gguf_type[7:]})"
            )
        if "gguf" in self.output.formats and self.output.gguf_type in SOLVED_MIXES and self.quant.method == "gptq":
            if self.output.formats != ["gguf"]:  # the results are ggml blocks (two-level scales): no other format
                raise ValueError(
                    f"gguf_type {self.output.gguf_type} with method gptq solves every linear on llama.cpp's grids, "
                    f"which only a GGUF holds: output.formats must be [gguf], not {self.output.formats}"
                )
        elif "gguf" in self.output.formats:
            from strata_quant.pipeline.formats.gguf import resolve_type

            try:
                _, carry = resolve_type(self.output.gguf_type, self.quant.bits, self.quant.sym)
            except ValueError as err:
                raise ValueError(f"gguf output: {err}") from None
            if carry != "requantized":  # the solver's blocks go into the file: they must line up with ggml's
                if self.quant.group_size != -1 and self.quant.group_size % 32:
                    raise ValueError("gguf output needs a group size that is a multiple of 32 (its block size)")
                if self.quant.act_order and not self.quant.static_groups:
                    raise ValueError("gguf output needs static groups with act_order")
        if self.quant.bits_overrides or self.quant.sensitivity_bits:
            if self.quant.method not in ("gptq", "rtn"):
                raise ValueError("quant.bits_overrides / sensitivity_bits take method gptq or rtn")
            bad = [f for f in self.output.formats if f not in ("gptq", "gguf")]
            if self.quant.bits_overrides and bad:
                raise ValueError(f"per-linear bits (quant.bits_overrides) export as gptq / gguf only, not {bad}")
            if self.quant.bits_overrides and "gguf" in self.output.formats and self.output.gguf_type != "auto":
                raise ValueError("gguf output of per-linear bits needs gguf_type auto (each tensor's exact type)")
        if self.quant.sensitivity_types and self.quant.method not in ("gptq", "rtn"):
            raise ValueError("quant.sensitivity_types take method gptq or rtn")
        # what only a mix solved in the run has: per-linear llama.cpp types, codes on llama.cpp's grids
        needs_mix = {
            "output.gguf_types (per-linear llama.cpp types) need": self.output.gguf_types,
            "quant.refine_passes refines codes on llama.cpp's grids: it needs": self.quant.refine_passes,
        }
        for what in (w for w, on in needs_mix.items() if on):
            from strata_quant.pipeline.formats.gguf_solved import solves_mix

            if "gguf" not in self.output.formats or not solves_mix(self.output.gguf_type, self.quant.method):
                raise ValueError(
                    f"{what} gguf output of a mix solved in the run: method gptq and gguf_type a K mix (Q4_K_M …) "
                    "or MOSTLY_Q4_0"
                )
        if self.calibration.statistics is not None:
            if self.quant.method != "gptq":
                raise ValueError(
                    f"calibration.statistics solves GPTQ from kept Hessians; quant.method {self.quant.method} "
                    + ("needs the calibration's activations" if "awq" in self.quant.method else "does not use them")
                )
            if self.quant.sensitivity_bits or self.quant.sensitivity_types:
                raise ValueError(
                    "calibration.statistics: the sensitivity probe (quant.sensitivity_bits / sensitivity_types) "
                    "needs a forward"
                )
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


def check_against_model(cfg: JobConfig, model_config: dict, widths: list[int] | None = None) -> None:
    """Checks that need the model: group size against every linear's input width (``widths``,
    from the block's linears; else hidden_size and intermediate_size from config.json)."""
    if cfg.quant.method in TOOLBOX_FORMATS:  # NF4 / FP8 do not use the integer group size
        widths = set(widths or (int(model_config["hidden_size"]), int(model_config["intermediate_size"])))
        bad = sorted(k for k in widths if k % cfg.quant.nf4_blocksize)
        if cfg.quant.method == "gptq_nf4" and bad:
            raise ConfigError(
                f"gptq_nf4 needs input widths that are multiples of quant.nf4_blocksize {cfg.quant.nf4_blocksize}; "
                f"got {bad} (pick a smaller nf4_blocksize, e.g. 32, or method nf4)"
            )
        return
    g = cfg.quant.group_size
    if g == -1:
        return
    widths = set(widths or (int(model_config["hidden_size"]), int(model_config["intermediate_size"])))
    bad = sorted(k for k in widths if k % g)
    if bad and not cfg.quant.allow_partial_group:
        raise ConfigError(
            f"quant.group_size {g} does not divide the input width(s) {bad} of this model; "
            f"pick a divisor (e.g. {', '.join(str(d) for d in (32, 64, 128) if all(k % d == 0 for k in widths))}) "
            "or set quant.allow_partial_group: true"
        )
    if bad and "gguf" in cfg.output.formats and any(k % 32 for k in bad):
        raise ConfigError(f"gguf output needs input widths that are multiples of 32; got {bad}")


def check_head_dim(config: dict) -> int:
    """The attention head width: head_dim (or hidden / heads) must be even (rotary halves) and the
    heads must split the KV heads evenly."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if head_dim <= 0 or head_dim % 2:
        raise ConfigError(f"head_dim {head_dim} of this model is not a positive even number (rotary halves)")
    if heads % kv:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if config.get("head_dim") is None and hidden % heads:
        raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} and no head_dim")
    return head_dim
