"""One decoder block with Llama-70B shapes through strata's per-block path on this CPU.

    .venv/bin/python benchmarks/block70b.py [--scale 1.0] [--tokens 1024] [--threads 2]

hidden 8192, 64 heads / 8 KV heads, FFN 28672 (``--scale`` shrinks every width for a
dry run). Random weights; the calibration is ``--tokens`` rows of random hidden states.
Times each step (block load from safetensors, statistics, each GPTQ solve, forward),
reports peak RSS, and projects a full 70B W4 run on 8×H100 from FLOP counts with the
stated assumptions — a projection, not a measurement.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import machine
from workers.actor import collect_hessians
from workers.block import block_linears, build_block, shared_input_groups
from workers.gptq import gptq_quantize
from workers.result import QuantSpec

# Assumptions for the projection (H100 SXM, dense, no sparsity): stated, not measured
H100_FP32_TFLOPS = 50.0  # TF32 matmul effective for the Gram and GPTQ updates (of ~400 peak)
H100_FP64_TFLOPS = 50.0  # fp64 tensor-core Cholesky (of 67 peak)
H100_BF16_TFLOPS = 400.0  # forward in bf16 (of ~990 peak)
STORAGE_GBPS = 2.0  # per node, reading the bf16 checkpoint from object storage / NVMe


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    def width(x: int, mult: int) -> int:
        return max(mult, int(x * args.scale) // mult * mult)

    heads, kv = 64, 8
    head_dim = 128 if args.scale == 1.0 else max(16, width(128, 16))
    hidden = heads * head_dim
    ffn = width(28672, 256)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=80,
        head_dim=head_dim,
    )
    cfg._attn_implementation = "sdpa"
    print(f"machine: {machine()}, torch threads {args.threads}")
    print(f"block: hidden {hidden}, heads {heads}/{kv}, FFN {ffn}; {args.tokens} calibration tokens")
    steps: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with torch.device("meta"):
            meta = LlamaDecoderLayer(cfg, layer_idx=0)
        gen = torch.Generator().manual_seed(0)
        tensors = {
            n: (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16) for n, p in meta.named_parameters()
        }
        for n in tensors:
            if "norm" in n:
                tensors[n] = torch.ones_like(tensors[n])
        path = Path(tmp) / "block.safetensors"
        save_file(tensors, str(path))
        del tensors
        steps["write synthetic block (not part of a run)"] = time.perf_counter() - t

        t = time.perf_counter()
        layer = build_block(meta, load_file(str(path)), torch.float32)
        steps["load block (safetensors → fp32)"] = time.perf_counter() - t
        params = sum(p.numel() for p in layer.parameters())

        seq = 512
        batches = []
        rotary = LlamaRotaryEmbedding(cfg)
        for _ in range(max(1, args.tokens // seq)):
            h = torch.randn(1, seq, hidden, generator=gen)
            pos = torch.arange(seq).unsqueeze(0)
            batches.append((h, {"position_embeddings": rotary(h, pos), "attention_mask": None, "position_ids": pos}))

        t = time.perf_counter()
        groups = shared_input_groups(layer, *batches[0])
        accs = {}
        for names in groups:
            accs.update(collect_hessians(layer, batches, [names[0]], torch.float32, stop_early=True))
        steps["statistics (Σ xᵀx, 4 stages)"] = time.perf_counter() - t

        linears = block_linears(layer)
        spec = QuantSpec(4, 128, True)
        flops = {}
        for names in groups:
            w = torch.cat([linears[n].weight.data for n in names])
            h = accs[names[0]].hessian()
            t = time.perf_counter()
            gptq_quantize(w, h, spec, act_order=True, static_groups=True)
            key = f"GPTQ solve {'+'.join(n.split('.')[-1] for n in names)} [{w.shape[0]}×{w.shape[1]}]"
            steps[key] = time.perf_counter() - t
            n_rows, k = w.shape
            flops[key] = (2 * n_rows * k * k, 3 * k**3 / 3 * 2)  # updates; Cholesky + inverse + Cholesky (fp64)
            del w, h

        t = time.perf_counter()
        with torch.no_grad():
            for hid, kw in batches:
                layer(hid, **kw)
        steps["forward"] = time.perf_counter() - t

    print(f"{'step':52s} {'seconds':>9s}")
    for k, v in steps.items():
        print(f"{k:52s} {v:9.2f}")
    print(f"peak RSS: {peak_rss_gib():.1f} GiB; block parameters {params / 1e6:.0f} M")

    if args.scale == 1.0:
        # projection: 80 blocks, 8 GPUs, 256 × 2048 calibration tokens, propagate=quantized
        tokens = 256 * 2048
        fwd = 2 * params * tokens / (H100_BF16_TFLOPS * 1e12) / 8  # samples sharded over 8 GPUs
        gram = sum(2 * tokens * linears[g[0]].in_features ** 2 for g in groups) / (H100_FP32_TFLOPS * 1e12) / 8
        solve = sum(u / (H100_FP32_TFLOPS * 1e12) + c / (H100_FP64_TFLOPS * 1e12) for u, c in flops.values())
        load = params * 2 / (STORAGE_GBPS * 1e9)  # every worker reads the block (bf16)
        per_block = load + 2 * fwd + gram + solve  # stages serialise the solves (conservative)
        print("\nprojection (NOT a measurement) for Llama-70B W4 g128 GPTQ on 8×H100, 256 × 2048 tokens:")
        print(
            f"  per block: load {load:.1f}s + forward {2 * fwd:.1f}s + statistics {gram:.2f}s + solves {solve:.1f}s "
            f"= {per_block:.1f}s; 80 blocks ≈ {80 * per_block / 60:.0f} min"
        )
        print(
            f"  assumptions: {H100_BF16_TFLOPS} TFLOPS bf16 forward, {H100_FP32_TFLOPS} TFLOPS tf32 GPTQ/Gram, "
            f"{H100_FP64_TFLOPS} TFLOPS fp64 Cholesky, {STORAGE_GBPS} GB/s checkpoint reads per node"
        )


if __name__ == "__main__":
    main()
