"""One decoder block with Llama-70B shapes through strata's per-block path, on CPU or GPU.

    .venv/bin/python -m benchmarks.block70b [--scale 1.0] [--tokens 1024] [--threads 2]
    python3 -m benchmarks.block70b --device cuda --tokens 65536 --seq 2048 --json out.json

hidden 8192, 64 heads / 8 KV heads, FFN 28672 (``--scale`` shrinks every width for a dry
run). Random weights; the calibration is ``--tokens`` rows of random hidden states. Times
each step (block load from safetensors, statistics Σ xᵀx in the pipeline's float64, each
GPTQ solve, forward), reports peak memory, and projects a full 70B W4 run on 8 GPUs:

* on CPU from FLOP counts and stated H100 rates — a projection with assumed rates;
* on a GPU from the step times measured here at the projection's per-GPU token count
  (256 × 2048 calibration tokens over 8 GPUs = 65 536), so only the storage bandwidth and
  the interconnect (the Hessian reduction) remain assumptions — still a projection of a
  whole run, built from one block's measured steps.

With ``--device cuda`` it also measures the card's fp32 / tf32 / bf16 matrix rates and
checks that the CUDA GPTQ solve agrees with the CPU one on the same W and H.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import machine
from strata_quant.pipeline.checkpoint import nonfinite_count
from strata_quant.workers import gptq
from strata_quant.workers.awq import find_scale_groups, search_scales
from strata_quant.workers.block import StagePasses, block_linears, build_block, run_block, trace_block
from strata_quant.workers.gptq import gptq_quantize, relative_output_error
from strata_quant.workers.result import QuantSpec
from strata_quant.workers.stats import collect_hessians, collect_stats

# Assumptions for the CPU-side projection (H100 SXM, dense): stated, not measured
H100_FP32_TFLOPS = 50.0  # matmul for the Gram and GPTQ updates
H100_FP64_TFLOPS = 50.0  # fp64 tensor-core Cholesky (of 67 peak)
H100_BF16_TFLOPS = 400.0  # forward in bf16 (of ~990 peak)
# Assumptions that remain on a GPU run
STORAGE_GBPS = 2.0  # per node, reading the bf16 checkpoint from object storage / NVMe
INTERCONNECT_GBPS = 150.0  # NVLink all-reduce bus bandwidth per GPU for the Hessian reduction
PROJ_TOKENS = 256 * 2048
PROJ_GPUS = 8
PROJ_BLOCKS = 80


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Timer:
    """Wall time of a step; on a GPU the queued kernels are waited for at both ends."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.t


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Measured dense n³ matrix-product rate (mean of ``reps`` after three warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    with Timer(device) as t:
        for _ in range(reps):
            a @ b
    return 2 * n**3 * reps / t.seconds / 1e12


def solve_agreement(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec) -> dict:
    """The same GPTQ problem solved on the CPU and on ``w``'s device: share of equal codes
    and both relative output errors (codes may differ where the two roundings tie)."""
    out = {}
    results = {}
    for dev in ("cpu", str(w.device)):
        wd, hd = w.to(dev), h.to(dev)
        with Timer(torch.device(dev)) as t:
            results[dev] = gptq_quantize(wd, hd, spec, act_order=True, static_groups=True)
        approx = results[dev].dequantize().float().to(dev)
        out[dev] = {"seconds": t.seconds, "rel_error": relative_output_error(wd, approx, hd)}
    cpu_codes = results["cpu"].codes
    dev_codes = results[str(w.device)].codes.cpu()
    out["codes_equal"] = float((cpu_codes == dev_codes).float().mean())
    out["shape"] = list(w.shape)
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the measurements here too")
    ap.add_argument("--awq", action="store_true", help="also time AWQ's scale search per group (on by default on GPUs)")
    ap.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="GPU: the GPTQ column loop without CUDA graphs (one launch per call)",
    )
    return ap.parse_args()


def block_config(scale: float):
    """Llama-70B's decoder-layer config (hidden 8192, 64 / 8 heads, FFN 28672), every width times ``scale``."""
    from transformers import LlamaConfig

    def width(x: int, mult: int) -> int:
        return max(mult, int(x * scale) // mult * mult)

    heads, kv = 64, 8
    head_dim = 128 if scale == 1.0 else max(16, width(128, 16))
    cfg = LlamaConfig(
        hidden_size=heads * head_dim,
        intermediate_size=width(28672, 256),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=80,
        head_dim=head_dim,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def load_synthetic_block(cfg, tmp: str, gen: torch.Generator, device: torch.device, timer: Timer, steps: dict):
    """A random bf16 block written to safetensors, then loaded as a worker loads one (NaN/Inf check, fp32 on
    ``device``); both timed into ``steps``."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    t = time.perf_counter()
    with torch.device("meta"):
        meta = LlamaDecoderLayer(cfg, layer_idx=0)
    tensors = {n: (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16) for n, p in meta.named_parameters()}
    for n in tensors:
        if "norm" in n:
            tensors[n] = torch.ones_like(tensors[n])
    path = Path(tmp) / "block.safetensors"
    save_file(tensors, str(path))
    del tensors
    steps["write synthetic block (not part of a run)"] = time.perf_counter() - t

    with timer as t:
        loaded = load_file(str(path))
        # the checkpoint reader's NaN/Inf check, which every worker runs on every block it loads
        if any(nonfinite_count(v) for v in loaded.values() if v.is_floating_point()):
            raise SystemExit("the synthetic block holds NaN/Inf values")
        layer = build_block(meta, loaded, torch.float32).to(device)
        del loaded
    steps["load block (safetensors → fp32 on device)"] = t.seconds
    return layer


def calibration_batches(cfg, tokens: int, seq: int, gen: torch.Generator, device: torch.device) -> list:
    """``tokens`` random hidden states in batches of ``seq``, with the block's rotary embeddings."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(cfg).to(device)
    batches = []
    for _ in range(max(1, tokens // seq)):
        h = torch.randn(1, seq, cfg.hidden_size, generator=gen).to(device)
        pos = torch.arange(seq, device=device).unsqueeze(0)
        batches.append((h, {"position_embeddings": rotary(h, pos), "attention_mask": None, "position_ids": pos}))
    return batches


def time_full_passes(layer, batches, groups, timer: Timer, steps: dict) -> None:
    """Each stage's statistics from the block input (run.stage_cache: false)."""
    full_s = 0.0
    for names in groups:
        with timer as t:
            acc = collect_hessians(layer, batches, [names[0]], torch.float64, stop_early=True)
        full_s += t.seconds
        del acc  # one stage's statistics at a time, as a run holds them
    steps["statistics (Σ xᵀx fp64, 4 stages, full passes)"] = full_s
    print(f"statistics (full passes) done in {full_s:.2f} s", flush=True)


def time_solves(layer, batches, groups, linears, spec: QuantSpec, passes, timer: Timer, steps: dict):
    """Each stage's statistics (from the kept inputs with ``passes``), its GPTQ solve whole and its 1/8 share.
    Returns ({solve: FLOPs of updates, of the fp64 factorisations}, {solve: share seconds}, an o_proj problem)."""
    flops, solves, check_input = {}, {}, None
    stats_s = 0.0
    for names in groups:
        with timer as t:
            acc = collect_hessians(layer, batches, [names[0]], torch.float64, True, passes).pop(names[0])
        stats_s += t.seconds
        h = acc.sum.mul_(2.0 / acc.count).float()  # H = 2·S/n, in fp32 as the solver takes it
        del acc
        w = torch.cat([linears[n].weight.data for n in names])
        with timer as t:
            gptq_quantize(w, h, spec, act_order=True, static_groups=True)
        key = f"GPTQ solve {'+'.join(n.split('.')[-1] for n in names)} [{w.shape[0]}×{w.shape[1]}]"
        steps[key] = t.seconds
        print(f"{key} done in {t.seconds:.2f} s; peak RSS {peak_rss_gib():.1f} GiB", flush=True)
        # split solves: with 8 workers each solves 1/8 of the rows (the same H, its own Cholesky)
        share = w[: max(1, w.shape[0] // PROJ_GPUS)]
        with timer as t:
            gptq_quantize(share, h, spec, act_order=True, static_groups=True)
        steps[f"  its 1/{PROJ_GPUS} share [{share.shape[0]}×{share.shape[1]}]"] = solves[key] = t.seconds
        n_rows, k = w.shape
        flops[key] = (2 * n_rows * k * k, 3 * k**3 / 3 * 2)  # updates; Cholesky + inverse + Cholesky (fp64)
        if "o_proj" in key:
            check_input = (w[:1024, :2048].clone(), h[:2048, :2048].clone())
        del w, h
    steps["statistics (Σ xᵀx fp64, 4 stages)"] = stats_s
    print(f"statistics (stage passes) done in {stats_s:.2f} s", flush=True)
    return flops, solves, check_input


def time_forwards(layer, batches, passes, timer: Timer, steps: dict, report: dict) -> None:
    """The full block's forward, and the propagation a run does from the kept inputs (which must equal it)."""
    if passes is not None:
        passes.close()  # keep what was seen; the forwards below must not overwrite it
    with timer as t, torch.no_grad():
        full_out = [run_block(layer, hid, kw) for hid, kw in batches]
    steps["forward (fp32, full block)"] = t.seconds
    if passes is None:
        steps["forward (fp32)"] = steps["forward (fp32, full block)"]
        return
    with timer as t:
        kept_out = [passes.forward(i, hid, kw) for i, (hid, kw) in enumerate(batches)]
    steps["forward (fp32)"] = t.seconds  # the propagation a run does, from the kept inputs
    report["stage_forward_equal"] = all(torch.equal(a, b) for a, b in zip(full_out, kept_out))
    print(f"forward from kept inputs equals the full forward: {report['stage_forward_equal']}")


def time_awq(layer, batches, linears, spec: QuantSpec, timer: Timer, steps: dict) -> None:
    """AWQ: Σ xᵀx and mean|x| per group on the float block, then the 20-point scale search (the groups and the
    ops that absorb 1/s found from the block's code, as a run finds them)."""
    sample, kwargs = batches[0]
    groups, _ = find_scale_groups(layer, trace_block(layer, sample, kwargs), sample, kwargs)
    for group in groups:
        leader = group.linears[0]
        with timer as t:
            grams, means = collect_stats(layer, batches, [leader], torch.float64, True, abs_means=True)
        stats_s = t.seconds
        w = torch.cat([linears[n].weight.data for n in group.linears])
        with timer as t:
            found = search_scales(w, grams[leader].sum, means[leader].mean(), spec, grid=20, expand=group.expand)
        short = "+".join(n.split(".")[-1] for n in group.linears)
        steps[f"AWQ statistics {short}"] = stats_s
        steps[f"AWQ scale search {short} [{w.shape[0]}×{w.shape[1]}] (α={found.alpha:.2f})"] = t.seconds
        print(f"AWQ {short}: search {t.seconds:.2f} s", flush=True)
        del grams, means, w


def gpu_rates(device: torch.device, report: dict, spec: QuantSpec, check_input) -> None:
    """On a GPU: the card's fp32 / bf16 / tf32 matrix rates, and the CPU and GPU solves compared (the caller
    drops the block and batches first: the rate runs need the memory)."""
    report["rates_tflops"] = {
        "fp32": matmul_tflops(device, torch.float32),
        "bf16": matmul_tflops(device, torch.bfloat16),
    }
    torch.backends.cuda.matmul.allow_tf32 = True
    report["rates_tflops"]["tf32"] = matmul_tflops(device, torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    if check_input is not None:
        report["cpu_vs_gpu_solve"] = solve_agreement(*check_input, spec)


def projection(args, device, where: str, params: int, linears, groups, steps, flops, solves) -> dict:
    """A full 70B W4 run on 8 GPUs from this block's steps (GPU) or from FLOPs at assumed rates (CPU), printed."""
    load = params * 2 / (STORAGE_GBPS * 1e9)  # every worker reads the block (bf16)
    hessian_bytes = sum(8 * linears[g[0]].in_features ** 2 for g in groups)
    reduce = 2 * hessian_bytes / (INTERCONNECT_GBPS * 1e9)  # ring all-reduce moves ~2× the data
    per_gpu = PROJ_TOKENS / PROJ_GPUS
    if device.type == "cuda":
        scale = per_gpu / args.tokens  # step times grow linearly with tokens
        stats = steps["statistics (Σ xᵀx fp64, 4 stages)"] * scale
        fwd = steps["forward (fp32)"] * scale
        # true-sequential stages follow each other; within a stage the 8 GPUs solve a share each
        solve = sum(solves.values())
        basis = f"measured on {where} ({args.tokens} tokens, scaled ×{scale:.2f} to {per_gpu:.0f} per GPU)"
    else:
        fwd = 2 * params * per_gpu / (H100_BF16_TFLOPS * 1e12)
        stats = fwd + sum(2 * per_gpu * linears[g[0]].in_features ** 2 for g in groups) / (H100_FP32_TFLOPS * 1e12)
        solve = sum(u / (H100_FP32_TFLOPS * 1e12) + c / (H100_FP64_TFLOPS * 1e12) for u, c in flops.values())
        basis = (
            f"assumed rates: {H100_BF16_TFLOPS} TFLOPS bf16 forward, {H100_FP32_TFLOPS} TFLOPS fp32 "
            f"Gram/GPTQ, {H100_FP64_TFLOPS} TFLOPS fp64 Cholesky; solves serialised (conservative)"
        )
    per_block = load + stats + reduce + solve + fwd  # load is hidden by prefetch in a run; counted anyway
    total_min = PROJ_BLOCKS * per_block / 60
    print(
        f"\nprojection (NOT a measured 70B run) for Llama-70B W4 g128 GPTQ on {PROJ_GPUS} GPUs, "
        f"256 × 2048 tokens, propagate=quantized:"
    )
    print(
        f"  per block: load {load:.2f}s + statistics {stats:.2f}s + Hessian reduce {reduce:.2f}s "
        f"+ solves {solve:.2f}s + forward {fwd:.2f}s = {per_block:.1f}s; "
        f"{PROJ_BLOCKS} blocks ≈ {total_min:.0f} min"
    )
    print(f"  basis: {basis}")
    print(
        f"  assumed: {STORAGE_GBPS} GB/s checkpoint reads per node, {INTERCONNECT_GBPS} GB/s all-reduce "
        "bandwidth for the fp64 Hessians"
    )
    return {
        "per_block_s": {"load": load, "stats": stats, "reduce": reduce, "solve": solve, "forward": fwd},
        "total_min": total_min,
        "basis": basis,
    }


def main() -> None:
    args = parse_args()
    if args.no_cuda_graphs:
        gptq.CUDA_GRAPHS_DEFAULT = False
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = block_config(args.scale)
    hidden, ffn, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} torch threads"
    print(f"machine: {machine()}; device: {where}", flush=True)
    print(f"block: hidden {hidden}, heads {heads}/{kv}, FFN {ffn}; {args.tokens} calibration tokens", flush=True)
    report: dict = {"device": where, "hidden": hidden, "ffn": ffn, "tokens": args.tokens, "seq": args.seq}
    steps: dict[str, float] = {}
    timer = Timer(device)
    with tempfile.TemporaryDirectory() as tmp:
        gen = torch.Generator().manual_seed(0)
        layer = load_synthetic_block(cfg, tmp, gen, device, timer, steps)
        params = sum(p.numel() for p in layer.parameters())
        batches = calibration_batches(cfg, args.tokens, args.seq, gen, device)
        groups = [list(g) for g in trace_block(layer, *batches[0]).groups]  # the shared-input groups
        time_full_passes(layer, batches, groups, timer, steps)
        # the run's default: each pass starts from what the previous one kept (workers/block.py);
        # the weights stay float here, so the kept inputs stay valid exactly as in a run. As in a
        # run, a stage's statistics are formed, solved and dropped before the next stage's pass.
        passes = StagePasses(layer, len(batches)) if StagePasses.applies(layer, [[g] for g in groups]) else None
        linears = block_linears(layer)
        spec = QuantSpec(4, 128, True)
        flops, solves, check_input = time_solves(layer, batches, groups, linears, spec, passes, timer, steps)
        time_forwards(layer, batches, passes, timer, steps, report)
        del passes
        if args.awq or device.type == "cuda":
            time_awq(layer, batches, linears, spec, timer, steps)
        if device.type == "cuda":
            with timer as t, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                for hid, kw in batches:
                    layer(hid, **kw)
            steps["forward (bf16 autocast, for reference)"] = t.seconds
            report["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            del batches, layer
            torch.cuda.empty_cache()
            gpu_rates(device, report, spec, check_input)

    print(f"{'step':64s} {'seconds':>9s}")
    for k, v in steps.items():
        print(f"{k:64s} {v:9.2f}")
    report["steps_s"] = steps
    report["cuda_graphs"] = device.type == "cuda" and gptq.CUDA_GRAPHS_DEFAULT
    report["peak_rss_gib"] = peak_rss_gib()
    report["block_params_m"] = params / 1e6
    print(f"peak RSS: {peak_rss_gib():.1f} GiB; block parameters {params / 1e6:.0f} M")
    for k in ("gpu_peak_gib", "rates_tflops", "cpu_vs_gpu_solve"):
        if k in report:
            print(f"{k}: {report[k]}")
    if args.scale == 1.0:
        report["projection"] = projection(args, device, where, params, linears, groups, steps, flops, solves)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
