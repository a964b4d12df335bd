"""Peak memory of one GPTQ solve beyond its inputs, in K² fp32 matrices (the solver's own
factorisation and copies; the row-chunk working set is bounded separately).

    .venv/bin/python -m benchmarks.solve_memory [--k 8192] [--rows 512] [--hessian-dtype float32]

Peak = VmHWM (reset once W and H exist) minus the RSS at that moment; one process per run.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine
from strata_quant.workers.gptq import gptq_quantize
from strata_quant.workers.result import QuantSpec


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--hessian-dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(2)
    k = args.k
    hessian = torch.randn(k, k)
    hessian = hessian @ hessian.t() / k  # positive definite (one temporary, before the reset)
    hessian = hessian.to(getattr(torch, args.hessian_dtype))
    weight = torch.randn(args.rows, k) * 0.02
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    t = time.perf_counter()
    gptq_quantize(weight, hessian, QuantSpec(bits=4, group_size=128, sym=False), act_order=True)
    seconds = time.perf_counter() - t
    peak = _status("VmHWM") - base
    matrix = k * k * 4 / 2**20
    print(f"machine: {machine()}")
    print(
        f"K={k} rows={args.rows} H {args.hessian_dtype}: peak beyond inputs {peak:.0f} MiB = "
        f"{peak / matrix:.2f} K² fp32 matrices ({matrix:.0f} MiB each); solve {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
