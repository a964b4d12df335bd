"""W=2 against W=1 (one torch thread each), propagate float and quantized.

    .venv/bin/python benchmarks/scaling.py [--samples 16] [--seq-len 512]

Prints the block-loop wall time of each configuration and the speedup W=2 / W=1,
measured one after the other in this script on this machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import ray

from benchmarks.common import block_seconds, machine, run_config
from pipeline import fixtures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--models", default="smollm2,wide")
    args = ap.parse_args()
    models = {}
    if "smollm2" in args.models:
        models["SmolLM2-135M (576 wide, 30 blocks)"] = "fixture:smollm2-135m"
    if "wide" in args.models:
        wide = fixtures.synthetic_llama(
            fixtures.cache_dir() / "models" / "synthetic-1536x6",
            hidden=1536,
            intermediate=4096,
            layers=6,
            heads=12,
            kv_heads=4,
        )
        models["synthetic Llama (1536 wide, 6 blocks)"] = str(wide)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    print(f"machine: {machine()}")
    print(f"calibration: {args.samples} × {args.seq_len} tokens of Emma; GPTQ W4 g64; 1 torch thread per worker")
    print("float rows: all groups of a block solved at once; quantized (seq) rows: true-sequential stages")
    print(f"{'model':38s} {'propagate':10s} {'W=1 s':>8s} {'W=2 s':>8s} {'speedup':>8s}")
    for label, model in models.items():
        for propagate, quant in (("float", {"true_sequential": False}), ("quantized", {})):
            times = {}
            for w in (1, 2):
                tmp = Path(tempfile.mkdtemp(prefix="strata-bench-"))
                try:
                    outcome = run_config(model, str(tmp), w, propagate, args.samples, args.seq_len, **quant)
                    times[w] = block_seconds(outcome)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            name = propagate + ("" if quant else " (seq)")
            print(f"{label:38s} {name:10s} {times[1]:8.1f} {times[2]:8.1f} {times[1] / times[2]:7.2f}×", flush=True)


if __name__ == "__main__":
    main()
