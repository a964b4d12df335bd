"""The worker: owns a shard of the calibration samples and walks the model block by block.

This class holds no Ray code: pipeline/ wraps it as a Ray actor and hands it a
checkpoint reader and a store (objects with ``load_block(b)`` and ``put_bytes`` /
``get_bytes``). Workers of one run form a torch.distributed group to reduce each
linear's statistics to the worker that owns (solves) it.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import resource
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from strata_quant.workers.awq import (
    AbsMeanAccumulator,
    ScaleGroup,
    find_scale_groups,
)
from strata_quant.workers.block import (
    BlockTrace,
    StageLayout,
    StagePasses,
    block_linears,
    build_block,
    decoder_layers,
    materialize_buffers,
    run_block,
    stage_layout,
    trace_block,
)
from strata_quant.workers.gptq import relative_output_error
from strata_quant.workers.methods import (
    HESSIAN_METHODS,
    Part,
    Result,
    matches_module,
    outlier_group,
    result_from_tensors,
    result_kind,
    spec_with_overrides,
)
from strata_quant.workers.queues import DeferredSolves, SolverQueue, Uploads
from strata_quant.workers.result import QuantSpec
from strata_quant.workers.schedule import GroupPlan, plan_solves
from strata_quant.workers.stats import HessianAccumulator
from strata_quant.workers.steps import BlockState, plan_block, run_plan

# the names tests and benchmarks import from here
_Uploads, _SolverQueue, _DeferredSolves = Uploads, SolverQueue, DeferredSolves


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
    # linears kept in 16-bit: named (dotted-component match) and/or detected from the Gram statistics
    modules_to_not_convert: list[str] = field(default_factory=list)
    skip_outliers: bool = False
    outlier_sigma: float = 6.0
    nf4_blocksize: int = 64
    double_quant: bool = True
    fp8_type: str = "e4m3"
    fp8_block: tuple[int, int] | None = None

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
            "true_sequential": self.true_sequential,
            "awq_clip": self.awq_clip,
            "awq_clip_search": self.awq_clip_search,
            "awq_grid": self.awq_grid,
            "nf4_blocksize": self.nf4_blocksize,
            "double_quant": self.double_quant,
            "fp8_type": self.fp8_type,
            "fp8_block": self.fp8_block,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def result_to_bytes(result: Result) -> bytes:
    """Deterministic safetensors bytes of any result (QuantizedLinear, NF4Linear, FP8Linear,
    KeptLinear): its tensors and one JSON metadata entry (``strata_result``, sorted keys)."""
    tensors, metadata = result.to_tensors()
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def result_from_bytes(data: bytes) -> Result:
    tensors = load_safetensors(data)
    metadata = _safetensors_metadata(data)
    return result_from_tensors(tensors, metadata)


def _grid_fields(result: Result) -> dict:
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
    return {"bits": 16, "group_size": None, "sym": None, "kind": "kept", "skipped": True, "reason": result.reason}


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    import json
    import struct

    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {})


GRAM_METHODS = ("gptq", "awq", "awq_gptq", "gptq_nf4")
AWQ_METHODS = ("awq", "awq_gptq")
FLOAT_SCHEMA_VERSION = 1


def job_overlaps(job: WorkerJob) -> bool:
    """Whether a job's solves queue behind the forward (:meth:`BlockWorker.overlaps`)."""
    return job.propagate == "float" and job.overlap_depth > 0 and job.method not in AWQ_METHODS


def reduce_order(stage: list[list[str]], owner_of: dict[tuple, int]) -> list[list[str]]:
    """The groups of a stage in the order their sums are reduced: every owner's first group,
    then every owner's second, and so on (stage order within an owner and among equals), so
    no owner waits for other owners' groups before it can start on its first. Decided from
    the stage and the owners alone: every worker issues the same order."""
    nth: dict[int, int] = {}
    keyed = []
    for i, names in enumerate(stage):
        owner = owner_of[tuple(names)]
        keyed.append((nth.get(owner, 0), i, names))
        nth[owner] = nth.get(owner, 0) + 1
    return [names for _, _, names in sorted(keyed, key=lambda k: (k[0], k[1]))]


def float_to_bytes(name: str, tensor: torch.Tensor, meta: dict) -> bytes:
    """One float tensor (under its checkpoint name) as deterministic safetensors bytes."""
    import json

    return save_safetensors(
        {name: tensor.detach().float().cpu().contiguous()},
        metadata={"strata_float": json.dumps({"schema": FLOAT_SCHEMA_VERSION, **meta}, sort_keys=True)},
    )


class _StopForward(Exception):
    pass


@dataclass
class _Statistics:
    """A block's shared-input groups and this worker's Gram sums of their inputs (one stage);
    with deferred solves also the block's solve plan and its reductions in flight (issued
    when the sums were complete)."""

    groups: list[list[str]]
    sums: dict[str, HessianAccumulator]
    plans: dict[tuple, GroupPlan] | None = None
    pending: dict[tuple, dist.Work] | None = None

    def rows(self) -> int:
        return self.sums[self.groups[0][0]].count


class _Catcher(nn.Module):
    """Stands in for a decoder layer and records what the model feeds it: the hidden states
    pass through unchanged, so every layer's catcher sees the arguments of its own layer
    (the attention mask and rotary tables of its layer type: Gemma's sliding-window layers);
    the last one stops the forward."""

    def __init__(self, last: bool):
        super().__init__()
        self.last = last
        self.captured: tuple[torch.Tensor, dict] | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.captured = (hidden_states, kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


def to_device(obj, device: torch.device):
    """``obj`` (a tensor, or tuples / lists / dicts of them) on ``device``; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class BlockWorker:
    def __init__(self, rank: int, world: int, reader, store, job: WorkerJob):
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.set_num_threads(max(1, job.threads))
        self.device = torch.device(job.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"worker {rank}: run.device is {job.device!r} but this process sees no CUDA device")
        self.rank, self.world = rank, world
        self.reader, self.store, self.job = reader, store, job
        if rank == 0 and hasattr(reader, "hash_blocks"):
            reader.hash_blocks = True  # one worker fingerprints each block's bytes as it reads them (resume checks)
        self._uploads = Uploads(store)
        config_dict = dict(job.model_config)
        model_type = config_dict.pop("model_type")
        self.config = AutoConfig.for_model(model_type, **config_dict)
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.meta_model = AutoModelForCausalLM.from_config(self.config)
        self.layers_path, self.meta_layers = decoder_layers(self.meta_model)
        self.batches: list[tuple[torch.Tensor, dict]] = []
        self.layer_kwargs: list[list[dict]] = []
        self.kwargs_variant: list[int] = []
        self.group_ready = False
        self._traces: dict[tuple, BlockTrace] = {}  # per block structure (:meth:`_trace`)
        self._relations: dict[tuple, tuple[list[ScaleGroup], dict[tuple[str, ...], str]]] = {}
        self._total_rows: int | None = None  # all workers' calibration rows (:meth:`_all_rows`)

    # -- setup ---------------------------------------------------------------------

    def rendezvous(self) -> int:
        return free_port()

    def init_group(self, address: str, port: int) -> None:
        if self.world > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend,
                init_method=f"tcp://{address}:{port}",
                rank=self.rank,
                world_size=self.world,
                timeout=datetime.timedelta(seconds=self.job.collective_timeout_s),
            )
            self.group_ready = True

    def load_samples(self, token_ids: torch.Tensor, embedding: torch.Tensor | None = None) -> int:
        """Embed this worker's samples and capture the block inputs with the model's own code
        (``embedding``: another input embedding than the checkpoint's, e.g. a GGUF's)."""
        model = self.meta_model
        materialize_buffers(model, self.layers_path)  # before the embedding gets its weights
        embed = model.get_input_embeddings()
        embed_name = next(n for n, m in model.named_modules() if m is embed) + ".weight"
        weight = (self.reader.load([embed_name])[embed_name] if embedding is None else embedding).float()
        embed.weight = nn.Parameter(weight, requires_grad=False)
        for name, module in list(model.named_modules()):
            if type(module).__name__.endswith("RotaryEmbedding"):
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, type(module)(config=self.config))
        layers = list(self.meta_layers)
        catchers = [_Catcher(last=i == len(layers) - 1) for i in range(len(layers))]
        for i, catcher in enumerate(catchers):
            self.meta_layers[i] = catcher
        self.batches = []
        # each layer's arguments, the same objects for layers of one type: kept once per variant
        self.layer_kwargs: list[list[dict]] = []  # [variant][batch]
        self.kwargs_variant: list[int] = [0] * len(layers)
        try:
            for start in range(0, token_ids.shape[0], self.job.batch_size):
                ids = token_ids[start : start + self.job.batch_size]
                try:
                    with torch.no_grad():
                        model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
                hidden = catchers[0].captured[0].detach().to(getattr(torch, self.job.hidden_dtype))
                variants: dict[tuple, int] = {}
                for i, catcher in enumerate(catchers):
                    kwargs = {k: v for k, v in catcher.captured[1].items() if k not in ("past_key_values", "cache")}
                    key = tuple((k, id(v)) for k, v in sorted(kwargs.items()))
                    if key not in variants:
                        variants[key] = len(variants)
                        if len(self.layer_kwargs) < len(variants):
                            self.layer_kwargs.append([])
                        self.layer_kwargs[variants[key]].append(to_device(kwargs, self.device))
                    self.kwargs_variant[i] = variants[key]
                self.batches.append((hidden.to(self.device), self.layer_kwargs[0][-1]))
        finally:
            for i, layer in enumerate(layers):
                self.meta_layers[i] = layer
            embed.to("meta")
        return sum(h.shape[0] for h, _ in self.batches)

    # -- the per-block step --------------------------------------------------------

    def process_block(self, b: int, replay: dict | None = None) -> dict:
        """Statistics, reduction, solves, store writes and propagation for block ``b``.

        ``replay`` (a finished block's record) skips the solves: the stored results are
        read back and the samples advanced through them, as on resume.
        """
        timings: dict[str, float] = {}
        t = time.perf_counter()
        prefix = f"{self.layers_path}.{b}."
        if len(self.layer_kwargs) > 1:  # this layer's mask and rotary tables (its layer type)
            own = self.layer_kwargs[self.kwargs_variant[b]]
            self.batches = [(h, own[i]) for i, (h, _) in enumerate(self.batches)]
        tensors = self.reader.load_block(b)
        digests = self.reader.take_block_digests(b) if hasattr(self.reader, "take_block_digests") else None
        data = {"tensor_sha256": digests} if digests else {}  # the block's bytes, for the record
        if b + 1 < len(self.meta_layers) and hasattr(self.reader, "prefetch_block"):
            self.reader.prefetch_block(b + 1)  # read the next block while this one is processed
        layer = build_block(self.meta_layers[b], {k[len(prefix) :]: v for k, v in tensors.items()}, torch.float32)
        layer = layer.to(self.device)
        linears = block_linears(layer)
        timings["load"] = time.perf_counter() - t

        if replay is None and self.overlaps():
            return {**self._forward_and_queue(b, layer, timings), **data}
        outputs: list[dict] = []
        if replay is not None:
            t = time.perf_counter()
            quantized, floats = self._read_results(b, replay)
            self.propagate(layer, quantized, floats, None, quantized_weights=self.job.propagate == "quantized")
            timings["forward"] = time.perf_counter() - t
        elif self.one_float_stage():  # the statistics pass is the forward
            t = time.perf_counter()
            statistics = self._one_stage_statistics(layer)
            timings["stats"] = time.perf_counter() - t
            outputs = self._solve_block(b, layer, linears, timings, statistics=statistics).outputs
            timings["forward"] = 0.0
        else:  # the plan ends with the forward through the solved block
            outputs = self._solve_block(b, layer, linears, timings, propagate=True).outputs
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        out = {"block": b, "rank": self.rank, "results": outputs, "timings": timings, "peak_rss_mib": peak_rss_mib}
        out.update(data)
        if self.device.type == "cuda":
            out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._solver is not None:  # a replay after queued solves (resume with gaps): report what finished
            out["finished"] = self._take_finished()
        self._uploads.wait()  # this block's results are stored before its entries leave
        return out

    def advance(self, b: int, tensors: dict[str, torch.Tensor]) -> None:
        """The samples through block ``b`` built from ``tensors`` (names inside the block), in fp32:
        the forward a replay does, for any weights (evaluation streams models block by block)."""
        self._advance(build_block(self.meta_layers[b], tensors, torch.float32).to(self.device))

    def propagate(
        self,
        layer: nn.Module,
        quantized: dict[str, torch.Tensor],
        floats: dict[str, torch.Tensor],
        passes: StagePasses | None,
        quantized_weights: bool,
    ) -> None:
        """The hidden states through the solved block: with ``quantized_weights`` its quantized
        weights and AWQ's folded norms / biases set into ``layer`` first, else the float block."""
        if quantized_weights:
            linears = block_linears(layer)
            for name, weight in quantized.items():
                linears[name].weight.data = weight
            for name, tensor in floats.items():  # AWQ's folded norms / biases go with the quantized weights
                layer.get_parameter(name).data = tensor
        self._advance(layer, passes)

    def _advance(self, layer: nn.Module, passes: StagePasses | None = None) -> None:
        """The hidden states through ``layer`` (in fp32), kept in ``job.hidden_dtype``; with
        ``passes`` (the block's statistics passes, every weight final) from what they kept."""
        dtype = getattr(torch, self.job.hidden_dtype)
        out = []
        for i, (hidden, kwargs) in enumerate(self.batches):
            y = (
                run_block(layer, hidden.float(), kwargs)
                if passes is None
                else passes.forward(i, hidden.float(), kwargs)
            )
            out.append((y.to(dtype), kwargs))
        self.batches = out

    # -- propagate float: solves queued behind the forward --------------------------

    _solver: SolverQueue | None = None

    def one_float_stage(self) -> bool:
        """Whether each block's statistics come from one pass over the float block, which is then
        also its forward: ``propagate: float`` without true-sequential stages, a Hessian method
        (GPTQ solvers, or outlier detection), no AWQ fold and no mixed-precision probe."""
        job = self.job
        return (
            job.propagate == "float"
            and not job.true_sequential
            and not job.sensitivity_bits
            and job.method not in AWQ_METHODS
            and (job.method in HESSIAN_METHODS or job.skip_outliers)
        )

    def overlaps(self) -> bool:
        """Whether this run's solves queue behind the forward pass: ``propagate: float`` (the
        next block's inputs do not wait for the solves) with ``overlap_depth`` > 0, except AWQ,
        whose folded floats and scale search stay on the synchronous path. The results are
        the same either way."""
        return job_overlaps(self.job)

    def deferred(self) -> bool:
        """Whether queued solves run on the forward's own thread (:class:`DeferredSolves`)
        rather than on a solver thread: ``overlap_mode: deferred``, or ``auto`` for one float
        stage on a CPU, where a solver thread would share the worker's core and cost more in
        switching than it overlaps (a GPU's thread overlaps launches with kernels)."""
        mode = self.job.overlap_mode
        return mode == "deferred" or (mode == "auto" and self.device.type == "cpu" and self.one_float_stage())

    def _forward_and_queue(self, b: int, layer: nn.Module, timings: dict) -> dict:
        """propagate float: advance the hidden states through the float block now and queue the
        block's statistics, reductions and solves (a copy of the block and its inputs) on the
        solver thread; with one float stage (:meth:`one_float_stage`) the statistics pass is the
        forward, and the block with its Gram sums is queued instead. The collectives of the
        queued blocks run on that thread only, in block order on every worker, so ranks meet
        in the same order. Returns at once unless
        ``job.overlap_depth`` blocks are already queued; ``finished`` lists the blocks whose
        solves this worker has stored since the last call (their record entries)."""
        solver = self._solver_queue()
        solver.check()
        if self.one_float_stage():
            # the statistics pass is the forward: the next inputs are its outputs, and the solver
            # thread gets the block (no longer used here) and its sums, not a copy of the inputs
            t = time.perf_counter()
            work = self._one_stage_statistics(layer)
            timings["stats"] = time.perf_counter() - t
            timings["forward"] = 0.0
            solve_layer = layer
            if isinstance(solver, DeferredSolves):  # the sums travel while later blocks run
                t = time.perf_counter()
                self._issue_reductions(b, layer, work, solver.load)
                timings["reduce"] = time.perf_counter() - t
        else:
            # the solver's own copy: its hooks and staged weights never meet the forward
            solve_layer = copy.deepcopy(layer)
            work = self.batches
            t = time.perf_counter()
            self._advance(layer)
            timings["forward"] = time.perf_counter() - t
        t = time.perf_counter()
        solver.put(b, solve_layer, work, self.job.overlap_depth)
        if isinstance(solver, SolverQueue):  # deferred: put ran older solves, timed in their reports
            timings["queue_wait"] = time.perf_counter() - t
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "block": b,
            "rank": self.rank,
            "results": [],
            "timings": timings,
            "peak_rss_mib": peak_rss_mib,
            "queued": True,
            "finished": self._take_finished(),
        }

    def _solver_queue(self) -> SolverQueue | DeferredSolves:
        if self._solver is None:
            queue = DeferredSolves if self.deferred() else SolverQueue
            self._solver = queue(self._solve_queued, self.world)
        return self._solver

    def _all_rows(self, rows_here: int) -> int:
        """The calibration rows of all workers: every linear sees every token, in every block,
        so they are summed once (a collective at the first block's reductions), then kept."""
        if self._total_rows is None:
            total = torch.tensor([rows_here], dtype=torch.int64, device=self.device)
            if self.group_ready:
                dist.all_reduce(total)
            self._total_rows = int(total)
        return self._total_rows

    def _issue_reductions(self, b: int, layer: nn.Module, statistics: _Statistics, load: list[float]) -> None:
        """Plan a one-stage block's solves (whole groups, balanced against ``load``) and start its
        reductions without waiting for them (each owner's first group first)."""
        linears = block_linears(layer)
        statistics.plans = self._plan(b, statistics.groups, [statistics.groups], linears, "gptq", load, level=False)
        self._all_rows(statistics.rows())  # the first block's collective, in the order every worker issues
        statistics.pending = self.start_reductions(statistics.groups, statistics.sums, statistics.plans)

    def start_reductions(
        self, stage: list[list[str]], sums: dict[str, HessianAccumulator], plans: dict[tuple, GroupPlan]
    ) -> dict[tuple, dist.Work]:
        """A stage's Gram sums on their way, all issued at once (``async_op``), each owner's first
        group first, so an owner solves its first group while the sums of its later groups are
        still travelling: all-reduced for split groups (every worker solves a share), reduced to
        the owner otherwise."""
        pending: dict[tuple, dist.Work] = {}
        if not self.group_ready:
            return pending
        for names in reduce_order(stage, {key: p.owner for key, p in plans.items()}):
            key, total = tuple(names), sums[names[0]].sum
            if plans[key].split:
                pending[key] = dist.all_reduce(total, async_op=True)
            else:
                pending[key] = dist.reduce(total, dst=plans[key].owner, async_op=True)
        return pending

    def _plan(
        self,
        b: int,
        groups: list[list[str]],
        stages: list[list[list[str]]],
        linears: dict[str, nn.Linear],
        solver: str,
        load: list[float] | None,
        level: bool,
    ) -> dict[tuple, GroupPlan]:
        """Each group's owner, and the row shares of the groups split across workers
        (:func:`plan_solves`; true-sequential stages hold one group each)."""
        shapes = [(linears[g[0]].in_features, sum(linears[n].out_features for n in g)) for g in groups]
        splittable = [solver == "gptq" and self._splits(b, g, linears) for g in groups]
        plans = plan_solves(shapes, self.world, splittable, load, level=level, stage_per_group=len(stages) > 1)
        return {tuple(g): p for g, p in zip(groups, plans)}

    def _one_stage_statistics(self, layer: nn.Module) -> _Statistics:
        """One pass of this worker's samples through the float block: the Gram sums of every
        shared-input group, and the outputs, which become the hidden states."""
        linears = block_linears(layer)
        groups = self._shared_input_groups(layer, linears, self.batches[0])
        outputs: list[torch.Tensor] = []
        sums = collect_hessians(
            layer,
            self.batches,
            [g[0] for g in groups],
            getattr(torch, self.job.hessian_dtype),
            outputs=outputs,
            output_dtype=getattr(torch, self.job.hidden_dtype),
        )
        self.batches = [(y, kwargs) for y, (_, kwargs) in zip(outputs, self.batches, strict=True)]
        return _Statistics(groups, sums)

    def _solve_queued(self, b: int, layer: nn.Module, work, load: list[float]) -> dict:
        torch.set_num_threads(max(1, self.job.threads))
        timings: dict[str, float] = {}
        if isinstance(work, _Statistics):  # gathered by the forward thread (its "stats" timing)
            outputs = self._solve_block(b, layer, block_linears(layer), timings, load=load, statistics=work).outputs
            del timings["stats"]
        else:
            outputs = self._solve_block(b, layer, block_linears(layer), timings, batches=work, load=load).outputs
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"block": b, "rank": self.rank, "results": outputs, "timings": timings, "peak_rss_mib": peak_rss_mib}

    def _take_finished(self) -> list[dict]:
        """Reports of the queued solves finished since the last call, their results stored."""
        finished = [] if self._solver is None else self._solver.take()
        self._uploads.wait()  # after the take: the writes of every report taken were handed over before it
        return finished

    def drain(self) -> list[dict]:
        """Wait until every queued solve is stored; the finished blocks not reported yet.
        A failure of the solver thread is raised here (or by the next ``process_block``)."""
        if self._solver is None:
            return []
        self._solver.wait_empty()
        return self._take_finished()

    def _solve_block(
        self,
        b: int,
        layer: nn.Module,
        linears: dict[str, nn.Linear],
        timings: dict,
        batches: list[tuple[torch.Tensor, dict]] | None = None,
        load: list[float] | None = None,
        statistics: _Statistics | None = None,
        propagate: bool = False,
    ) -> BlockState:
        """Solve every linear of the block by its plan of steps (:mod:`workers.steps`).

        ``batches`` are the block's inputs (default: this worker's current hidden states);
        ``statistics`` (one float stage) are the block's sums, gathered by the pass that was also
        its forward (:meth:`_one_stage_statistics`); ``load`` is the solve work each worker already
        has queued (the owners of this block's groups are balanced against it, and it is updated;
        see :func:`workers.schedule.assign_owners`); ``propagate``: the hidden states go through
        the solved block last (inline solves).

        Linears that read the same input form a group with one Hessian. With true_sequential
        each group is a stage: its statistics come from inputs that already pass through the
        quantized groups before it (q/k/v → o → gate/up → down). Otherwise one stage holds all
        groups and the statistics come from one pass. AWQ methods first search and fold the
        scales of every group on the float block (``FoldScales``), then quantize the folded block.

        Returns the block's state after its steps: ``quantized`` ({linear: dequantized weight}),
        ``outputs`` (the record entries this worker wrote), ``floats`` (AWQ's folded tensors).
        """
        job = self.job
        batches = [] if statistics is not None else self.batches if batches is None else batches
        for phase in ("stats", "reduce", "solve", "broadcast"):
            timings.setdefault(phase, 0.0)  # a caller may have timed its statistics pass
        # "gptq": per-stage Hessians are collected (GPTQ solvers, and outlier detection for any method)
        # (and for a mixed-precision probe, whose sensitivities are Hessian-weighted errors)
        probe = bool(job.sensitivity_bits)
        solver = "gptq" if job.method in HESSIAN_METHODS or job.skip_outliers or probe else "rtn"
        uses_gram = job.method in GRAM_METHODS or job.skip_outliers or probe
        if statistics is not None:
            groups, stages = statistics.groups, [statistics.groups]
        elif uses_gram:
            t = time.perf_counter()
            groups = self._shared_input_groups(layer, linears, batches[0])
            timings["stats"] += time.perf_counter() - t
            stages = [[g] for g in groups] if job.true_sequential and solver == "gptq" else [groups]
        else:
            groups = [[name] for name in linears]
            stages = [groups]
        # the shares of a split group meet only at its owner, unless every worker needs the
        # solved weights: for the next stage (true-sequential) or for propagation (quantized)
        to_owner = job.propagate == "float" and len(stages) == 1
        if statistics is not None and statistics.plans is not None:  # deferred: planned at issue
            plans = statistics.plans
        else:
            plans = self._plan(b, groups, stages, linears, solver, load, level=to_owner)
        rows_here = statistics.rows() if statistics is not None else sum(h.shape[0] * h.shape[1] for h, _ in batches)
        total_rows = self._all_rows(rows_here) if uses_gram else 0  # no sums to scale without
        state = BlockState(b, layer, linears, batches, timings, stages, plans, total_rows, solver)
        state.unfolded = {name: p.data for name, p in layer.named_parameters()}
        state.originals = {n: m.weight.data for n, m in linears.items()}
        if statistics is not None:
            state.sums, state.pending = statistics.sums, dict(statistics.pending or {})
        steps = plan_block(
            stages,
            solver,
            probe=probe,
            awq=job.method in AWQ_METHODS,
            cache_stages=self._stage_layout(layer, stages, solver),
            have_sums=statistics is not None,
            reductions_issued=statistics is not None and statistics.pending is not None,
            to_owner=to_owner,
            propagate_quantized=job.propagate == "quantized",
            sequential=job.true_sequential,
            propagate=propagate,
        )
        return run_plan(self, state, steps)

    def _stage_layout(self, layer: nn.Module, stages: list, solver: str) -> StageLayout | None:
        """The true-sequential stage passes' layout (:func:`stage_layout`), when the job keeps them."""
        job = self.job
        if not (job.stage_cache and solver == "gptq" and job.true_sequential and len(stages) > 1):
            return None
        return stage_layout(self._trace(layer, block_linears(layer), self.batches[0]), stages)

    def collect(self, layer, batches, leaders, stop_early=False, passes=None) -> dict[str, HessianAccumulator]:
        """:func:`collect_hessians` in the job's Hessian dtype."""
        return collect_hessians(layer, batches, leaders, getattr(torch, self.job.hessian_dtype), stop_early, passes)

    def collect_with_means(self, layer: nn.Module, leaders: list[str], abs_means: bool) -> tuple[dict, dict]:
        """Σ xᵀx (and Σ|x|) of the leaders' inputs over this worker's samples, the forward stopping
        once they have all seen theirs (AWQ's search)."""
        dtype = getattr(torch, self.job.hessian_dtype)
        return _collect_stats(layer, self.batches, leaders, dtype, stop_early=True, abs_means=abs_means)

    def score_rows_of(self, layer: nn.Module, names: list[str]) -> list[tuple[int, int]]:
        """The rows of a stacked group that feed the attention scores Q·Kᵀ (from the block's
        trace): AWQ's clip search leaves them unclipped, since their error reaches the output
        through the Q·Kᵀ product, which the search's own-output error does not measure. Found
        per output row, not per linear: a fused qkv_proj (Phi-3) keeps its q and k rows whole
        and has its v rows clipped, as separate q/k/v projections would."""
        linears = block_linears(layer)
        trace = self._trace(layer, linears, self.batches[0])
        return trace.score_rows_of(names, {n: linears[n].out_features for n in names})

    def _structure_key(self, layer: nn.Module, linears: dict[str, nn.Linear]) -> tuple:
        return (
            type(layer).__module__,
            type(layer).__qualname__,
            tuple((n, m.in_features, m.out_features) for n, m in linears.items()),
        )

    def _trace(self, layer: nn.Module, linears: dict[str, nn.Linear], batch: tuple) -> BlockTrace:
        """:func:`trace_block` of the block, found once per block structure (its class and its
        linears' names and shapes): the structure follows from the block's code, and finding
        it costs a forward of one batch, which would not shrink as workers are added."""
        key = self._structure_key(layer, linears)
        if key not in self._traces:
            trace = trace_block(layer, batch[0].float(), batch[1])
            if trace.unreached:
                raise ValueError(f"one batch through the block never reaches {', '.join(trace.unreached)}")
            self._traces[key] = trace
        return self._traces[key]

    def _shared_input_groups(self, layer: nn.Module, linears: dict[str, nn.Linear], batch: tuple) -> list[list[str]]:
        """The block's shared-input groups in execution order (:meth:`_trace`)."""
        return [list(g) for g in self._trace(layer, linears, batch).groups]

    def scale_relations(self, layer: nn.Module, batch: tuple) -> tuple[list[ScaleGroup], dict[tuple[str, ...], str]]:
        """AWQ's relations of the float block: the plan's (found on a probe of the layer's
        code, pipeline.run.check_block_structure, which says once what has none), else
        :func:`find_scale_groups` on this block. A group without one is recorded in its
        results (``awq_unfolded``)."""
        linears = block_linears(layer)
        key = self._structure_key(layer, linears)
        if key not in self._relations:
            job = self.job
            if job.awq_relations is not None:
                relations = [ScaleGroup.from_dict(d) for d in job.awq_relations]
                unfolded = {tuple(k.split("/")): why for k, why in job.awq_unfolded.items()}
            else:
                trace = self._trace(layer, linears, batch)
                relations, unfolded = find_scale_groups(layer, trace, batch[0].float(), batch[1])
            self._relations[key] = (relations, unfolded)
        return self._relations[key]

    def _splits(self, b: int, names: list[str], linears: dict[str, nn.Linear]) -> bool:
        """Whether a group's GPTQ solve may be split by output rows across the workers: plain GPTQ,
        one grid for the whole group, no 16-bit linear in it. Decided from the job alone, so
        every worker decides alike. GPTQ treats rows independently (one H, per-row error
        feedback), and the solver's per-row arithmetic does not depend on the other rows, so
        the stacked shares equal the one-worker result bit for bit."""
        job = self.job
        if not job.split_solves or self.world == 1 or job.method != "gptq" or job.skip_outliers:
            return False
        full = [f"{self.layers_path}.{b}.{n}" for n in names]
        if sum(linears[n].out_features for n in names) < self.world:
            return False
        if any(matches_module(f, job.modules_to_not_convert) for f in full):
            return False
        return len({job.spec_for(f) for f in full}) == 1

    def store_float(self, b: int, name: str, tensor: torch.Tensor, group) -> dict:
        full_name = f"{self.layers_path}.{b}.{name}"
        data = float_to_bytes(full_name, tensor, {"method": self.job.method, "folded_from": group.linears})
        key = f"{self.job.run_prefix}/blocks/{b:05d}/{full_name}.float.safetensors"
        digest = self._uploads.put(key, data)
        return {
            "name": full_name,
            "key": key,
            "sha256": digest,
            "bytes": len(data),
            "shape": list(tensor.shape),
            "dtype": "float32",
        }

    def group_parts(
        self, b: int, names: list[str], linears: dict[str, nn.Linear], gram: torch.Tensor | None
    ) -> list[Part]:
        """Each linear of a group with its grid (``job.spec_for``) and whether it stays 16-bit:
        named in ``modules_to_not_convert``, or (``skip_outliers``) the group's input has outlier
        channels in its Hessian — then every linear reading that input is kept."""
        job = self.job
        outliers = job.skip_outliers and outlier_group(gram, job.outlier_sigma)
        parts = []
        for n in names:
            full_name = f"{self.layers_path}.{b}.{n}"
            keep = None
            if matches_module(full_name, job.modules_to_not_convert):
                keep = "modules_to_not_convert"
            elif outliers:
                keep = "outliers"
            parts.append(Part(n, linears[n].out_features, job.spec_for(full_name), keep))
        return parts

    def store_result(self, b, name, result, weight, dequant, hessian, output_error: float | None = None) -> dict:
        full_name = f"{self.layers_path}.{b}.{name}"
        data = result_to_bytes(result)
        key = f"{self.job.run_prefix}/blocks/{b:05d}/{full_name}.safetensors"
        digest = self._uploads.put(key, data)  # written while the worker goes on; waited for before any record
        info = {
            "name": full_name,
            "key": key,
            "sha256": digest,
            "bytes": len(data),
            "shape": list(result.shape),
            **_grid_fields(result),
            "weight_rel_error": float((weight - dequant).pow(2).sum() / weight.pow(2).sum().clamp(min=1e-30)),
        }
        params = getattr(result, "params", {})
        if "damp_used" in params:  # GPTQ: the damping the Cholesky needed, and the inputs it zeroed (H[k, k] = 0)
            info["damp"] = float(params["damp"])
            info["damp_used"] = float(params["damp_used"])
            info["dead_inputs"] = int(params.get("dead_inputs", 0))
        if output_error is not None:  # summed from the workers' shares (split solves)
            info["output_rel_error"] = output_error
        elif hessian is not None:
            info["output_rel_error"] = relative_output_error(weight, dequant, hessian)
        return info

    def results_of(self, b: int, record: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A finished block's dequantized weights and folded floats (names inside the block), as a replay reads them."""
        return self._read_results(b, record)

    def store_activations(self, b: int, name: str, gram: torch.Tensor, tokens: int) -> dict:
        """The linear's input statistics for an importance matrix: in_sum2[k] = Σ_t x_tk² over the
        run's calibration tokens (all workers'), = diag(H)·n/2 for H = 2·XᵀX/n; float32 [K]."""
        full_name = f"{self.layers_path}.{b}.{name}"
        in_sum2 = torch.diagonal(gram).double() * (tokens / 2.0)
        data = float_to_bytes(f"{full_name}.in_sum2", in_sum2.float(), {"tokens": int(tokens)})
        key = f"{self.job.run_prefix}/blocks/{b:05d}/{full_name}.activations.safetensors"
        digest = self._uploads.put(key, data)
        return {"key": key, "sha256": digest, "tokens": int(tokens), "in_features": int(gram.shape[0])}

    def _read_results(self, b: int, record: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Dequantized weights and folded float tensors of a finished block, hash-checked."""
        prefix = f"{self.layers_path}.{b}."
        weights, floats = {}, {}
        for entry in record["results"]:
            data = self.store.get_bytes(entry["key"])
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError(f"stored result {entry['key']} does not match its record")
            weights[entry["name"][len(prefix) :]] = result_from_bytes(data).dequantize().to(self.device)
            for f in entry.get("float_results", []):
                data = self.store.get_bytes(f["key"])
                if hashlib.sha256(data).hexdigest() != f["sha256"]:
                    raise ValueError(f"stored float result {f['key']} does not match its record")
                floats[f["name"][len(prefix) :]] = load_safetensors(data)[f["name"]].to(self.device)
        return weights, floats

    def store_sees(self, key: str, nonce: str) -> bool:
        """Whether this worker reads ``nonce`` in the store's JSON object ``key`` (the driver's
        probe that the store is the same one from every node)."""
        try:
            return self.store.get_json(key).get("nonce") == nonce
        except Exception:  # missing, unreadable or not JSON here: not the driver's store
            return False

    def shutdown(self) -> None:
        self._uploads.close()
        if self.group_ready:
            dist.destroy_process_group()
            self.group_ready = False


def collect_hessians(
    layer: nn.Module,
    batches: list[tuple[torch.Tensor, dict]],
    leaders: list[str],
    dtype: torch.dtype,
    stop_early: bool = False,
    passes: StagePasses | None = None,
    outputs: list[torch.Tensor] | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> dict[str, HessianAccumulator]:
    """Σ xᵀx of the inputs of the named linears over all batches.

    With ``stop_early`` the forward of a batch stops as soon as every named linear has seen
    its input, so a stage early in the block costs only the part of the block before it;
    with ``passes`` a stage's pass starts from what the previous stage's pass kept.
    ``outputs`` (a list, full passes only) receives each batch's block output in ``output_dtype``.
    """
    return _collect_stats(
        layer, batches, leaders, dtype, stop_early, passes=passes, outputs=outputs, output_dtype=output_dtype
    )[0]


def _collect_stats(
    layer: nn.Module,
    batches: list[tuple[torch.Tensor, dict]],
    leaders: list[str],
    dtype: torch.dtype,
    stop_early: bool = False,
    abs_means: bool = False,
    passes: StagePasses | None = None,
    outputs: list[torch.Tensor] | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, HessianAccumulator], dict[str, AbsMeanAccumulator]]:
    """Σ xᵀx (and with ``abs_means`` Σ|x| per channel) of the named linears' inputs."""
    if outputs is not None and (stop_early or passes is not None):
        raise ValueError("block outputs are kept only by full passes")
    linears = block_linears(layer)
    # sums live where the block runs (a GPU worker reduces them there)
    dev = {name: linears[name].weight.device for name in leaders}
    accs = {name: HessianAccumulator(linears[name].in_features, dev[name], dtype) for name in leaders}
    means = {name: AbsMeanAccumulator(linears[name].in_features, dev[name]) for name in leaders} if abs_means else {}
    seen: set[str] = set()

    def hook(name):
        def fn(_module, args):
            accs[name].add(args[0])
            if abs_means:
                means[name].add(args[0])
            seen.add(name)
            if stop_early and len(seen) == len(leaders):
                raise _StopForward

        return fn

    if not batches:
        raise ValueError("this worker holds no calibration samples")
    hooks = [linears[name].register_forward_pre_hook(hook(name)) for name in leaders]
    try:
        for i, (hidden, kwargs) in enumerate(batches):
            seen.clear()
            try:
                if passes is None:
                    y = run_block(layer, hidden.float(), kwargs)  # hidden states may be kept in fp16/bf16
                    if outputs is not None:
                        outputs.append(y.to(output_dtype))
                else:
                    passes.run(i, hidden.float(), kwargs, leaders)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return accs, means
