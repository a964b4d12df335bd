"""Who solves what: owners for whole groups, and row shares for groups split across workers.

Plain functions over shapes and costs, decided from the job alone, so every worker of a run
computes the same plan without talking to the others.
"""

from __future__ import annotations

from dataclasses import dataclass

# A group's solve step (GPTQ, then the stored result: dequantised weight, output errors,
# serialisation) with K inputs and N output rows costs on one CPU thread about
#   fixed(K) + N · per_row(K),  fixed(K) = 5e-12·K³ + 1.7e-5·K,  per_row(K) = 4.3e-11·K² + 2.7e-8·K
# seconds: the factorisation (K³) and the per-column loop (K), which every share repeats, and
# the row work (error feedback and output errors, N·K²; quantising, dequantising and hashing,
# N·K), which shares divide. Fitted to the solve step of SmolLM2's blocks and to gptq_quantize
# alone at K = 576, 1536 and 4096 on the 2-core dev machine (SmolLM2's four groups: 39, 28, 102
# and 127 ms modelled, 45, 28, 101 and 129 ms measured); only ratios matter to the plan.
_CUBIC, _PER_COLUMN, _ROW_K2, _ROW_K = 5e-12, 1.7e-5, 4.3e-11, 2.7e-8
# a split must cut the busiest worker's modelled time by this share, or the group stays whole:
# the model is rough, and a split adds a factorisation and a gather of the shares (the 1536-wide
# benchmark model's 4 % split of q/k/v did not pay: float inline 1.72× → 1.64× at W=2)
_MIN_SPLIT_GAIN = 0.05


def solve_fixed_cost(k: int) -> float:
    """The part of a GPTQ solve every share repeats: factorisation and per-column steps."""
    return _CUBIC * float(k) ** 3 + _PER_COLUMN * k


def solve_row_cost(k: int) -> float:
    """The modelled cost of one output row of a GPTQ solve with K inputs."""
    return _ROW_K2 * float(k) ** 2 + _ROW_K * k


def solve_cost(k: int, rows: int) -> float:
    """Modelled seconds of a whole GPTQ solve of ``rows`` outputs over ``k`` inputs."""
    return solve_fixed_cost(k) + rows * solve_row_cost(k)


def round_cost(k: int, rows: int) -> float:
    """Modelled seconds of rounding ``rows`` outputs over ``k`` inputs without a Hessian (RTN):
    the row work's quantising, dequantising and hashing, no factorisation."""
    return _ROW_K * k * rows


def assign_owners(costs: list[float], world: int, load: list[float] | None = None) -> list[int]:
    """Longest-processing-time-first: each unit of work to the least-loaded worker (deterministic).

    ``load`` (one entry per worker), when given, is the work each worker already has and is
    updated in place, so balancing carries across calls (blocks whose solves are queued);
    it is kept relative (its minimum subtracted) so it stays small. Ties go to the lower rank.
    """
    if load is None:
        load = [0.0] * world
    if len(load) != world:
        raise ValueError(f"load has {len(load)} entries for {world} workers")
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    low = min(load)
    for r in range(world):
        load[r] -= low
    return owners


def row_slices(n_rows: int, world: int) -> list[tuple[int, int]]:
    """Rows [start, end) of each of ``world`` workers: contiguous, sizes differing by at most one."""
    return [(r * n_rows // world, (r + 1) * n_rows // world) for r in range(world)]


@dataclass(frozen=True)
class GroupPlan:
    """One group's solve: ``owner`` stores its results; ``shares`` (split groups) are the rows
    [start, end) each rank solves, contiguous in rank order, empty for ranks left out."""

    owner: int
    shares: tuple[tuple[int, int], ...] | None = None

    @property
    def split(self) -> bool:
        return self.shares is not None


def _water_fill(base: list[float], rows: int, fixed: float, per_row: float) -> tuple[float, list[int]]:
    """Rows of one group spread over workers already loaded ``base`` so their finishing times
    level out; a worker that takes rows pays ``fixed`` once. Returns the modelled makespan of
    the group's participants and each worker's row count (summing to ``rows``)."""
    world = len(base)
    order = sorted(range(world), key=lambda r: (base[r], r))
    start = [base[r] + fixed for r in order]
    level, used = 0.0, 1
    for j in range(1, world + 1):  # the j least-loaded workers take part
        level = (rows * per_row + sum(start[:j])) / j
        used = j
        if j == world or level <= start[j]:
            break
    exact = [max(0.0, (level - start[i]) / per_row) if i < used else 0.0 for i in range(world)]
    counts = [int(x) for x in exact]
    left = rows - sum(counts)
    for i in sorted(range(used), key=lambda i: (-(exact[i] - counts[i]), i))[:left]:
        counts[i] += 1
    by_rank = [0] * world
    for i, r in enumerate(order):
        by_rank[r] = counts[i]
    span = max((base[r] + fixed + by_rank[r] * per_row for r in range(world) if by_rank[r]), default=0.0)
    return span, by_rank


def _shares(counts: list[int]) -> tuple[tuple[int, int], ...]:
    out, at = [], 0
    for n in counts:
        out.append((at, at + n))
        at += n
    return tuple(out)


def plan_solves(
    shapes: list[tuple[int, int]],
    world: int,
    splittable: list[bool],
    load: list[float] | None = None,
    level: bool = True,
    stage_per_group: bool = False,
) -> list[GroupPlan]:
    """The solve plan of a block's groups, each given as (K inputs, N rows), solved as one
    stage, or (``stage_per_group``: true-sequential) one stage each.

    - Owners go longest first to the least loaded (:func:`assign_owners` with
      :func:`solve_cost`) over all the block's groups.
    - A stage of fewer groups than workers (true-sequential stages: one group) splits each
      splittable group evenly over all workers (:func:`row_slices`); its owner stores it.
    - Otherwise groups stay whole with their owners; then, if one splittable group on the
      busiest worker can be spread over the workers so the busiest finishes sooner by at least
      5 % of the modelled time, its rows are shared out unevenly to level their finishing
      times (the best such group; one per stage). A worker that takes rows pays the
      factorisation again, which the levelling counts; some workers may take none, and the
      one with the most rows owns the group. ``level=False`` keeps every such group whole.

    Splitting never changes the results: GPTQ's rows are independent given H, and the
    stacked shares equal the whole solve bit for bit. ``load`` is carried and updated as in
    :func:`assign_owners` (the modelled cost each worker was given).
    """
    if load is None:
        load = [0.0] * world
    if len(load) != world:
        raise ValueError(f"load has {len(load)} entries for {world} workers")
    if len(splittable) != len(shapes):
        raise ValueError(f"{len(splittable)} splittable flags for {len(shapes)} groups")
    costs = [solve_cost(k, n) for k, n in shapes]
    owners = assign_owners(costs, world, list(load))
    work = list(load)  # each worker's modelled seconds: carried, then this stage's
    for c, o in zip(costs, owners):
        work[o] += c
    plans = [GroupPlan(o) for o in owners]

    def take_share(i: int, counts: list[int], owner: int | None = None) -> None:
        k, _ = shapes[i]
        work[owners[i]] -= costs[i]
        for r, c in enumerate(counts):
            if c:
                work[r] += solve_fixed_cost(k) + c * solve_row_cost(k)
        if owner is None:  # the worker with the most rows stores the stacked result
            owner = max(range(world), key=lambda r: (counts[r], -r))
        plans[i] = GroupPlan(owner, _shares(counts))

    if world > 1 and (stage_per_group or len(shapes) < world):
        for i, (_, n) in enumerate(shapes):
            if splittable[i] and n >= world:
                take_share(i, [e - s for s, e in row_slices(n, world)], owners[i])
    elif world > 1 and level:
        span = max(work)
        best: tuple[float, int, list[int]] | None = None
        for i, (k, n) in enumerate(shapes):
            if not splittable[i] or n < 2 or work[owners[i]] < span:
                continue
            base = list(work)
            base[owners[i]] -= costs[i]
            group_span, counts = _water_fill(base, n, solve_fixed_cost(k), solve_row_cost(k))
            new_span = max([group_span] + [base[r] for r in range(world) if counts[r] == 0])
            if sum(c > 0 for c in counts) > 1 and new_span <= (1 - _MIN_SPLIT_GAIN) * span:
                if best is None or new_span < best[0]:
                    best = (new_span, i, counts)
        if best is not None:
            take_share(best[1], best[2])
    low = min(work)
    load[:] = [w - low for w in work]
    return plans


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
