"""What every worker of a run is told: the job (plain data, sent once) and the modes that follow from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from strata_quant.workers.methods import HESSIAN_METHODS, spec_with_overrides
from strata_quant.workers.result import QuantSpec


@dataclass
class WorkerJob:
    """What every worker of a run needs to know (plain data, sent once)."""

    model_config: dict
    spec: QuantSpec
    method: str = "gptq"  # gptq | rtn | awq | awq_gptq
    propagate: str = "quantized"  # quantized | float
    run_prefix: str = "runs/run"
    batch_size: int = 8
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = True
    mse_grid: int = 0
    diag_shrink: float = 0.0
    refine_passes: int = 0  # GGUF grids: coordinate-descent passes over GPTQ's codes (workers/ggml.py)
    mse_weight: str = "uniform"  # uniform | hessian (workers/gptq.py)
    true_sequential: bool = True
    awq_grid: int = 20
    awq_duo: bool | str = False  # True, False or "both"
    awq_clip: bool = True
    awq_clip_search: str = "two_sided"  # block | full | two_sided (workers/awq.py)
    hessian_dtype: str = "float64"
    hidden_dtype: str = "float32"  # the hidden states kept between blocks; every forward runs in fp32
    overlap_depth: int = 2  # propagate float: blocks whose solves may still be queued behind the forward
    # how queued solves run: "thread" (a solver thread beside the forward), "deferred" (on the
    # forward's thread, a block or more behind it), "auto" (deferred for one float stage on a CPU)
    overlap_mode: str = "auto"
    split_solves: bool = True  # GPTQ groups solved by all workers, each a share of the rows (same results)
    stage_cache: bool = True  # true-sequential Llama blocks: each pass reuses the last (same results)
    # AWQ's relations as the plan found them (ScaleGroup.to_dict) and {group "a/b": why} for the
    # groups without one; None: each worker finds them on its first block
    awq_relations: list[dict] | None = None
    awq_unfolded: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    # where blocks, samples and solves live: "cpu", or "cuda" (the actor's own GPU: Ray sets
    # CUDA_VISIBLE_DEVICES per actor, so it is cuda:0 there); collectives use NCCL on GPUs
    device: str = "cpu"
    extra: dict = field(default_factory=dict)
    # every torch.distributed collective fails after this long instead of waiting on a hung peer
    collective_timeout_s: float = 1800.0
    # per-linear grids: regex on the linear's full name → QuantSpec field overrides ({"bits": 8})
    spec_overrides: dict[str, dict] = field(default_factory=dict)
    # mixed precision: record each linear's sensitivity at these widths (workers/mixed.py)
    sensitivity_bits: list[int] = field(default_factory=list)
    # … and on these llama.cpp types (workers.mixed.ggml_sensitivity), for a GGUF mix of strata's own
    sensitivity_types: list[str] = field(default_factory=list)
    # linears kept in 16-bit: named (dotted-component match) and/or detected from the Gram statistics
    modules_to_not_convert: list[str] = field(default_factory=list)
    skip_outliers: bool = False
    outlier_sigma: float = 6.0
    nf4_blocksize: int = 64
    double_quant: bool = True
    fp8_type: str = "e4m3"
    fp8_block: tuple[int, int] | None = None
    # Mixture-of-Experts: each per-expert checkpoint linear (block-relative name) → its rows of a fused
    # parameter, [param, e, first, end] (workers.moe.ExpertSources); the blocks that hold experts
    expert_sources: dict[str, list] = field(default_factory=dict)
    moe_blocks: list[int] = field(default_factory=list)
    moe_renames: dict[str, str] = field(default_factory=dict)  # a MoE block's other tensors: checkpoint → model name
    moe_min_tokens: int = 1  # an expert with fewer routed calibration tokens gets the policy's decision
    moe_policy: str = "rtn"  # all_tokens | rtn | fail (workers.moe.MIN_TOKENS_POLICIES)
    moe_max_expert_stats: int = 16  # experts whose statistics a worker holds at once (workers.moe.expert_waves)
    moe_expert_shapes: list[list[int]] = field(default_factory=list)  # [E, H, I] per MoE module (the plan's check)
    # a llama.cpp mix solved in the run: {linear's full name: ggml type}, each solved by GPTQ on that grid
    ggml_types: dict[str, str] = field(default_factory=dict)
    # each group's H stored beside its results, for later runs that solve from it
    keep_statistics: bool = False
    # a run solved from another run's kept statistics: {block: [its groups' statistics entries]}
    # (workers.records.ResultWriter.statistics); no calibration samples, no forward
    kept_statistics: dict[int, list[dict]] | None = None

    @property
    def probes(self) -> bool:
        """A mixed-precision probe: every linear's sensitivity recorded (at widths or on ggml types)."""
        return bool(self.sensitivity_bits or self.sensitivity_types)

    def spec_for(self, full_name: str) -> QuantSpec:
        """The grid of one linear: ``spec`` with every matching ``spec_overrides`` entry applied."""
        return spec_with_overrides(self.spec, full_name, self.spec_overrides)

    def method_options(self) -> dict:
        """The solver options :func:`workers.methods.quantize_group` takes."""
        return {
            "damp": self.damp,
            "block_size": self.block_size,
            "act_order": self.act_order,
            "static_groups": self.static_groups,
            "mse_grid": self.mse_grid,
            "diag_shrink": self.diag_shrink,
            "refine_passes": self.refine_passes,
            "mse_weight": self.mse_weight,
            "true_sequential": self.true_sequential,
            "awq_clip": self.awq_clip,
            "awq_clip_search": self.awq_clip_search,
            "awq_grid": self.awq_grid,
            "nf4_blocksize": self.nf4_blocksize,
            "double_quant": self.double_quant,
            "fp8_type": self.fp8_type,
            "fp8_block": self.fp8_block,
        }


GRAM_METHODS = ("gptq", "awq", "awq_gptq", "gptq_nf4")
AWQ_METHODS = ("awq", "awq_gptq")


def job_overlaps(job: WorkerJob) -> bool:
    """Whether a job's solves queue behind the forward (:meth:`BlockWorker.overlaps`)."""
    # experts' routed statistics are taken from the block's inputs when the experts are solved
    return (
        job.propagate == "float"
        and job.overlap_depth > 0
        and job.method not in AWQ_METHODS
        and not job.moe_blocks
        and job.kept_statistics is None  # no forward to overlap
    )


def one_float_stage(job: WorkerJob) -> bool:
    """Whether each block's statistics come from one pass over the float block, which is then
    also its forward: ``propagate: float`` without true-sequential stages, a Hessian method
    (GPTQ solvers, or outlier detection), no AWQ fold and no mixed-precision probe."""
    return (
        job.propagate == "float"
        and not job.true_sequential
        and not job.probes
        and job.method not in AWQ_METHODS
        and (job.method in HESSIAN_METHODS or job.skip_outliers)
        and not job.moe_blocks  # the experts' statistics need the block's inputs after the pass
    )
