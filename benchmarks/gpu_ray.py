"""The whole Ray path with ``run.device: cuda`` on a machine with a GPU: Ray places the worker
on the GPU (``num_gpus=1``), the worker forms its NCCL group, solves there and streams to the
local store; the same job on the CPU (gloo) is the reference.

    python -m benchmarks.gpu_ray --model DIR --text FILE --json OUT.json [--gpus N]

Checks (each printed, and a non-zero exit when one fails):
- the CUDA run completes and its records say where it ran (peak GPU memory per rank);
- its codes agree with the CPU run's (share of equal int codes, per linear and overall) and
  its output errors are within 2 % of the CPU's;
- AWQ+GPTQ with ``propagate: float`` (queued solves) completes on the GPU;
- a run asking for more GPU workers than the cluster has is refused before any block.

A device machine without Ray or pydantic gets them carried (the Ray wheel, 79 MB, is over a
call's 64 MiB, so it travels as a trimmed tar.xz: no jars, dashboard build, rllib, tune,
train, serve, data, llm; 28 MB): cp312 wheels of pydantic, pydantic-core, annotated-types,
typing-inspection, jsonschema, jsonschema-specifications, referencing and rpds-py in .whl/,
installed with ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` and the Ray
tree unpacked into /tmp/site. Result of the run on an H200: benchmarks/results/gpu-ray-h200.*.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from strata_quant.pipeline.assemble import ResultSource
from strata_quant.pipeline.config import parse_config
from strata_quant.pipeline.run import RunError, run_job


def job(tmp: Path, name: str, model: str, text: str, device: str, workers: int = 1, run=None, **quant) -> dict:
    return {
        "name": name,
        "model": model,
        "calibration": {"source": text, "num_samples": 32, "seq_len": 128},
        "quant": {"method": "gptq", "bits": 4, "group_size": 64, "allow_partial_group": True, **quant},
        "run": {
            "workers": workers,
            "batch_size": 8,
            "store": str(tmp / name / "store"),
            "device": device,
            **(run or {}),
        },
        "output": {"dir": str(tmp / name / "out"), "formats": []},
        "eval": None,
    }


def codes(outcome) -> dict[str, torch.Tensor]:
    source = ResultSource(outcome.store, outcome.records)
    return {name: source.get(name).codes for name in sorted(source.entries)}


def errors(outcome) -> dict[str, float]:
    return {e["name"]: e["output_rel_error"] for r in outcome.records.values() for e in r["results"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--tmp", default="/tmp/strata-gpu-ray")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")
    gpus = ray.cluster_resources().get("GPU", 0)
    report: dict = {"machine": machine(), "cluster_gpus": gpus, "checks": {}}
    print(f"Ray cluster: {ray.cluster_resources()}")
    tmp = Path(args.tmp)
    failed = []

    def check(name: str, ok: bool, detail) -> None:
        report["checks"][name] = {"ok": bool(ok), "detail": detail}
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}")
        if not ok:
            failed.append(name)

    runs = {}
    for device in ("cpu", "cuda"):
        cfg = parse_config(job(tmp, f"gptq-{device}", args.model, args.text, device, act_order=True))
        t = time.perf_counter()
        runs[device] = run_job(cfg, progress=False)
        report[f"gptq_{device}_wall_s"] = time.perf_counter() - t
        print(f"gptq on {device}: {report[f'gptq_{device}_wall_s']:.1f} s")
    gpu_records = runs["cuda"].records.values()
    peaks = [r.get("peak_gpu_mib", {}) for r in gpu_records]
    check("records carry peak GPU memory", all(p and min(p.values()) > 0 for p in peaks), peaks[:2])

    cpu_codes, gpu_codes = codes(runs["cpu"]), codes(runs["cuda"])
    equal = {n: (cpu_codes[n] == gpu_codes[n]).float().mean().item() for n in cpu_codes}
    overall = sum((cpu_codes[n] == gpu_codes[n]).sum().item() for n in cpu_codes) / sum(
        c.numel() for c in cpu_codes.values()
    )
    check(
        "codes equal to the CPU run's (≥ 90 % overall)",
        overall >= 0.90,
        f"{overall:.4f}; min {min(equal.values()):.4f}",
    )
    e_cpu, e_gpu = errors(runs["cpu"]), errors(runs["cuda"])
    ratio = sum(e_gpu.values()) / sum(e_cpu.values())
    check("output errors within 2 % of the CPU's", abs(ratio - 1) <= 0.02, f"sum ratio {ratio:.5f}")
    report["codes_equal"] = equal
    report["output_error_ratio"] = ratio

    run = {"propagate": "float"}
    cfg = parse_config(job(tmp, "awq-gptq-float", args.model, args.text, "cuda", run=run, method="awq_gptq", sym=False))
    t = time.perf_counter()
    outcome = run_job(cfg, progress=False)
    report["awq_gptq_float_cuda_wall_s"] = time.perf_counter() - t
    check(
        "AWQ+GPTQ, propagate float, on the GPU", len(errors(outcome)) == len(e_cpu), f"{len(errors(outcome))} linears"
    )

    want = int(gpus) + 1
    try:
        run_job(parse_config(job(tmp, "too-many", args.model, args.text, "cuda", workers=want)), progress=False)
        check(f"{want} GPU workers on {gpus:g} GPUs refused", False, "the run started")
    except RunError as err:
        check(f"{want} GPU workers on {gpus:g} GPUs refused", "GPU" in str(err), str(err))

    ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
