"""Routed calibration statistics of a Mixture-of-Experts block's experts.

A sparse MoE block maps each token x ∈ ℝᴴ to Σ_{e ∈ top-k(x)} p_e(x) · f_e(x) (+ shared experts),
with the experts' weights fused into 3-D parameters (transformers 5.x): ``gate_up_proj``
[E, 2I, H] and ``down_proj`` [E, H, I], f_e(x) = D_e (σ(G_e x) ⊙ U_e x) with [G_e; U_e] =
gate_up_proj[e], D_e = down_proj[e]. GPTQ's loss for expert e's linears is taken over the tokens
that reach it: with T_e = {t : e ∈ top-k(x_t)} the tokens the model's own router sends to e,

    H_e^{gate_up} = 2 · Σ_{t ∈ T_e} x_t x_tᵀ / |T_e|,
    H_e^{down}    = 2 · Σ_{t ∈ T_e} a_t a_tᵀ / |T_e|,   a_t = σ(G_e x_t) ⊙ U_e x_t,

(the routing weight p_e multiplies f_e's output, so it is no part of either input).

Nothing here re-implements a family's router or experts: :func:`routing` runs the block's own
forward and takes the (tokens, top-k indices, top-k weights) that it hands to its experts
module; :func:`expert_inputs` runs the experts module's own eager forward and reads the inputs
of its two matrix products per expert as the model computes them. Mixtral, Qwen3-MoE and
DeepSeek-V3 (grouped routing, shared experts) share this interface.

An expert the calibration barely reaches gets a decision from :data:`MIN_TOKENS_POLICIES`
(:func:`expert_decisions`): with fewer than ``min_tokens`` routed tokens (never fewer than one),
``all_tokens`` takes its statistics from every token of the block (the forward still routes as
the model does), ``rtn`` rounds it without statistics, ``fail`` refuses. A rank-deficient
routed Hessian (|T_e| < H) is what GPTQ's damping λ·mean(diag H)·I is for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from strata_quant.workers.schedule import round_cost, solve_cost
from strata_quant.workers.stats import HessianAccumulator

# an expert's two fused matrices: the one reading the token (gate and up stacked), the one reading
# the intermediate activation
GATE_UP, DOWN = "gate_up_proj", "down_proj"


class MoeError(ValueError):
    pass


@dataclass(frozen=True)
class Routing:
    """What a block's router handed to its experts for one batch."""

    hidden: torch.Tensor  # [T, H] the tokens as the experts module reads them
    top_k_index: torch.Tensor  # [T, k] expert ids
    top_k_weights: torch.Tensor  # [T, k] routing weights


def experts_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The block's fused experts modules (``gate_up_proj`` and ``down_proj`` as 3-D parameters), by name."""
    out = {}
    for name, module in layer.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if params.get(GATE_UP) is not None and params.get(DOWN) is not None and params[GATE_UP].dim() == 3:
            out[name] = module
    return out


def moe_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The block's sparse MoE modules (the parent of each experts module), by name."""
    modules = dict(layer.named_modules())
    return {name.rpartition(".")[0]: modules[name.rpartition(".")[0]] for name in experts_modules(layer)}


def num_experts(experts: nn.Module) -> int:
    return getattr(experts, GATE_UP).shape[0]


class _Stop(Exception):
    pass


def routing(moe: nn.Module, hidden: torch.Tensor) -> Routing:
    """The model's own routing of ``hidden`` (the MoE module's input): the MoE module's forward runs
    until it calls its experts module, whose arguments (tokens, top-k index, top-k weights) are
    taken and the rest of the forward skipped."""
    experts = getattr(moe, "experts", None)
    if experts is None or experts not in experts_modules(moe).values():
        raise MoeError(f"{type(moe).__name__} has no fused experts module named 'experts'")
    seen: list[tuple] = []

    def take(_module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[n] for n in names[len(args) :]]
        seen.append(tuple(values[:3]))
        raise _Stop

    handle = experts.register_forward_pre_hook(take, with_kwargs=True)
    try:
        with torch.no_grad():
            moe(hidden)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise MoeError(f"{type(moe).__name__}'s forward never called its experts")
    tokens, index, weights = seen[0]
    return Routing(tokens, index, weights)


def token_counts(top_k_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """|T_e| per expert (int64 [E]): tokens routed to e (a token counts once per expert it reaches)."""
    return torch.bincount(top_k_index.reshape(-1).to(torch.int64), minlength=n_experts)[:n_experts]


class _ExpertInputs(TorchFunctionMode):
    """Calls ``on_input(expert, GATE_UP | DOWN, x)`` for each ``F.linear(x, W[e])`` whose weight is a
    slice of one of the experts' fused parameters."""

    def __init__(self, experts: nn.Module, on_input: Callable[[int, str, torch.Tensor], None]):
        super().__init__()
        self.on_input = on_input
        self.params = [(which, getattr(experts, which)) for which in (GATE_UP, DOWN)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            for which, param in self.params:
                if weight.dim() == 2 and weight.untyped_storage().data_ptr() == param.untyped_storage().data_ptr():
                    expert = (weight.storage_offset() - param.storage_offset()) // param.stride(0)
                    self.on_input(int(expert), which, args[0])
                    break
        return func(*args, **kwargs)


def expert_inputs(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    on_input: Callable[[int, str, torch.Tensor], None],
) -> torch.Tensor:
    """Run the experts module's own eager forward on ``hidden`` [T, H] with the given routing and
    call ``on_input(e, which, x)`` with the input x of expert e's ``gate_up_proj`` (its routed
    tokens) and of its ``down_proj`` (their intermediate activation a_t). Returns the forward's
    output. The eager forward is the one the ``experts_implementation`` dispatch wraps
    (``grouped_mm`` fuses the per-expert products that are read here)."""
    forward = getattr(type(experts).forward, "__wrapped__", type(experts).forward)
    with torch.no_grad(), _ExpertInputs(experts, on_input):
        return forward(experts, hidden, top_k_index, top_k_weights)


# ---------------------------------------------------------------------------- policy

# decision per expert: its statistics from its routed tokens, from every token, or none (rounded to nearest)
ROUTED, ALL_TOKENS, RTN = "routed", "all_tokens", "rtn"
# what an expert with fewer than min_tokens routed tokens gets, per policy (None: refuse the job)
MIN_TOKENS_POLICIES: dict[str, str | None] = {"all_tokens": ALL_TOKENS, "rtn": RTN, "fail": None}


def expert_decisions(counts: torch.Tensor, min_tokens: int, policy: str) -> list[str]:
    """Per expert: ``routed`` when |T_e| ≥ max(min_tokens, 1), else the policy's decision. ``fail``
    raises a MoeError naming every expert below the threshold and its count."""
    if policy not in MIN_TOKENS_POLICIES:
        raise MoeError(f"quant.moe.policy must be one of {', '.join(MIN_TOKENS_POLICIES)}, got {policy!r}")
    threshold = max(int(min_tokens), 1)  # a zero-token expert has no routed statistics to take
    low = [e for e, n in enumerate(counts.tolist()) if n < threshold]
    fallback = MIN_TOKENS_POLICIES[policy]
    if low and fallback is None:
        listed = ", ".join(f"{e} ({int(counts[e])})" for e in low)
        raise MoeError(f"experts below quant.moe.min_tokens={min_tokens} routed tokens: {listed}")
    return [fallback if e in low else ROUTED for e in range(len(counts))]


# ---------------------------------------------------------------------------- statistics


@dataclass
class ExpertStatistics:
    """Running statistics of one MoE module's experts: per expert and input, S = Σ xᵀx and n
    (:class:`workers.stats.HessianAccumulator`), and the routed token counts |T_e|."""

    accumulators: dict[tuple[int, str], HessianAccumulator]
    counts: torch.Tensor  # int64 [E], routed tokens over every batch seen

    @classmethod
    def empty(cls, experts: nn.Module, which: list[int] | None = None) -> ExpertStatistics:
        """Accumulators for ``which`` experts (default all): memory 8·(H² + I²) bytes per expert."""
        gate_up, down = getattr(experts, GATE_UP), getattr(experts, DOWN)
        ids = range(gate_up.shape[0]) if which is None else which
        acc = {}
        for e in ids:
            acc[(e, GATE_UP)] = HessianAccumulator(gate_up.shape[2], device=gate_up.device)
            acc[(e, DOWN)] = HessianAccumulator(down.shape[2], device=down.device)
        return cls(acc, torch.zeros(gate_up.shape[0], dtype=torch.int64, device=gate_up.device))

    def hessian(self, expert: int, which: str) -> torch.Tensor:
        return self.accumulators[(expert, which)].hessian()

    def nbytes(self) -> int:
        """Bytes the held sums take (the statistics memory a worker's budget bounds)."""
        return sum(acc.sum.numel() * acc.sum.element_size() for acc in self.accumulators.values())


def count_routed_tokens(moe: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """|T_e| of one batch by the model's own router (the decisions need every batch's counts first)."""
    route = routing(moe, hidden)
    return token_counts(route.top_k_index, num_experts(moe.experts))


def add_expert_statistics(
    moe: nn.Module,
    hidden: torch.Tensor,
    stats: ExpertStatistics,
    decisions: list[str],
    route: Routing | None = None,
) -> None:
    """Add one batch of ``hidden`` (the MoE module's input) to ``stats`` for the experts it holds
    (``route``: that batch's :func:`routing`, when taken already: waves of experts reuse it).

    ``routed`` experts: x_t for t ∈ T_e and a_t on those tokens, read from the experts' own forward
    under the model's routing. ``all_tokens`` experts: every token of the batch, and a_t on every
    token (the expert's own forward run once more with all tokens routed to it, weight 1).
    ``rtn`` experts gather nothing. The counts |T_e| are added for every expert.

    The down input is computed with the experts' parameters as they are: once an expert's
    ``gate_up_proj[e]`` holds its quantized weights, a second pass gives down's statistics on
    the quantized gate/up (GPTQ's true-sequential order inside the expert).
    """
    experts = moe.experts
    route = routing(moe, hidden) if route is None else route
    stats.counts += token_counts(route.top_k_index, num_experts(experts))
    held = {e for e, _ in stats.accumulators}

    def add(e: int, which: str, x: torch.Tensor, want: str) -> None:
        if e in held and decisions[e] == want:
            stats.accumulators[(e, which)].add(x)

    index = route.top_k_index
    if len(held) < num_experts(experts):
        # experts not held skip their products: the experts' forward passes over index E (the
        # slot transformers gives experts that live elsewhere), so a wave costs its own experts
        others = torch.tensor(sorted(set(range(num_experts(experts))) - held), device=index.device)
        index = index.masked_fill(torch.isin(index, others), num_experts(experts))
    expert_inputs(experts, route.hidden, index, route.top_k_weights, lambda e, w, x: add(e, w, x, ROUTED))
    everyone = [e for e in sorted(held) if decisions[e] == ALL_TOKENS]
    n = route.hidden.shape[0]
    for e in everyone:
        index = torch.full((n, 1), e, dtype=route.top_k_index.dtype, device=route.top_k_index.device)
        ones = torch.ones(n, 1, dtype=route.top_k_weights.dtype, device=route.top_k_weights.device)
        expert_inputs(experts, route.hidden, index, ones, lambda e2, w, x: add(e2, w, x, ALL_TOKENS))


# ---------------------------------------------------------------------------- memory and ownership


def expert_statistics_bytes(hidden: int, intermediate: int) -> int:
    """Bytes of one expert's statistics: the fp64 sums of its two inputs, 8·(H² + I²)
    (DeepSeek-V3, H = 7168, I = 2048: 445 MB)."""
    return 8 * (hidden * hidden + intermediate * intermediate)


def experts_per_wave(budget_bytes: int, hidden: int, intermediate: int) -> int:
    """How many experts' statistics fit in ``budget_bytes`` (at least one: a budget below one
    expert is refused, since no schedule can keep to it)."""
    each = expert_statistics_bytes(hidden, intermediate)
    if budget_bytes < each:
        raise MoeError(
            f"the experts' statistics budget of {budget_bytes / 2**20:.0f} MiB holds no expert "
            f"({each / 2**20:.0f} MiB each at hidden {hidden}, intermediate {intermediate})"
        )
    return budget_bytes // each


def expert_costs(hidden: int, intermediate: int, decisions: list[str]) -> list[float]:
    """Modelled solve seconds of each expert (:mod:`workers.schedule`'s model): GPTQ of gate/up
    (K = H, 2I rows) and of down (K = I, H rows), or only the rounding for an ``rtn`` expert."""
    gptq = solve_cost(hidden, 2 * intermediate) + solve_cost(intermediate, hidden)
    rtn = round_cost(hidden, 2 * intermediate) + round_cost(intermediate, hidden)
    return [rtn if d == RTN else gptq for d in decisions]


def expert_waves(owners: list[int], cap: int) -> list[list[int]]:
    """Experts in waves of at most ``cap``: within a wave every worker accumulates its partial
    statistics of the wave's experts from its own tokens (routing taken once per batch), each
    expert's sums are reduced to its owner, solved there and freed before the next wave, so no
    worker holds more than ``cap`` experts' statistics. ``owners[e]`` is expert e's owner (e.g.
    :func:`workers.schedule.assign_owners` over solve costs); each wave takes the owners' next
    experts in turn, so its solves spread over the workers. Deterministic: every worker computes
    the same waves from the same owners."""
    if cap < 1:
        raise MoeError(f"a wave must hold at least one expert, got {cap}")
    queues: dict[int, list[int]] = {}
    for e, r in enumerate(owners):
        queues.setdefault(r, []).append(e)
    order: list[int] = []
    while any(queues.values()):
        for r in sorted(queues):
            if queues[r]:
                order.append(queues[r].pop(0))
    return [sorted(order[i : i + cap]) for i in range(0, len(order), cap)]


# ---------------------------------------------------------------------------- the block's fused parameters

# block-relative checkpoint linear (``block_sparse_moe.experts.3.w1``) → (fused parameter, expert e, first row,
# end row): the rows [first, end) of ``param[e]`` are that linear (pipeline.moe.expert_sources, found by the
# family's own reverse conversion and sent to the workers as data)
ExpertSources = dict[str, tuple[str, int, int, int]]


def fuse_experts(
    tensors: dict[str, torch.Tensor], sources: ExpertSources, shapes: dict[str, tuple], suffix: str = ".weight"
) -> dict[str, torch.Tensor]:
    """Per-expert tensors under the checkpoint's names (``name + suffix``) → the block's fused parameters:
    P[e, first:end] = W_name for every source (param, e, first, end) of ``sources``; every other tensor passes
    as it is, and a tensor given under a fused parameter's own name wins over the per-expert ones (an
    evaluation's quantized experts over the checkpoint's). Each fused parameter (shape from ``shapes``) must
    be covered row for row, once: a missing or doubled expert raises MoeError."""
    out = {k: v for k, v in tensors.items() if k.removesuffix(suffix) not in sources}
    fused: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for name, (param, e, first, end) in sources.items():
        if name + suffix not in tensors:
            continue
        value = tensors[name + suffix]
        if param not in fused:
            fused[param] = torch.zeros(shapes[param], dtype=value.dtype, device=value.device)
            covered[param] = torch.zeros(shapes[param][:2], dtype=torch.int32)
        fused[param][e, first:end] = value
        covered[param][e, first:end] += 1
    for param, hits in covered.items():
        if not bool((hits == 1).all()):
            raise MoeError(f"the checkpoint's per-expert tensors do not cover {param} row for row, once each")
    return {**fused, **out}


class _Reached(Exception):
    pass


def moe_inputs(layer: nn.Module, moe_name: str, batches: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    """The input the block hands its MoE module ``moe_name`` on each batch (hidden, kwargs), in fp32: the
    block's own forward, stopped when the module is reached (the layer's weights as they are now)."""
    moe = layer.get_submodule(moe_name)
    seen: list[torch.Tensor] = []

    def take(_module, args):
        seen.append(args[0].detach())
        raise _Reached

    handle = moe.register_forward_pre_hook(take)
    try:
        for hidden, kwargs in batches:
            try:
                with torch.no_grad():
                    layer(hidden.float(), **kwargs)
            except _Reached:
                continue
            raise MoeError(f"the block's forward never reached {moe_name}")
    finally:
        handle.remove()
    return seen
