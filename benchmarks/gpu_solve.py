"""The GPU GPTQ solve with its column loop replayed as CUDA graphs against the same solve
launching every call (``cuda_graphs=False``): bit-for-bit equality of codes, scales, zeros,
g_idx and perm, and the time of each, over the grids the product uses (act-order with static
or dynamic groups, symmetric and asymmetric, 3 and 4 bits, MSE grid search, a partial last
group, K not a multiple of 32) and the shapes of a Llama-70B 1/8 share.

    python3 -m benchmarks.gpu_solve [--json OUT.json]

Also checks that the GPU's Gram accumulation (one mixed-dtype fp64 += fp32 add per batch,
workers/stats.py) equals the sliced cast-then-add the CPU path uses, bit for bit
(``--stats-only``: that check alone). Exits non-zero when any case differs. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.common import machine
from strata_quant.workers import stats
from strata_quant.workers.gptq import gptq_quantize
from strata_quant.workers.result import QuantSpec

# (label, K, rows, spec fields, act_order, static_groups, mse_grid)
CASES = [
    ("70B o_proj 1/8 share, W4 g128 act-order", 8192, 1024, {"bits": 4, "group_size": 128}, True, True, 0),
    ("70B down_proj 1/8 share, W4 g128 act-order", 28672, 1024, {"bits": 4, "group_size": 128}, True, True, 0),
    ("70B gate+up 1/8 share, W4 g128 asym", 8192, 7168, {"bits": 4, "group_size": 128, "sym": False}, False, True, 0),
    ("SmolLM2 q+k+v, W4 g64 asym", 576, 960, {"bits": 4, "group_size": 64, "sym": False}, False, True, 0),
    ("K=1000 (partial group, K%32=8), act-order dynamic", 1000, 300, {"bits": 4, "group_size": 64, "sym": False}, True, False, 0),
    ("K=4096 W3 g32 MSE grid", 4096, 512, {"bits": 3, "group_size": 32, "sym": False}, False, True, 10),
    ("K=2048 W8 per-channel", 2048, 256, {"bits": 8, "group_size": -1}, False, True, 0),
    ("K=1536 W4 g48 (groups across sub-batches)", 1536, 384, {"bits": 4, "group_size": 48, "sym": False}, False, True, 0),
]  # fmt: skip


def timed(*args, reps: int = 2, **kwargs):
    """Best of ``reps`` GPTQ solves (synchronised), and the last result."""
    best, out = float("inf"), None
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = gptq_quantize(*args, **kwargs)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def gram_sums_agree(dev: torch.device, k: int = 4096, batches: int = 4) -> bool:
    """The accumulator's GPU add against fp32 Gram slices cast to fp64 and added (the CPU path)."""
    gen = torch.Generator(device=dev).manual_seed(1)
    xs = [torch.randn(2048, k, device=dev, generator=gen) for _ in range(batches)]
    acc = stats.HessianAccumulator(k, dev)
    ref = torch.zeros(k, k, dtype=torch.float64, device=dev)
    step = max(1, stats._CAST_CHUNK // k)
    for x in xs:
        acc.add(x)
        gram = x.t() @ x
        for i in range(0, k, step):
            ref[i : i + step] += gram[i : i + step].double()
    return torch.equal(acc.sum, ref)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--stats-only", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"machine: {machine()}; device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}")
    sums_equal = gram_sums_agree(dev)
    print(f"Gram sums: one mixed-dtype add per batch equals the sliced cast-then-add: {sums_equal}")
    if args.stats_only:
        sys.exit(0 if sums_equal else 1)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows_out, all_equal = [], sums_equal
    print(f"{'case':52s} {'eager s':>8s} {'graphs s':>9s} {'speedup':>8s}  equal")
    for label, k, n, fields, act_order, static_groups, mse in CASES:
        x = torch.randn(min(2 * k, 16384), k, device=dev, generator=gen)
        h = (x.t() @ x).double() * (2.0 / x.shape[0])
        del x
        w = torch.randn(n, k, device=dev, generator=gen) * 0.02
        spec = QuantSpec(**fields)
        opts = {"act_order": act_order, "static_groups": static_groups, "mse_grid": mse}
        t_eager, eager = timed(w, h, spec, cuda_graphs=False, **opts)
        t_graph, graph = timed(w, h, spec, cuda_graphs=True, **opts)
        same = all(
            torch.equal(getattr(eager, f), getattr(graph, f)) for f in ("codes", "scales", "zeros", "g_idx")
        ) and (eager.perm is None) == (graph.perm is None)
        same = same and (eager.perm is None or torch.equal(eager.perm, graph.perm))
        all_equal &= same
        print(f"{label:52s} {t_eager:8.3f} {t_graph:9.3f} {t_eager / t_graph:7.1f}×  {same}", flush=True)
        rows_out.append({"case": label, "k": k, "rows": n, "eager_s": t_eager, "graphs_s": t_graph, "equal": same})
        del h, w, eager, graph
        torch.cuda.empty_cache()
    print("all equal" if all_equal else "SOME CASES DIFFER")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine(),
                    "device": torch.cuda.get_device_name(dev),
                    "gram_sums_equal": sums_equal,
                    "cases": rows_out,
                },
                f,
                indent=1,
            )
    sys.exit(0 if all_equal else 1)


if __name__ == "__main__":
    main()
