"""run.huge_pages on against off: the same run alternated, block-loop wall time and phases.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.huge_pages [--models smollm2,wide]
        [--modes float-overlap] [--workers 1] [--pairs 3]

Each pair runs the configuration with the workers' malloc on transparent huge pages
(``run.huge_pages: true``) and then without, one after the other in this script, workers
pinned to a core each as in benchmarks/scaling.py. The results are the same bytes; only
the time moves.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile

import ray

from benchmarks.common import CorePinner, machine, run_config
from benchmarks.scaling import MODES, wide_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2", help="comma list of smollm2, wide")
    ap.add_argument("--modes", default="float-overlap", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    models = {}
    for name in args.models.split(","):
        if name == "smollm2":
            models[name] = "fixture:smollm2-135m"
        elif name == "wide":
            models[name] = str(wide_model())
        else:
            raise SystemExit(f"unknown model {name!r}; pick from smollm2, wide")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    print(f"machine: {machine()}")
    print(f"calibration: {args.samples} × {args.seq_len} tokens of Emma; GPTQ W4 g64; W={args.workers}")
    for model, path in models.items():
        for mode in args.modes.split(","):
            propagate, quant, run = MODES[mode]
            for _ in range(args.pairs):
                for huge in (True, False):
                    store = tempfile.mkdtemp()
                    try:
                        with CorePinner():
                            outcome = run_config(
                                path,
                                store,
                                args.workers,
                                propagate,
                                args.samples,
                                args.seq_len,
                                run={**run, "huge_pages": huge},
                                allow_partial_group=True,
                                **quant,
                            )
                    finally:
                        shutil.rmtree(store, ignore_errors=True)
                    phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted(outcome.phase_s.items()))
                    print(
                        f"{model:8s} {mode:14s} huge_pages={str(huge):5s} loop {outcome.loop_s:6.1f} s  {phases}",
                        flush=True,
                    )
    ray.shutdown()


if __name__ == "__main__":
    main()
