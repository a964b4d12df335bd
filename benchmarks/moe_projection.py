"""A projection, not a measurement: DeepSeek-V3 671B and Qwen3-235B-A22B, GPTQ W4 g128 in `strata run` on 8×H100 80 GB.

    .venv/bin/python -m benchmarks.moe_projection [--run benchmarks/results/moe-v3-run-cpu.json]
        [--tokens 524288] [--budget 32] [--out benchmarks/results/moe-projection.json]

Arithmetic over the models' shapes, anchored on figures this project measured: the effective rates of the
statistics (fp64 Σ xᵀx), the GPTQ solve and the forward on an H200 (block70b-h200.json, gpu-solve-h200.json),
and, from the DeepSeek-V3-width block run on the CPU (``--run``, benchmarks/moe_v3_run.py), the workers'
peak memory per fp32 byte of the block and the stored bytes per quantized weight. Every assumption is in
``ASSUMED`` and printed with the result.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path("benchmarks/results")
ASSUMED = {
    "gpus": 8,
    "gpu_memory_gib": 80,
    "h100_vs_h200_compute": 1.0,  # the same GH100 compute (fp64 TC 67, fp32 67 TFLOP/s): the H200 rates apply
    "checkpoint_read_gb_s": 2.0,  # per node, the block read once (the node's 8 workers share the page cache)
    "collective_gb_s": 150.0,  # NVLink reduce / broadcast, effective
    "routed_forward_efficiency": 0.5,  # the routed experts' forward at half the dense block's effective rate
    "checkpoint_bytes_per_weight": 2.0,  # bf16 checkpoint
    "store_write_gb_s": 2.0,  # the run's store on the node's local disk
    "gptq_output_bytes_per_weight": 0.5 + 2 / 128 + 0.5 / 128,  # W4 codes, fp16 scales and 4-bit zeros per 128
    "seq_len": 2048,
}

MODELS = {
    "DeepSeek-V3 671B": {
        "hidden": 7168,
        "expert": 2048,
        "experts": 256,
        "shared": 1,
        "top_k": 8,
        "moe_blocks": 58,
        "dense_blocks": 3,
        "dense_ffn": 18432,
        # MLA, 128 heads: q_a [1536×H], q_b [128·192×1536], kv_a [576×H], kv_b [128·256×512], o [H×128·128]
        "attention": [(7168, 1536), (1536, 24576), (7168, 576), (512, 32768), (16384, 7168)],
        "attention_inputs": [7168, 1536, 512, 16384],
        "heads": 128,
        "head_qk_v": 192 + 128,
        "embeddings": 2 * 129280 * 7168,
    },
    "Qwen3-235B-A22B": {
        "hidden": 4096,
        "expert": 1536,
        "experts": 128,
        "shared": 0,
        "top_k": 8,
        "moe_blocks": 94,
        "dense_blocks": 0,
        "dense_ffn": 0,
        # 64 query heads, 4 KV heads of 128: q [8192×H], k and v [512×H], o [H×8192]
        "attention": [(4096, 8192), (4096, 512), (4096, 512), (8192, 4096)],
        "attention_inputs": [4096, 8192],
        "heads": 64,
        "head_qk_v": 128 + 128,
        "embeddings": 2 * 151936 * 4096,
    },
}


def gptq_flops(k: int, rows: int) -> float:
    """FLOPs of a GPTQ solve of ``rows`` outputs over ``k`` inputs: the Cholesky, its inverse and the inverse's
    Cholesky, ≈ (1/3 + 2/3 + 1/3)·K³, and the lazy error propagation, Σ over 32-column blocks of
    2·rows·32·(K − end) ≈ rows·K²."""
    return 4 / 3 * k**3 + rows * k**2


def anchors() -> dict:
    """Effective rates on the H200 from the project's measurements."""
    block = json.loads((RESULTS / "block70b-h200.json").read_text())
    solve = {c["case"]: c for c in json.loads((RESULTS / "gpu-solve-h200.json").read_text())["cases"]}
    tokens, h, f = block["tokens"], block["hidden"], block["ffn"]
    stats_flops = 2 * tokens * (3 * h * h + f * f)  # Grams of the four stages' inputs (q/k/v, o, gate/up: H; down: F)
    gate_up = solve["70B gate+up 1/8 share, W4 g128 asym"]
    w8 = solve["K=2048 W8 per-channel"]
    forward_flops = tokens * 2 * (h * (h + 2 * 1024) + h * h + 3 * h * f)  # 70B: 64 q heads, 8 KV heads of 128
    return {
        "stats_flop_s": stats_flops / block["steps_s"]["statistics (Σ xᵀx fp64, 4 stages)"],
        "solve_flop_s": gptq_flops(gate_up["k"], gate_up["rows"]) / gate_up["graphs_s"],
        "subbatch_s": w8["graphs_s"] / math.ceil(w8["k"] / 32),  # a 32-column sub-batch's floor (launch bound)
        "forward_flop_s": forward_flops / block["projection"]["per_block_s"]["forward"],
        "fp32_matmul_flop_s": block["rates_tflops"]["fp32"] * 1e12,
    }


def solve_s(k: int, rows: int, a: dict) -> float:
    return max(gptq_flops(k, rows) / a["solve_flop_s"], math.ceil(k / 32) * a["subbatch_s"])


def block_params(m: dict, moe: bool) -> float:
    attn = sum(i * o for i, o in m["attention"])
    if not moe:
        return attn + 3 * m["hidden"] * m["dense_ffn"]
    return attn + (m["experts"] + m["shared"]) * 3 * m["hidden"] * m["expert"] + m["experts"] * m["hidden"]


def moe_block(m: dict, a: dict, measured: dict, tokens_per_gpu: int, budget: int) -> dict:
    """Seconds and memory of one MoE block on one of the 8 GPUs."""
    h, i, g = m["hidden"], m["expert"], ASSUMED["gpus"]
    routed = tokens_per_gpu * m["top_k"]
    expert_stats = 8 * (h * h + i * i)
    params = block_params(m, True)
    stats_flops = 2 * routed * (h * h + i * i) + 2 * tokens_per_gpu * (
        sum(k * k for k in m["attention_inputs"]) + m["shared"] * (h * h + i * i)
    )
    solves = (m["experts"] + m["shared"]) * (solve_s(h, 2 * i, a) + solve_s(i, h, a))
    solves += sum(solve_s(k, o, a) for k, o in m["attention"])
    # each result's output error terms (E·H)∘E and (W·H)∘W in fp32: 4·rows·K² per linear
    results = (m["experts"] + m["shared"]) * 4 * (2 * i * h * h + h * i * i) + sum(
        4 * o * k * k for k, o in m["attention"]
    )
    active = sum(k * o for k, o in m["attention"]) + (m["top_k"] + m["shared"]) * 3 * h * i
    attn_scores = 2 * m["heads"] * m["head_qk_v"] * ASSUMED["seq_len"]  # causal: half the window on average
    fwd_rate = a["forward_flop_s"] * ASSUMED["routed_forward_efficiency"]
    gb_s = ASSUMED["collective_gb_s"] * 1e9
    seconds = {
        "load": params * ASSUMED["checkpoint_bytes_per_weight"] / (ASSUMED["checkpoint_read_gb_s"] * 1e9),
        "stats": stats_flops / a["stats_flop_s"],
        "reduce": (m["experts"] + m["shared"]) * expert_stats / gb_s,
        "solve": solves / g,  # experts balanced over the 8 owners with the attention solves
        "results": results / a["fp32_matmul_flop_s"] / g,
        "broadcast": params * 4 / gb_s,  # the dequantized fp32 experts to every worker
        "store_write": params * measured["stored_bytes_per_weight"] / (ASSUMED["store_write_gb_s"] * 1e9),
        "forward": tokens_per_gpu * (2 * active + attn_scores) / fwd_rate,
    }
    held = min(budget, m["experts"]) * expert_stats
    return {
        "seconds": seconds,
        "block_s": sum(seconds.values()),
        "expert_gate_up_solve_s": solve_s(h, 2 * i, a),
        "expert_down_solve_s": solve_s(i, h, a),
        "block_fp32_gib": params * 4 / 2**30,
        "worker_gib": params * 4 * measured["memory_per_fp32_byte"] / 2**30 + held / 2**30,
        "stats_budget_gib": held / 2**30,
        "expert_stats_mib": expert_stats / 2**20,
    }


def dense_block_s(m: dict, a: dict, tokens_per_gpu: int) -> float:
    if not m["dense_blocks"]:
        return 0.0
    h, f = m["hidden"], m["dense_ffn"]
    params = block_params(m, False)
    stats = 2 * tokens_per_gpu * (sum(k * k for k in m["attention_inputs"]) + h * h + f * f) / a["stats_flop_s"]
    solves = sum(solve_s(k, o, a) for k, o in m["attention"]) + solve_s(h, 2 * f, a) + solve_s(f, h, a)
    load = params * ASSUMED["checkpoint_bytes_per_weight"] / (ASSUMED["checkpoint_read_gb_s"] * 1e9)
    return load + stats + solves / ASSUMED["gpus"] + tokens_per_gpu * 2 * params / a["forward_flop_s"]


def measured_from(run: dict) -> dict:
    """From the CPU run of the DeepSeek-V3-width block: peak RSS per fp32 byte of the block (the whole worker,
    Ray and torch included: an upper bound) and stored bytes per quantized weight."""
    a = run["args"]
    h, i, e = a["hidden"], a["expert_width"], a["experts"]
    mla = 7168 * 1536 + 1536 * a["heads"] * 192 + 7168 * 576 + 512 * a["heads"] * 256 + a["heads"] * 128 * 7168
    linears = mla + (e + 1) * 3 * h * i
    params = linears + e * h
    peak = (
        max(run["summary"]["peak_rss_mib_by_rank"].values()) * 2**20 - run["summary"]["statistics_held_max_mib"] * 2**20
    )
    return {"memory_per_fp32_byte": peak / (4 * params), "stored_bytes_per_weight": run["stored_bytes"] / linears}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(RESULTS / "moe-v3-run-cpu.json"))
    ap.add_argument("--tokens", type=int, default=256 * 2048, help="calibration tokens in all")
    ap.add_argument("--budget", type=int, default=32, help="quant.moe.max_expert_stats")
    ap.add_argument("--out", default=str(RESULTS / "moe-projection.json"))
    args = ap.parse_args()
    a = anchors()
    measured = measured_from(json.loads(Path(args.run).read_text()))
    per_gpu = args.tokens // ASSUMED["gpus"]
    out = {"assumed": ASSUMED, "anchors_h200": a, "measured_cpu": measured, "args": vars(args), "models": {}}
    for name, m in MODELS.items():
        blk = moe_block(m, a, measured, per_gpu, args.budget)
        dense = dense_block_s(m, a, per_gpu)
        quantized = m["moe_blocks"] * block_params(m, True) + m["dense_blocks"] * block_params(m, False)
        out["models"][name] = {
            "moe_block": blk,
            "dense_block_s": dense,
            "total_h": (m["moe_blocks"] * blk["block_s"] + m["dense_blocks"] * dense) / 3600,
            "run_store_gb": quantized * measured["stored_bytes_per_weight"] / 1e9,
            "gptq_output_gb": (quantized * ASSUMED["gptq_output_bytes_per_weight"] + 2 * m["embeddings"]) / 1e9,
            "fits_80gb": blk["worker_gib"] <= ASSUMED["gpu_memory_gib"] * 1e9 / 2**30,
        }
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
