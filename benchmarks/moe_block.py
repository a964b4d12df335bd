"""A DeepSeek-V3-width MoE module: routed statistics in waves under a budget, solves and forward, per expert.

    .venv/bin/python -m benchmarks.moe_block [--experts 8] [--top-k 2] [--tokens 1024]
        [--budget-experts 2] [--solve-experts 1] [--device cpu|cuda] [--out FILE]

transformers' DeepseekV3MoE at DeepSeek-V3's widths (hidden 7168, experts of 2048, one shared
expert of 2048), random N(0, 0.02²) weights and a random router, with the expert count scaled
to the machine (DeepSeek-V3 has 256 experts, top-8, 8 groups of which 4 are used; here one
group, top-k as given). Inputs are N(0, 1) tokens. Measured: the routing (the model's own
router, once per batch), each wave's statistics (gate/up inputs and the intermediate activation
of the routed tokens, :func:`workers.moe.add_expert_statistics`), the memory the statistics
hold against the budget (experts_per_wave × 8·(H² + I²)), GPTQ W4 g128 of ``--solve-experts``
experts' gate/up [4096 × 7168] and down [7168 × 2048], and the module's forward. Times are
wall seconds of one run on this machine; on a shared CPU they are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from strata_quant.workers.gptq import gptq_quantize
from strata_quant.workers.moe import (
    DOWN,
    GATE_UP,
    ExpertStatistics,
    add_expert_statistics,
    expert_decisions,
    expert_statistics_bytes,
    expert_waves,
    experts_per_wave,
    routing,
    token_counts,
)
from strata_quant.workers.result import QuantSpec
from strata_quant.workers.schedule import assign_owners, solve_cost

HIDDEN, EXPERT = 7168, 2048


def rss_bytes() -> int:
    """Resident bytes of this process, or the GPU memory torch holds when the module is on a GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def build(experts: int, top_k: int, device: str):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=HIDDEN,
        moe_intermediate_size=EXPERT,
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=top_k,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        moe = DeepseekV3MoE(config).eval()
        for name, p in moe.named_parameters():
            p.data.normal_(0.0, 0.02 if "gate.weight" not in name else 0.2)
    return moe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--budget-experts", type=int, default=2)
    ap.add_argument("--solve-experts", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="owners the waves are planned for")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/moe-block-cpu.json")
    args = ap.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    moe = build(args.experts, args.top_k, dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    batches = [torch.randn(1, args.batch, HIDDEN, generator=gen, device=dev) for _ in range(args.tokens // args.batch)]
    base_rss = rss_bytes()
    each = expert_statistics_bytes(HIDDEN, EXPERT)
    cap = experts_per_wave(args.budget_experts * each, HIDDEN, EXPERT)

    t = time.perf_counter()
    routes = [routing(moe, x) for x in batches]
    sync()
    route_s = time.perf_counter() - t
    counts = sum(token_counts(r.top_k_index, args.experts).cpu() for r in routes)
    decisions = expert_decisions(counts, 1, "all_tokens")
    costs = [solve_cost(HIDDEN, 2 * EXPERT) + solve_cost(EXPERT, HIDDEN)] * args.experts
    waves = expert_waves(assign_owners(costs, args.workers), cap)

    spec = QuantSpec(bits=4, group_size=128)
    wave_rows, held, solves = [], [], []
    for wave in waves:
        t = time.perf_counter()
        stats = ExpertStatistics.empty(moe.experts, which=wave)
        for x, r in zip(batches, routes):
            add_expert_statistics(moe, x, stats, decisions, r)
        sync()
        held.append(sum(a.sum.numel() * a.sum.element_size() for a in stats.accumulators.values()))
        wave_rows.append(
            {
                "experts": wave,
                "tokens": [int(counts[e]) for e in wave],
                "seconds": time.perf_counter() - t,
                "rss_growth_mib": (rss_bytes() - base_rss) / 2**20,
            }
        )
        for e in wave[: max(0, args.solve_experts - len(solves))]:  # solved while the wave is held, as an owner would
            row = {"expert": e}
            for which in (GATE_UP, DOWN):
                t = time.perf_counter()
                gptq_quantize(getattr(moe.experts, which)[e].detach(), stats.hessian(e, which), spec)
                sync()
                row[f"{which}_seconds"] = time.perf_counter() - t
            solves.append(row)
        del stats

    t = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            moe(x)
    sync()
    forward_s = time.perf_counter() - t
    out = {
        "args": vars(args),
        "machine": machine(),
        "expert_statistics_mib": each / 2**20,
        "experts_per_wave": cap,
        "budget_mib": args.budget_experts * each / 2**20,
        "max_statistics_held_mib": max(held) / 2**20,
        "max_rss_growth_mib": max(w["rss_growth_mib"] for w in wave_rows),
        "routing_seconds": route_s,
        "token_counts": counts.tolist(),
        "waves": wave_rows,
        "statistics_seconds_per_routed_token": sum(w["seconds"] for w in wave_rows) / max(int(counts.sum()), 1),
        "solves": solves,
        "forward_seconds": forward_s,
        "forward_seconds_per_token": forward_s / args.tokens,
    }
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
