"""A block's work as a plan of explicit steps, and the functions that run them.

A worker solves a block by running its plan (:func:`plan_block`): a list of steps, each a small
frozen dataclass naming what it works on (a stage's index, its groups), run by
``STEP_RUNNERS[type(step)](worker, state, step)`` over one :class:`BlockState` (what the steps of a
block share: the layer, each group's solve plan, the Gram sums, the solved weights, the record
entries). The modes of a run are which steps the plan holds:

* true-sequential stages: ``CollectStats → Reduce → Solve → Gather → Distribute`` once per stage;
  one stage otherwise;
* deferred statistics (one float stage): the sums came with the block, so no ``CollectStats``, and
  no ``Reduce`` when their reductions were issued at the forward already;
* split solves: the groups whose :class:`~workers.schedule.GroupPlan` is ``split`` take the share
  path of ``Solve`` and ``Gather`` (``Gather.to_owner``: only the owner needs the stacked rows);
* AWQ: ``FoldScales`` first (search every group's scales on the float block, fold them all);
* the mixed-precision probe: ``Probe`` first (the residual scale and output Fisher of the block);
* propagation: ``Propagate`` last when the block's solves run inline (its forward follows them).
* kept statistics (a run solving from another run's stored Hessians): ``LoadStats`` in place of
  ``CollectStats → Reduce``, nothing distributed, no ``Propagate``: no forward at all.

* Mixture-of-Experts: ``SolveExperts`` per MoE module after the stages of the block's linears (the
  experts read what attention hands them): each expert's statistics from the tokens the model's own
  router sends it (:mod:`workers.moe`), reduced to the expert's owner (by modelled solve cost),
  solved and stored there under the checkpoint's per-expert names, in waves of at most
  ``quant.moe.max_expert_stats`` experts, and the quantized experts sent to every worker that
  propagates through them.

The worker supplies what needs its process state (the collective group, the store, the
calibration batches); this module holds no Ray and no store format of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from strata_quant.workers.awq import column_scales, fold_scales, scale_gram, search_scales
from strata_quant.workers.block import StageLayout, StagePasses
from strata_quant.workers.gptq import output_error_terms
from strata_quant.workers.methods import quantize_group, quantize_parts, result_kind
from strata_quant.workers.mixed import (
    BlockProbe,
    ggml_sensitivity,
    linear_sensitivity,
    output_fisher,
    residual_scale,
)
from strata_quant.workers.moe import (
    DOWN,
    GATE_UP,
    ROUTED,
    RTN,
    ExpertStatistics,
    MoeError,
    add_expert_statistics,
    expert_costs,
    expert_decisions,
    expert_waves,
    moe_inputs,
    num_experts,
    routing,
    token_counts,
)
from strata_quant.workers.result import QuantizedLinear
from strata_quant.workers.schedule import GroupPlan, assign_owners, round_cost, solve_cost
from strata_quant.workers.stats import HessianAccumulator

if TYPE_CHECKING:
    from strata_quant.workers.actor import BlockWorker


# ---------------------------------------------------------------- the steps


@dataclass(frozen=True)
class Probe:
    """Mixed precision: the scale of the residual stream the block writes (its output) and the output
    Fisher of every linear, summed over all workers (before any solve: the float block)."""


@dataclass(frozen=True)
class FoldScales:
    """AWQ: every group's scales searched on the float block, then all folded into it."""


@dataclass(frozen=True)
class CacheStages:
    """True-sequential passes that start from what the previous stage's pass kept (:class:`StagePasses`),
    standing in for the modules ``layout`` names."""

    layout: StageLayout


@dataclass(frozen=True)
class CollectStats:
    """This worker's Σ xᵀx of the inputs of the stage's groups (led by ``leaders``)."""

    stage: int
    leaders: tuple[str, ...]


@dataclass(frozen=True)
class LoadStats:
    """The stage's groups' H as another run kept them (``run.keep_statistics``), read from the store
    by the workers that solve them (the owner; every worker of a split group)."""

    stage: int


@dataclass(frozen=True)
class Reduce:
    """The stage's sums on their way to their solvers (asynchronous; ``Solve`` waits per group)."""

    stage: int


@dataclass(frozen=True)
class Solve:
    """The groups this worker owns solved whole and stored, and its share of every split group."""

    stage: int


@dataclass(frozen=True)
class Gather:
    """Split groups' shares stacked: at every worker, or (``to_owner``) only at the owner."""

    stage: int
    to_owner: bool


@dataclass(frozen=True)
class Distribute:
    """The stage's solved weights to every worker (``needed``: the next stage's statistics or the
    propagation read them), set into the block for the next stage when ``sequential``."""

    stage: int
    needed: bool
    sequential: bool


@dataclass(frozen=True)
class SolveExperts:
    """The experts of the MoE module ``moe`` (block-relative name): routed statistics, the min-tokens
    decision per expert, each expert solved by its owner; ``needed``: every worker gets the quantized
    experts for the forward."""

    moe: str
    needed: bool


@dataclass(frozen=True)
class Restore:
    """The block's parameters back to what came in (the caller decides what propagates)."""


@dataclass(frozen=True)
class Propagate:
    """The hidden states through the block: quantized weights (and AWQ's folded floats) with
    ``quantized``, else the float block."""

    quantized: bool


Step = (
    Probe
    | FoldScales
    | CacheStages
    | CollectStats
    | LoadStats
    | Reduce
    | Solve
    | Gather
    | Distribute
    | SolveExperts
    | Restore
    | Propagate
)


@dataclass
class BlockState:
    """What the steps of one block share. ``stages``: lists of shared-input groups; ``plans``:
    each group's owner and row shares; ``sums``: the current stage's Gram sums by leader."""

    b: int
    layer: nn.Module
    linears: dict[str, nn.Linear]
    batches: list
    timings: dict
    stages: list[list[list[str]]]
    plans: dict[tuple, GroupPlan]
    total_rows: int
    solver: str  # "gptq": per-stage Hessians are formed; "rtn": weights alone
    sums: dict[str, HessianAccumulator] = field(default_factory=dict)
    pending: dict = field(default_factory=dict)  # reductions in flight, by group
    unfolded: dict[str, torch.Tensor] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    floats: dict[str, torch.Tensor] = field(default_factory=dict)
    awq_groups: dict[str, dict] = field(default_factory=dict)
    scale: float | None = None  # the probe's ē (mixed precision), with what it measured of the float block
    probe: BlockProbe | None = None
    passes: StagePasses | None = None
    quantized: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: list[dict] = field(default_factory=list)
    # the current stage: solved weights here, split shares and their error terms, split groups' H
    solved: dict[str, torch.Tensor] = field(default_factory=dict)
    mine: dict[tuple, QuantizedLinear | None] = field(default_factory=dict)
    share_errors: dict[tuple, torch.Tensor] = field(default_factory=dict)
    grams: dict[tuple, torch.Tensor] = field(default_factory=dict)
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # H read back (LoadStats), by leader

    def owner(self, names) -> int:
        return self.plans[tuple(names)].owner

    def split(self, names) -> bool:
        return self.plans[tuple(names)].split


def plan_block(
    stages: list[list[list[str]]],
    solver: str,
    *,
    probe: bool,
    awq: bool,
    cache_stages: StageLayout | None,
    have_sums: bool,
    reductions_issued: bool,
    to_owner: bool,
    propagate_quantized: bool,
    sequential: bool,
    propagate: bool,
    experts: tuple[str, ...] = (),
    kept: bool = False,
) -> list[Step]:
    """The steps of one block, in order. ``have_sums``: the one stage's sums came with the block
    (and ``reductions_issued``: already on their way); ``propagate``: the solves run inline and
    the hidden states go through the block after them (``propagate_quantized``: through its
    quantized weights); ``experts``: the block's MoE modules, solved after its linears;
    ``kept``: every stage's H read from another run's kept statistics."""
    steps: list[Step] = []
    if probe:
        steps.append(Probe())
    if awq:
        steps.append(FoldScales())
    if cache_stages is not None:
        steps.append(CacheStages(cache_stages))
    for i, stage in enumerate(stages):
        if kept:
            steps.append(LoadStats(i))
        elif solver == "gptq":
            if not have_sums:
                steps.append(CollectStats(i, tuple(names[0] for names in stage)))
            if not reductions_issued:
                steps.append(Reduce(i))
        steps.append(Solve(i))
        steps.append(Gather(i, to_owner))
        # every worker needs the weights for the next stage's statistics (true-sequential) or
        # for propagation (quantized); propagate float's last stage needs them nowhere
        needed = propagate_quantized or (sequential and i < len(stages) - 1)
        steps.append(Distribute(i, needed, sequential))
    for moe in experts:
        steps.append(SolveExperts(moe, propagate_quantized))
    steps.append(Restore())
    if propagate:
        steps.append(Propagate(propagate_quantized))
    return steps


def run_plan(worker: BlockWorker, state: BlockState, steps: list[Step]) -> BlockState:
    """Each step's function in turn over the block's state; the state after the last."""
    for step in steps:
        STEP_RUNNERS[type(step)](worker, state, step)
    return state


# ---------------------------------------------------------------- the step functions


def run_probe(w: BlockWorker, s: BlockState, _step: Probe) -> None:
    # float block, before any solve; ē of its output, the stream its errors are written into
    s.probe = output_fisher(s.layer, s.batches, list(s.linears), seed=s.b)
    if w.group_ready:
        for sums in s.probe.tensors():
            dist.all_reduce(sums)
    s.scale = residual_scale(s.probe.energy)


def run_fold_scales(w: BlockWorker, s: BlockState, _step: FoldScales) -> None:
    owner_of = {key: p.owner for key, p in s.plans.items()}
    s.floats, s.awq_groups = awq_search_and_fold(w, s.b, s.layer, owner_of, s.total_rows, s.timings)
    s.originals = {n: m.weight.data for n, m in s.linears.items()}  # folded


def run_cache_stages(_w: BlockWorker, s: BlockState, step: CacheStages) -> None:
    s.passes = StagePasses(s.layer, len(s.batches), step.layout)


def run_collect_stats(w: BlockWorker, s: BlockState, step: CollectStats) -> None:
    t = time.perf_counter()
    job = w.job
    s.sums = w.collect(s.layer, s.batches, list(step.leaders), job.true_sequential, s.passes)
    s.timings["stats"] += time.perf_counter() - t


def run_load_stats(w: BlockWorker, s: BlockState, step: LoadStats) -> None:
    t = time.perf_counter()
    for names in s.stages[step.stage]:
        if s.split(names) or s.owner(names) == w.rank:
            s.kept[names[0]] = w.kept_hessian(s.b, names[0])
    s.timings["stats"] += time.perf_counter() - t


def _gram(s: BlockState, names: list[str]) -> torch.Tensor:
    """The group's H: kept by another run, or from the reduced sums of this one."""
    if names[0] in s.kept:
        return s.kept[names[0]]
    return s.sums[names[0]].hessian(total_count=s.total_rows)


def run_reduce(w: BlockWorker, s: BlockState, step: Reduce) -> None:
    t = time.perf_counter()
    s.pending.update(w.start_reductions(s.stages[step.stage], s.sums, s.plans))
    s.timings["reduce"] += time.perf_counter() - t


def _arrived(s: BlockState, key: tuple) -> float:
    """Wait for a group's reduced sums (if still in flight); the seconds waited."""
    if key not in s.pending:
        return 0.0
    t = time.perf_counter()
    s.pending.pop(key).wait()
    return time.perf_counter() - t


def run_solve(w: BlockWorker, s: BlockState, step: Solve) -> None:
    t = time.perf_counter()
    waited = 0.0
    s.solved, s.mine, s.share_errors, s.grams = {}, {}, {}, {}
    for names in s.stages[step.stage]:
        key = tuple(names)
        if s.split(names) or s.owner(names) == w.rank:
            waited += _arrived(s, key)
        if s.split(names):
            _solve_share(w, s, names)
        elif s.owner(names) == w.rank:
            _solve_whole(w, s, names, step.stage)
    for key in list(s.pending):  # the groups owned elsewhere: their sends are done
        waited += _arrived(s, key)
    s.timings["solve"] += time.perf_counter() - t - waited
    s.timings["reduce"] += waited


def _solve_share(w: BlockWorker, s: BlockState, names: list[str]) -> None:
    """This worker's rows of a split group: solved with the group's H, and their part of each
    linear's output error terms (summed over the shares by ``Gather``)."""
    job, key = w.job, tuple(names)
    weight = torch.cat([s.originals[n] for n in names], dim=0)
    start, end = s.plans[key].shares[w.rank]
    rows = [s.linears[n].out_features for n in names]
    if start == end:
        s.mine[key] = None
        s.share_errors[key] = torch.zeros(len(rows), 2, dtype=torch.float64, device=weight.device)
        return
    gram = s.grams[key] = _gram(s, names)
    spec = job.spec_for(f"{w.layers_path}.{s.b}.{names[0]}")
    own = quantize_group(job.method, weight[start:end], gram, spec, job.method_options())
    s.mine[key] = own
    s.share_errors[key] = share_output_errors(weight[start:end], own.dequantize(), gram, rows, start)


def _solve_whole(w: BlockWorker, s: BlockState, names: list[str], stage: int) -> None:
    """A group this worker owns: every linear solved (workers/methods.py) and stored."""
    job = w.job
    weight = torch.cat([s.originals[n] for n in names], dim=0)
    awq = s.awq_groups.get(names[0])
    gram = _gram(s, names) if s.solver == "gptq" else None
    hessian = awq["hessian"] if awq is not None and job.method == "awq" else gram
    parts = w.group_parts(s.b, names, s.linears, gram)
    options = job.method_options()
    if awq is not None:  # the rows that feed the attention scores keep their full range (clip ratio 1)
        options["awq_no_clip_rows"] = w.score_rows_of(s.layer, names)
    results = quantize_parts(job.method, weight, hessian, parts, options)
    for n, part in zip(names, results):
        if awq is not None and result_kind(part) == "int":
            part.method = job.method
            part.params.update(awq["params"])
        s.solved[n] = part.dequantize()
        entry = w.writer.result(s.b, n, part, s.originals[n], s.solved[n], hessian)
        if gram is not None:
            entry["activations"] = w.writer.activations(s.b, n, gram, s.total_rows)
            if job.keep_statistics and n == names[0]:
                entry["statistics"] = w.writer.statistics(s.b, names, stage, gram, s.total_rows)
        if awq is not None and n == names[0]:
            entry["float_results"] = awq["float_results"]
        if s.scale is not None and gram is not None:  # mixed precision: {bits: error} for strata plan
            entry["sensitivity"] = _sensitivity(w, s, n, gram, options)
        s.outputs.append(entry)


def _sensitivity(w: BlockWorker, s: BlockState, n: str, gram: torch.Tensor, options: dict) -> dict:
    job = w.job
    row_weight = s.probe.fisher[n][:-1] / s.probe.fisher[n][-1]
    measure = s.probe.rest_hessian(n).to(gram.dtype)
    out = linear_sensitivity(
        s.originals[n],
        gram,
        job.spec,
        job.sensitivity_bits,
        s.scale,
        method=job.method,
        options=options,
        row_weight=row_weight,
        measure=measure,
    )
    if job.sensitivity_types:  # keyed by type name, beside the widths' "3", "4" …
        out |= ggml_sensitivity(
            s.originals[n],
            gram,
            job.sensitivity_types,
            s.scale,
            method=job.method,
            options=options,
            row_weight=row_weight,
            measure=measure,
        )
    return out


def run_gather(w: BlockWorker, s: BlockState, step: Gather) -> None:
    t = time.perf_counter()
    for key, own in s.mine.items():  # split groups: the shares to every worker, or to the owner
        shares = s.plans[key].shares
        errors = s.share_errors[key]
        dist.all_reduce(errors)  # Σ over the shares of tr(E H Eᵀ) and tr(W H Wᵀ), per linear
        if step.to_owner:
            full = send_rows_to_owner(w.rank, own, shares, s.owner(key))
            if full is None:  # another worker stores it; nothing here needs the weights
                continue
        else:
            full = gather_rows(w.rank, own, shares)
        gram = s.grams[key]
        at = 0
        for i, n in enumerate(key):
            part = full.rows(at, at + s.linears[n].out_features)
            at += s.linears[n].out_features
            s.solved[n] = part.dequantize()
            if s.owner(key) == w.rank:
                error = float(errors[i, 0] / errors[i, 1].clamp(min=1e-30))
                entry = w.writer.result(s.b, n, part, s.originals[n], s.solved[n], gram, error)
                entry["activations"] = w.writer.activations(s.b, n, gram, s.total_rows)
                if w.job.keep_statistics and i == 0:
                    entry["statistics"] = w.writer.statistics(s.b, list(key), step.stage, gram, s.total_rows)
                entry["solve_shares"] = [list(share) for share in shares]  # rows of the stacked group
                if s.scale is not None:
                    entry["sensitivity"] = _sensitivity(w, s, n, gram, w.job.method_options())
                s.outputs.append(entry)
    s.timings["broadcast"] += time.perf_counter() - t


def run_distribute(w: BlockWorker, s: BlockState, step: Distribute) -> None:
    t = time.perf_counter()
    for names in s.stages[step.stage]:
        owner = s.owner(names)
        for n in names:
            if s.split(names):  # gathered already
                if step.needed:
                    s.quantized[n] = s.solved[n]
                    if step.sequential:
                        s.linears[n].weight.data = s.quantized[n]
                continue
            if owner == w.rank:
                s.quantized[n] = s.solved[n]
            elif step.needed:
                s.quantized[n] = torch.empty_like(s.originals[n])
            if step.needed and w.group_ready:
                dist.broadcast(s.quantized[n], src=owner)
            if step.needed and step.sequential:
                s.linears[n].weight.data = s.quantized[n]
    s.timings["broadcast"] += time.perf_counter() - t


def run_solve_experts(w: BlockWorker, s: BlockState, step: SolveExperts) -> None:
    """Routing and token counts of every expert (all-reduced), the min-tokens decisions, owners by
    modelled solve cost balanced against the block's other solves, then the experts in waves of at
    most ``job.moe_max_expert_stats``: each wave's routed statistics from the routing taken once,
    reduced to their owners, solved there and freed before the next wave (no worker holds more than
    a wave's statistics). The quantized experts go to every worker after the last wave."""
    t = time.perf_counter()
    moe = s.layer.get_submodule(step.moe)
    n = num_experts(moe.experts)
    inputs = moe_inputs(s.layer, step.moe, s.batches)
    routes = [routing(moe, x) for x in inputs]
    counts, tokens = _routed_counts(w, routes, n)
    if s.solver != "gptq":
        decisions = [RTN] * n
    else:
        try:
            decisions = expert_decisions(counts.cpu(), w.job.moe_min_tokens, w.job.moe_policy)
        except MoeError as err:
            raise MoeError(f"block {s.b} {step.moe}: {err}") from None
    s.timings["stats"] += time.perf_counter() - t
    hidden, intermediate = moe.experts.gate_up_proj.shape[2], moe.experts.down_proj.shape[2]
    owners = assign_owners(expert_costs(hidden, intermediate, decisions), w.world, _block_load(w, s))
    waves = expert_waves(owners, w.job.moe_max_expert_stats)
    solved: dict[tuple[str, int], QuantizedLinear] = {}
    for i, wave in enumerate(waves):
        t = time.perf_counter()
        stats = None
        if s.solver == "gptq":
            stats = ExpertStatistics.empty(moe.experts, [e for e in wave if decisions[e] != RTN])
            if stats.accumulators:  # a wave of rounded experts gathers nothing
                for x, r in zip(inputs, routes):
                    add_expert_statistics(moe, x, stats, decisions, route=r)
        stats_s = time.perf_counter() - t
        s.timings["stats"] += stats_s
        t = time.perf_counter()
        if stats is not None and w.group_ready:
            for (e, _which), acc in sorted(stats.accumulators.items()):
                dist.reduce(acc.sum, dst=owners[e])
        reduce_s = time.perf_counter() - t
        s.timings["reduce"] += reduce_s
        t = time.perf_counter()
        wave_info = {
            "wave": i,
            "waves": len(waves),
            "stats_bytes": 0 if stats is None else stats.nbytes(),
            "wave_stats_s": stats_s,  # this worker's statistics of the whole wave (its own batches)
            "wave_reduce_s": reduce_s,
        }
        args = (owners, decisions, stats, counts.cpu(), int(tokens), set(wave), wave_info)
        solved.update(_solve_experts(w, s, step.moe, *args))
        del stats  # freed before the next wave's
        s.timings["solve"] += time.perf_counter() - t
    del inputs, routes
    t = time.perf_counter()
    if step.needed:
        s.floats.update(_share_experts(w, s, step.moe, owners, solved))
    s.timings["broadcast"] += time.perf_counter() - t


def _routed_counts(w: BlockWorker, routes: list, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """|T_e| per expert and the block's token count, over every worker's batches."""
    counts = torch.zeros(n, dtype=torch.int64, device=w.device)
    tokens = torch.zeros(1, dtype=torch.int64, device=w.device)
    for r in routes:
        counts += token_counts(r.top_k_index, n).to(w.device)
        tokens += r.hidden.shape[0]
    if w.group_ready:
        dist.all_reduce(counts)
        dist.all_reduce(tokens)
    return counts, tokens


def _block_load(w: BlockWorker, s: BlockState) -> list[float]:
    """Each worker's modelled solve seconds of the block's linears (its plans: whole groups at their
    owners, split groups' shares where they run), so the experts balance against them."""
    load = [0.0] * w.world
    for key, plan in s.plans.items():
        k = s.linears[key[0]].in_features
        rows = sum(s.linears[n].out_features for n in key)
        cost = solve_cost if s.solver == "gptq" else round_cost
        if plan.split:
            for r, (start, end) in enumerate(plan.shares):
                load[r] += cost(k, end - start) if end > start else 0.0
        else:
            load[plan.owner] += cost(k, rows)
    return load


def _solve_experts(
    w: BlockWorker,
    s: BlockState,
    moe_name: str,
    owners: list[int],
    decisions: list[str],
    stats: ExpertStatistics | None,
    counts: torch.Tensor,
    tokens: int,
    wave: set[int],
    wave_info: dict,
) -> dict[tuple[str, int], QuantizedLinear]:
    """The owned experts solved per fused matrix (gate and up stacked: one H) with H = 2·S / n (n: the
    expert's routed tokens, or every token for ``all_tokens``), or rounded (``rtn``); each stored as its
    checkpoint linears (rows of the fused result), the record entry holding the expert's tokens and
    decision, and (``expert_solve``) its owner, its wave, the statistics bytes this worker held in that
    wave, the wave's statistics and reduce seconds, the seconds of its fused matrix's solve (gate and up
    share one) and of writing this linear's result (its output error terms, packing, the upload queued).
    Only the experts of ``wave`` are solved. Returns {(param, e): result} of the experts solved here."""
    job = w.job
    experts = s.layer.get_submodule(moe_name).experts
    prefix = f"{moe_name}.experts."
    sources = {k: v for k, v in job.expert_sources.items() if v[0].startswith(prefix)}
    solved: dict[tuple[str, int], QuantizedLinear] = {}
    hessians: dict[tuple[str, int], torch.Tensor | None] = {}
    solve_s: dict[tuple[str, int], float] = {}
    for param, e, _first, _end in sources.values():
        if owners[e] != w.rank or e not in wave or (param, e) in solved:
            continue
        weight = getattr(experts, param.rsplit(".", 1)[1])[e].detach().float()
        specs = {job.spec_for(f"{w.layers_path}.{s.b}.{n}") for n, v in sources.items() if tuple(v[:2]) == (param, e)}
        if len(specs) != 1:
            raise ValueError(f"block {s.b} {param}[{e}]: its stacked linears ask for different grids")
        spec = specs.pop()
        t = time.perf_counter()
        if decisions[e] == RTN:
            hessians[(param, e)] = None
            solved[(param, e)] = quantize_group("rtn", weight, None, spec, job.method_options())
        else:
            acc = stats.accumulators[(e, param.rsplit(".", 1)[1])]
            n_rows = int(counts[e]) if decisions[e] == ROUTED else tokens
            hessians[(param, e)] = acc.hessian(total_count=n_rows)
            solved[(param, e)] = quantize_group(job.method, weight, hessians[(param, e)], spec, job.method_options())
        if weight.is_cuda:
            torch.cuda.synchronize(weight.device)  # the solve's own seconds, not its launch
        solve_s[(param, e)] = time.perf_counter() - t
    for name, (param, e, first, end) in sources.items():
        if (param, e) not in solved:
            continue
        t = time.perf_counter()
        part = solved[(param, e)].rows(first, end)
        weight = getattr(experts, param.rsplit(".", 1)[1])[e, first:end].detach().float()
        entry = w.writer.result(s.b, name, part, weight, part.dequantize(), hessians[(param, e)])
        entry["expert"] = {"index": e, "tokens": int(counts[e]), "decision": decisions[e]}
        solve = {"owner": w.rank, **wave_info, "fused_solve_s": solve_s[(param, e)]}
        entry["expert_solve"] = {**solve, "result_s": time.perf_counter() - t}  # its error terms, packing, upload
        s.outputs.append(entry)
    return solved


def _share_experts(
    w: BlockWorker, s: BlockState, moe_name: str, owners: list[int], solved: dict[tuple[str, int], QuantizedLinear]
) -> dict[str, torch.Tensor]:
    """The quantized fused parameters of the MoE module at every worker, each expert's rows sent by its
    owner: {param: dequantized [E, rows, K]} for the forward through the quantized block."""
    experts = s.layer.get_submodule(moe_name).experts
    out = {}
    for which in (GATE_UP, DOWN):
        param = f"{moe_name}.experts.{which}"
        fused = torch.empty_like(getattr(experts, which).data.float())
        for e in range(fused.shape[0]):
            if owners[e] == w.rank:
                fused[e] = solved[(param, e)].dequantize()
            if w.group_ready:
                dist.broadcast(fused[e], src=owners[e])
        out[param] = fused
    return out


def run_restore(_w: BlockWorker, s: BlockState, _step: Restore) -> None:
    for name, p in s.layer.named_parameters():
        p.data = s.unfolded[name]
    if s.passes is not None:
        s.passes.close()  # the kept inputs stay: the propagation through the quantized block reuses them


def run_propagate(w: BlockWorker, s: BlockState, step: Propagate) -> None:
    t = time.perf_counter()
    w.propagate(s.layer, s.quantized, s.floats, s.passes if step.quantized else None, step.quantized)
    s.timings["forward"] = time.perf_counter() - t


STEP_RUNNERS = {
    Probe: run_probe,
    FoldScales: run_fold_scales,
    CacheStages: run_cache_stages,
    CollectStats: run_collect_stats,
    LoadStats: run_load_stats,
    Reduce: run_reduce,
    Solve: run_solve,
    Gather: run_gather,
    Distribute: run_distribute,
    SolveExperts: run_solve_experts,
    Restore: run_restore,
    Propagate: run_propagate,
}


# ---------------------------------------------------------------- split solves


def share_output_errors(
    weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor, rows: list[int], start: int
) -> torch.Tensor:
    """Per linear of a stacked group, this share's part of tr(E H Eᵀ) and tr(W H Wᵀ) (float64
    [len(rows), 2]; E = W − Ŵ over the share's rows, which begin at row ``start`` of the stack):
    summed over the workers' shares they give each linear's relative output error."""
    per_row = output_error_terms(weight, approx, hessian).double()
    out = torch.zeros(len(rows), 2, dtype=torch.float64, device=weight.device)
    at = 0
    for i, n in enumerate(rows):
        a, b = max(at - start, 0), min(at + n - start, weight.shape[0])
        if a < b:
            out[i] = per_row[a:b].sum(0)
        at += n
    return out


def pack_share(own: QuantizedLinear) -> torch.Tensor:
    """A share of a split solve as one uint8 buffer: fp16 scales (as bytes, first: a float16
    view needs an even offset), codes, zeros."""
    return torch.cat([own.scales.view(torch.uint8).reshape(-1), own.codes.reshape(-1), own.zeros.reshape(-1)])


def empty_share(like: QuantizedLinear, rows: int) -> torch.Tensor:
    k, n_groups = like.codes.shape[1], like.scales.shape[1]
    return torch.empty(rows * (k + 3 * n_groups), dtype=torch.uint8, device=like.codes.device)


def unpack_share(like: QuantizedLinear, packed: torch.Tensor, rows: int) -> QuantizedLinear:
    """The inverse of :func:`pack_share`, with the grid, g_idx, perm and params of ``like``
    (the same for every share: they follow from H and the job)."""
    k, n_groups = like.codes.shape[1], like.scales.shape[1]
    scales, codes, zeros = packed.split([2 * rows * n_groups, rows * k, rows * n_groups])
    return QuantizedLinear(
        spec=like.spec,
        codes=codes.reshape(rows, k),
        scales=scales.view(torch.float16).reshape(rows, n_groups),
        zeros=zeros.reshape(rows, n_groups),
        g_idx=like.g_idx,
        method=like.method,
        perm=like.perm,
        params=like.params,
    )


def gather_rows(rank: int, own: QuantizedLinear, shares: tuple[tuple[int, int], ...]) -> QuantizedLinear:
    """Every worker's share of an evenly split solve (every worker has rows), broadcast from
    its solver, stacked in row order."""
    parts = []
    for r, (start, end) in enumerate(shares):
        packed = pack_share(own) if r == rank else empty_share(own, end - start)
        dist.broadcast(packed, src=r)
        parts.append(unpack_share(own, packed, end - start))
    return QuantizedLinear.stack_rows(parts)


def send_rows_to_owner(
    rank: int, own: QuantizedLinear | None, shares: tuple[tuple[int, int], ...], owner: int
) -> QuantizedLinear | None:
    """The shares of a split solve sent to its owner, which has rows of its own (the plan
    gives it the most) and returns them stacked in row order; other workers return None."""
    if rank != owner:
        if own is not None:
            dist.send(pack_share(own), dst=owner)
        return None
    if own is None:
        raise RuntimeError("the owner of a split solve must have rows of its own")
    parts = []
    for r, (start, end) in enumerate(shares):
        if r == rank:
            parts.append(own)
        elif end > start:
            packed = empty_share(own, end - start)
            dist.recv(packed, src=r)
            parts.append(unpack_share(own, packed, end - start))
    return QuantizedLinear.stack_rows(parts)


# ---------------------------------------------------------------- AWQ


def awq_params(job, **found) -> dict:
    """The record params of an AWQ group: the search's findings and the job's AWQ settings."""
    return {
        **found,
        "awq_grid": job.awq_grid,
        "awq_duo": job.awq_duo,
        "awq_clip": job.awq_clip and job.method == "awq",
        "awq_clip_search": job.awq_clip_search,
    }


def awq_search_and_fold(
    w: BlockWorker, b: int, layer: nn.Module, owner_of: dict[tuple, int], total_rows: int, timings: dict
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """AWQ scales for every group of the float block, then all folded into ``layer``.

    Per group (in block order): Σ xᵀx and Σ|x| of its input from this worker's samples
    (the forward stops at the group), reduced to the group's owner, which searches the
    scales; the scales are broadcast and, once every group has its scales, every worker
    folds them into its copy of the block (identical arithmetic, so identical tensors).
    Searching all groups before folding any keeps each search on the float weights, as
    the original AWQ does; the folds into v_proj / up_proj rows then precede their own
    quantization.

    Returns the folded float tensors that are not quantized linear weights (norm
    weights, biases of v_proj / up_proj) by name in the block, and, for the groups this
    worker owns, {leader linear: {"hessian": H' of the scaled inputs, "params": …,
    "float_results": record entries of the folded tensors it stored}}.
    """
    owned: dict[str, dict] = {}
    searched = _awq_search(w, layer, owner_of, total_rows, timings, owned)
    linear_weights = {f"{n}.weight" for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    floats: dict[str, torch.Tensor] = {}
    for group, owner, scales, found, hessian in searched:
        changed = fold_scales(layer, group, scales)
        entries = []
        for name in changed:
            if name in linear_weights:
                continue  # a quantized linear (v_proj / up_proj rows): stored as its result
            tensor = layer.get_parameter(name).data
            floats[name] = tensor
            if owner == w.rank:
                entries.append(w.writer.folded(b, name, tensor, group.linears))
        if owner == w.rank:
            params = awq_params(
                w.job,
                awq_alpha=found.alpha,
                awq_duo_chosen=found.duo,
                awq_prev=group.prev,
                awq_search_gain=1.0 - found.loss / found.loss_identity if found.loss_identity > 0 else 0.0,
            )
            if group.offset:  # the norm computes x̂ · (offset + w)
                params["awq_prev_offset"] = group.offset
            owned[group.linears[0]] = {
                "hessian": scale_gram(hessian, column_scales(group, scales)),
                "params": params,
                "float_results": entries,
            }
    return floats, owned


def _awq_search(
    w: BlockWorker, layer: nn.Module, owner_of: dict[tuple, int], total_rows: int, timings: dict, owned: dict
) -> list[tuple]:
    """Each group's scales searched by its owner and broadcast: (group, owner, scales, found, H)
    per group with a relation; the groups without one enter ``owned`` unscaled."""
    job = w.job
    searched = []
    relations, unfolded = w.scale_relations(layer, w.batches[0])
    by_group = {tuple(g.linears): g for g in relations}
    for key in list(by_group) + [k for k in unfolded if k not in by_group]:
        group = by_group.get(key)
        if key not in owner_of:
            raise ValueError(f"AWQ group {key} does not match the block's shared-input groups")
        owner, leader = owner_of[key], key[0]
        t = time.perf_counter()
        grams, means = w.collect_with_means(layer, [leader], abs_means=group is not None)
        timings["stats"] += time.perf_counter() - t
        t = time.perf_counter()
        if w.group_ready:
            dist.reduce(grams[leader].sum, dst=owner)
            if group is not None:
                dist.reduce(means[leader].sum, dst=owner)
        timings["reduce"] += time.perf_counter() - t
        if group is None:  # no op absorbs scales: the linears are quantized as they are
            if owner == w.rank:
                owned[leader] = unfolded_entry(job, unfolded[key], grams[leader].hessian(total_count=total_rows))
            continue
        t = time.perf_counter()
        found = hessian = None
        if owner == w.rank:
            weight = torch.cat([layer.get_submodule(n).weight.data for n in group.linears], dim=0)
            x_mean = means[leader].mean(total_count=total_rows)
            found = search_scales(
                weight, grams[leader].sum, x_mean, job.spec, grid=job.awq_grid, duo=job.awq_duo, expand=group.expand
            )
            scales = found.scales.float().contiguous()
            hessian = grams[leader].hessian(total_count=total_rows)
        else:
            scales = torch.empty(group.slots(layer), dtype=torch.float32, device=w.device)
        del grams, means
        timings["solve"] += time.perf_counter() - t
        t = time.perf_counter()
        if w.group_ready:
            dist.broadcast(scales, src=owner)
        timings["broadcast"] += time.perf_counter() - t
        searched.append((group, owner, scales, found, hessian))
    return searched


def unfolded_entry(job, why: str, hessian: torch.Tensor) -> dict:
    """The owner's record of a group that AWQ leaves unscaled: its Hessian (for the clip
    search), s = 1, and why (kept in every result of the group)."""
    params = awq_params(job, awq_alpha=-1.0, awq_duo_chosen=False, awq_prev=None, awq_unfolded=why)
    params["awq_search_gain"] = 0.0
    return {"hessian": hessian, "params": params, "float_results": []}
