"""The worker: owns a shard of the calibration samples and walks the model block by block.

This class holds no Ray code: pipeline/ wraps it as a Ray actor and hands it a
checkpoint reader and a store (objects with ``load_block(b)`` and ``put_bytes`` /
``get_bytes``). Workers of one run form a torch.distributed group to reduce each
linear's statistics to the worker that owns (solves) it.
"""

from __future__ import annotations

import copy
import datetime
import resource
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from strata_quant.workers.awq import ScaleGroup, find_scale_groups
from strata_quant.workers.block import (
    BlockTrace,
    StageLayout,
    StagePasses,
    block_linears,
    build_block,
    decoder_layers,
    run_block,
    stage_layout,
    trace_block,
)
from strata_quant.workers.capture import capture_inputs, input_embedding_name
from strata_quant.workers.job import AWQ_METHODS, GRAM_METHODS, WorkerJob, job_overlaps, one_float_stage
from strata_quant.workers.methods import HESSIAN_METHODS, Part, matches_module, outlier_group
from strata_quant.workers.moe import fuse_experts, moe_modules
from strata_quant.workers.queues import DeferredSolves, SolverQueue, Uploads
from strata_quant.workers.records import ResultWriter, read_block_results, read_statistics
from strata_quant.workers.schedule import GroupPlan, plan_solves, reduce_order
from strata_quant.workers.stats import HessianAccumulator, collect_hessians, collect_stats
from strata_quant.workers.steps import BlockState, plan_block, run_plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


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
        config_dict = dict(job.model_config)
        model_type = config_dict.pop("model_type")
        self.config = AutoConfig.for_model(model_type, **config_dict)
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.meta_model = AutoModelForCausalLM.from_config(self.config)
        self.layers_path, self.meta_layers = decoder_layers(self.meta_model)
        self._uploads = Uploads(store)
        self.writer = ResultWriter(self._uploads, job.run_prefix, self.layers_path, job.method)
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

    def device_memory(self) -> int | None:
        """Bytes free on this worker's GPU before any block is loaded (None on a CPU): what its statistics
        budget must fit in, since the statistics live on the block's device."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.mem_get_info(self.device)[0])

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
        if embedding is None:
            name = input_embedding_name(self.meta_model)
            embedding = self.reader.load([name])[name]
        job = self.job
        captured = capture_inputs(
            self.meta_model,
            self.layers_path,
            self.meta_layers,
            self.config,
            embedding,
            token_ids,
            job.batch_size,
            getattr(torch, job.hidden_dtype),
            self.device,
        )
        self.batches, self.layer_kwargs = captured.batches, captured.layer_kwargs
        self.kwargs_variant = captured.kwargs_variant
        return sum(h.shape[0] for h, _ in self.batches)

    # -- the per-block step --------------------------------------------------------

    def process_block(self, b: int, replay: dict | None = None) -> dict:
        """Statistics, reduction, solves, store writes and propagation for block ``b``.

        ``replay`` (a finished block's record) skips the solves: the stored results are
        read back and the samples advanced through them, as on resume.
        """
        timings: dict[str, float] = {}
        t = time.perf_counter()
        if len(self.layer_kwargs) > 1:  # this layer's mask and rotary tables (its layer type)
            own = self.layer_kwargs[self.kwargs_variant[b]]
            self.batches = [(h, own[i]) for i, (h, _) in enumerate(self.batches)]
        tensors = self.reader.load_block(b)
        digests = self.reader.take_block_digests(b) if hasattr(self.reader, "take_block_digests") else None
        data = {"tensor_sha256": digests} if digests else {}  # the block's bytes, for the record
        if b + 1 < len(self.meta_layers) and hasattr(self.reader, "prefetch_block"):
            self.reader.prefetch_block(b + 1)  # read the next block while this one is processed
        prefix = f"{self.layers_path}.{b}."
        inside = self._model_tensors(b, {k[len(prefix) :]: v for k, v in tensors.items()})
        layer = build_block(self.meta_layers[b], inside, torch.float32)
        layer = layer.to(self.device)
        linears = block_linears(layer)
        timings["load"] = time.perf_counter() - t

        if replay is None and self.overlaps():
            return {**self._forward_and_queue(b, layer, timings), **data}
        outputs: list[dict] = []
        if self.job.kept_statistics is not None:  # no samples: a finished block needs nothing more
            if replay is None:
                outputs = self._solve_kept(b, layer, linears, timings).outputs
        elif replay is not None:
            t = time.perf_counter()
            quantized, floats = self.results_of(b, replay)
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

    def _model_tensors(self, b: int, inside: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Block ``b``'s checkpoint tensors (names inside the block) under the model's names: a MoE block's
        renamed as the family renames them and its per-expert tensors placed into its fused parameters
        (:func:`workers.moe.fuse_experts`); other blocks' as they are."""
        if b not in self.job.moe_blocks:
            return inside
        inside = {self.job.moe_renames.get(k, k): v for k, v in inside.items()}
        shapes = {n: tuple(p.shape) for n, p in self.meta_layers[b].named_parameters()}
        return fuse_experts(inside, self._expert_sources(), shapes)

    def _expert_sources(self) -> dict[str, tuple[str, int, int, int]]:
        return {k: tuple(v) for k, v in self.job.expert_sources.items()}

    def advance(self, b: int, tensors: dict[str, torch.Tensor]) -> None:
        """The samples through block ``b`` built from ``tensors`` (checkpoint names inside the block; a MoE
        block's fused experts may come under their own names), in fp32: the forward a replay does, for any
        weights (evaluation streams models block by block)."""
        self._advance(build_block(self.meta_layers[b], self._model_tensors(b, tensors), torch.float32).to(self.device))

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
        """:func:`workers.job.one_float_stage` of this worker's job."""
        return one_float_stage(self.job)

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
        probe = job.probes
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
            experts=tuple(moe_modules(layer)) if b in job.moe_blocks else (),
        )
        return run_plan(self, state, steps)

    def _solve_kept(self, b: int, layer: nn.Module, linears: dict[str, nn.Linear], timings: dict) -> BlockState:
        """Solve the block from another run's kept statistics (``job.kept_statistics``): its groups
        and true-sequential stages as that run recorded them, each group's H read by its solvers,
        no forward. With that run's solver settings the results are that run's, byte for byte."""
        entries = self.job.kept_statistics[b]
        stages = [
            [list(e["group"]) for e in entries if e["stage"] == i] for i in range(1 + max(e["stage"] for e in entries))
        ]
        groups = [g for stage in stages for g in stage]
        for phase in ("stats", "reduce", "solve", "broadcast"):
            timings.setdefault(phase, 0.0)
        plans = self._plan(b, groups, stages, linears, "gptq", None, level=True)
        state = BlockState(b, layer, linears, [], timings, stages, plans, entries[0]["tokens"], "gptq")
        state.unfolded = {name: p.data for name, p in layer.named_parameters()}
        state.originals = {n: m.weight.data for n, m in linears.items()}
        steps = plan_block(
            stages,
            "gptq",
            probe=False,
            awq=False,
            cache_stages=None,
            have_sums=False,
            reductions_issued=False,
            to_owner=True,  # no worker but the owner needs the solved weights
            propagate_quantized=False,
            sequential=False,
            propagate=False,
            kept=True,
        )
        return run_plan(self, state, steps)

    def kept_hessian(self, b: int, leader: str) -> torch.Tensor:
        """The H another run kept for block ``b``'s group led by ``leader`` (checked against its sha256)."""
        entry = next(e for e in self.job.kept_statistics[b] if e["group"][0] == leader)
        return read_statistics(self.store, entry, f"{self.layers_path}.{b}.{leader}", self.device)

    def _stage_layout(self, layer: nn.Module, stages: list, solver: str) -> StageLayout | None:
        """The true-sequential stage passes' layout (:func:`stage_layout`), when the job keeps them."""
        job = self.job
        if job.moe_blocks or not (job.stage_cache and solver == "gptq" and job.true_sequential and len(stages) > 1):
            return None
        return stage_layout(self._trace(layer, block_linears(layer), self.batches[0]), stages)

    def collect(self, layer, batches, leaders, stop_early=False, passes=None) -> dict[str, HessianAccumulator]:
        """:func:`collect_hessians` in the job's Hessian dtype."""
        return collect_hessians(layer, batches, leaders, getattr(torch, self.job.hessian_dtype), stop_early, passes)

    def collect_with_means(self, layer: nn.Module, leaders: list[str], abs_means: bool) -> tuple[dict, dict]:
        """Σ xᵀx (and Σ|x|) of the leaders' inputs over this worker's samples, the forward stopping
        once they have all seen theirs (AWQ's search)."""
        dtype = getattr(torch, self.job.hessian_dtype)
        return collect_stats(layer, self.batches, leaders, dtype, stop_early=True, abs_means=abs_means)

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
        code, pipeline.structure.check_block_structure, which says once what has none), else
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
        if not job.split_solves or self.world == 1 or job.method != "gptq" or job.skip_outliers or job.ggml_types:
            return False
        full = [f"{self.layers_path}.{b}.{n}" for n in names]
        if sum(linears[n].out_features for n in names) < self.world:
            return False
        if any(matches_module(f, job.modules_to_not_convert) for f in full):
            return False
        return len({job.spec_for(f) for f in full}) == 1

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
            parts.append(Part(n, linears[n].out_features, job.spec_for(full_name), keep, job.ggml_types.get(full_name)))
        return parts

    def results_of(self, b: int, record: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A finished block's dequantized weights and folded floats (names inside the block), as a replay reads them."""
        weights, floats = read_block_results(self.store, f"{self.layers_path}.{b}.", record, self.device)
        if b in self.job.moe_blocks:  # the experts' results into the fused parameters the forward reads
            shapes = {n: tuple(p.shape) for n, p in self.meta_layers[b].named_parameters()}
            fused = fuse_experts(weights, self._expert_sources(), shapes, suffix="")
            linears = set(block_linears(self.meta_layers[b]))
            weights = {n: v for n, v in fused.items() if n in linears}
            floats.update({n: v for n, v in fused.items() if n not in linears})
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
