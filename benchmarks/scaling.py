"""W=2 against W=1 (one torch thread each): propagate float (solves inline, or queued behind the
forward) and quantized (true-sequential).

    .venv/bin/python -m benchmarks.scaling [--samples 16] [--seq-len 512] [--models smollm2,wide]
                                           [--modes float-inline,float-overlap,quantized] [--no-pin]
                                           [--repeat 1]

Prints the block-loop wall time of each configuration (first block started → last record
written, ``RunOutcome.loop_s``), the speedup W=1 / W=2, and the workers' summed CPU phases,
measured one after the other in this script on this machine. Each worker is confined to a
core of its own (``--no-pin`` leaves them free), so that "one torch thread each" also holds
for float-overlap, whose solver thread would otherwise take the idle second core at W=1.
``--models tiny`` is a dry run on the 3-block test model (seconds). ``--repeat N`` measures each
configuration N times (W=1 then W=2, N pairs in a row) and adds a line with the median of the
pairs' speedups and their range: one pair moves by up to ±0.1 on this shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
from pathlib import Path

import ray

from benchmarks.common import CorePinner, machine, run_config
from strata_quant.pipeline import fixtures

# name → (propagate, quant overrides, run overrides)
MODES = {
    "float-inline": ("float", {"true_sequential": False}, {"overlap_depth": 0}),
    "float-overlap": ("float", {"true_sequential": False}, {"overlap_depth": 2}),  # deferred (auto, CPU)
    "float-thread": ("float", {"true_sequential": False}, {"overlap_depth": 2, "overlap_mode": "thread"}),
    "quantized": ("quantized", {}, {}),
    # before split solves: each group solved whole by one owner (run.split_solves: false)
    "quantized-owner": ("quantized", {}, {"split_solves": False}),
    "float-inline-owner": ("float", {"true_sequential": False}, {"overlap_depth": 0, "split_solves": False}),
}


def wide_model() -> Path:
    """The synthetic wider Llama of the scaling benchmarks (1536 wide, FFN 4096, 6 blocks), cached."""
    return fixtures.synthetic_llama(
        fixtures.cache_dir() / "models" / "synthetic-1536x6",
        hidden=1536,
        intermediate=4096,
        layers=6,
        heads=12,
        kv_heads=4,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--models", default="smollm2,wide", help="comma list of smollm2, wide, tiny")
    ap.add_argument("--modes", default="float-inline,float-overlap,quantized", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="leave the workers unpinned (by default each is confined to a core of its own)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="pairs (W=1, W=2) per configuration; >1 adds a median")
    args = ap.parse_args()
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; pick from {list(MODES)}")
    models = {}
    if "smollm2" in args.models:
        models["SmolLM2-135M (576 wide, 30 blocks)"] = "fixture:smollm2-135m"
    if "wide" in args.models:
        models["synthetic Llama (1536 wide, 6 blocks)"] = str(wide_model())
    if "tiny" in args.models:
        models["tiny Llama (test fixture, 3 blocks)"] = str(fixtures.tiny_llama())
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    print(f"machine: {machine()}")
    print(f"calibration: {args.samples} × {args.seq_len} tokens of Emma; GPTQ W4 g64; 1 torch thread per worker")
    print("float modes: all groups of a block solved at once (one stage); quantized: true-sequential stages")
    if args.no_pin:
        print("workers unpinned: a worker's solver thread (float-overlap) may use a second core")
    else:
        print("each worker confined to a core of its own (all its threads): W workers use W cores")
    print("time: block loop wall s (RunOutcome.loop_s); phases: per-worker seconds summed over blocks, W=2")
    print(f"{'model':38s} {'mode':18s} {'W=1 s':>8s} {'W=2 s':>8s} {'speedup':>8s}  phases (W=2)")
    for label, model in models.items():
        for mode in modes:
            propagate, quant, run = MODES[mode]
            speedups = []
            for _ in range(args.repeat):
                times, phases = {}, {}
                for w in (1, 2):
                    tmp = Path(tempfile.mkdtemp(prefix="strata-bench-"))
                    try:
                        with contextlib.nullcontext() if args.no_pin else CorePinner():
                            outcome = run_config(
                                model, str(tmp), w, propagate, args.samples, args.seq_len, run=run,
                                allow_partial_group=True, **quant,
                            )  # fmt: skip
                        times[w], phases[w] = outcome.loop_s, outcome.phase_s
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
                speedups.append(times[1] / times[2])
                shown = ", ".join(f"{k} {v:.1f}" for k, v in sorted(phases[2].items()))
                print(
                    f"{label:38s} {mode:18s} {times[1]:8.1f} {times[2]:8.1f} {speedups[-1]:7.2f}×  {shown}",
                    flush=True,
                )
                shown = ", ".join(f"{k} {v:.1f}" for k, v in sorted(phases[1].items()))
                print(f"{'':38s} {'':18s} {'':8s} {'':8s} {'':8s}  phases (W=1): {shown}", flush=True)
            if args.repeat > 1:
                print(
                    f"{label:38s} {mode:18s} median of {args.repeat} pairs {statistics.median(speedups):.2f}× "
                    f"(range {min(speedups):.2f}–{max(speedups):.2f}×)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
