"""Worker peak RSS against run.hidden_dtype (and propagate float's queued solves).

    .venv/bin/python -m benchmarks.hidden_dtype [--samples 128] [--seq-len 512] [--layers 4]

A synthetic Llama as wide as SmolLM2 (576, FFN 1536), 1 worker, so the worker holds all
the calibration hidden states (samples × seq-len × 576 values per copy). The peak RSS is the
worker's ru_maxrss from the block records (the largest over blocks), one run per row, in
this script. Also prints the relative output error summed over the linears, against fp32.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import ray

from benchmarks.common import machine
from strata_quant.pipeline import fixtures

# glibc's adaptive mmap threshold makes peak RSS depend on the order of frees (±150 MiB run to
# run here); a fixed threshold returns every large buffer to the OS when freed, so peaks repeat
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

ROWS = [
    ("quantized", "float32", {}),
    ("quantized", "float16", {}),
    ("quantized", "bfloat16", {}),
    ("float", "float32", {"overlap_depth": 2}),
    ("float", "bfloat16", {"overlap_depth": 2}),
]


ISOLATED = """
import resource, sys, torch
torch.set_num_threads(1)
dtype, samples, seq_len, batch = getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 8
torch.manual_seed(0)
# the worker's loop without Ray or a checkpoint: hidden states kept in dtype, each block's forward in fp32
batches = [torch.randn(batch, seq_len, 576).to(dtype) for _ in range(samples // batch)]
lin_in, lin_out = torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576)
with torch.no_grad():
    for _ in range(3):
        batches = [(h.float() + lin_out(torch.relu(lin_in(h.float())))).to(dtype) for h in batches]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def isolated(samples: int, seq_len: int) -> None:
    """Peak RSS of a fresh process that only keeps and advances the hidden states (no Ray, no
    checkpoint pages, no solver): what the setting itself saves."""
    import os
    import subprocess
    import sys

    print(f"isolated: {samples} × {seq_len} × 576 hidden states advanced through 3 fp32 MLP blocks")
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    for dtype in ("float32", "float16", "bfloat16"):
        out = subprocess.run(
            [sys.executable, "-c", ISOLATED, dtype, str(samples), str(seq_len)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        print(f"  {dtype:9s} peak RSS {int(out.stdout.split()[-1]):6d} MiB", flush=True)


def main() -> None:
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import run_job

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--isolated", action="store_true", help="only the isolated hidden-state measurement")
    args = ap.parse_args()
    isolated(args.samples, args.seq_len)
    if args.isolated:
        return
    model = fixtures.synthetic_llama(
        fixtures.cache_dir() / "models" / f"synthetic-576x{args.layers}",
        hidden=576,
        intermediate=1536,
        layers=args.layers,
        heads=9,
        kv_heads=3,
    )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": MALLOC_ENV})
    one_copy = args.samples * args.seq_len * 576 * 4 / 2**20
    print(f"machine: {machine()}")
    print(f"synthetic Llama 576 wide × {args.layers} blocks; 1 worker; {args.samples} × {args.seq_len} tokens")
    print(f"one fp32 copy of the hidden states: {one_copy:.0f} MiB")
    print(f"{'propagate':10s} {'hidden':9s} {'worker peak MiB':>16s} {'Σ output rel. error':>20s}")
    errors = {}
    for propagate, hidden, run in ROWS:
        tmp = Path(tempfile.mkdtemp(prefix="strata-hid-"))
        try:
            cfg = parse_config(
                {
                    "name": "hid",
                    "model": str(model),
                    "calibration": {
                        "source": "fixture:austen/emma",
                        "num_samples": args.samples,
                        "seq_len": args.seq_len,
                    },
                    "quant": {"method": "gptq", "bits": 4, "group_size": 64},
                    "run": {
                        "workers": 1,
                        "propagate": propagate,
                        "hidden_dtype": hidden,
                        "batch_size": 8,
                        "store": str(tmp),
                        "threads_per_worker": 1,
                        **run,
                    },
                    "output": {"formats": ["gptq"]},
                    "eval": None,
                }
            )
            outcome = run_job(cfg, progress=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        peak = max(max(r["peak_rss_mib"].values()) for r in outcome.records.values())
        err = sum(e["output_rel_error"] for r in outcome.records.values() for e in r["results"])
        errors[(propagate, hidden)] = err
        print(f"{propagate:10s} {hidden:9s} {peak:16.0f} {err:20.5f}", flush=True)


if __name__ == "__main__":
    main()
