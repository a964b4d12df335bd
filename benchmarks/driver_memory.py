"""Peak RSS of the driver over a whole job (run + assemble + verify + eval) as the model deepens.

    .venv/bin/python -m benchmarks.driver_memory                      # synthetic 576-wide Llama, 4 and 32 blocks
    .venv/bin/python -m benchmarks.driver_memory --config configs/llama-70b-gptq-w4g128.yaml \\
        --hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8 --layers 2 --set quant.method=rtn

Each depth runs in a fresh process (so each peak is its own): a synthetic Llama (random fp16
weights, SmolLM2's tokenizer, pipeline.fixtures.synthetic_llama) goes through
``pipeline.job.run_full_job`` with GPTQ + GGUF output and a held-out eval. Reported: the
driver's peak RSS (getrusage, the whole process life, Ray's driver-side threads included), the
workers' and the publishing task's peaks (sampled every 50 ms), and the phase times. With
``--config`` the job is that config with the synthetic model, a local store and output folder,
the calibration and eval shrunk to fit the machine (``--set`` overrides more keys).

Before each job, ``strata check`` runs on the same config in a process of its own (its peak,
the plan's block-structure probe included, is reported beside the driver's). The plan traces
a layer wider than ``pipeline.probe.IN_PLACE_BYTES`` in a child process; ``--trace-in-driver``
traces it in the driver instead, the way it was done before, for the comparison.
``--plan-only`` runs only the plan's checks (``preflight.check_job``, what ``strata check`` and
the start of every job run) in the measured process: the driver's peak before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def job_config(args, model: Path, tmp: Path) -> dict:
    if args.config:
        data = yaml.safe_load(Path(args.config).read_text())
    else:
        data = {"name": "mem", "quant": {"method": "gptq", "bits": 4, "group_size": 64}}
    data["model"] = str(model)
    data["calibration"] = {"source": "fixture:austen/emma", "num_samples": args.samples, "seq_len": args.seq_len}
    data["run"] = {
        **data.get("run", {}),
        "workers": args.workers,
        "batch_size": 4,
        "store": str(tmp / "store"),
        "threads_per_worker": 1,
    }
    data.setdefault("quant", {})
    data["output"] = {
        **data.get("output", {}),
        "dir": str(tmp / "out"),
        "formats": ["gptq", "gguf"],
        "gguf_tokenizer_pre": "smollm",  # the synthetic model carries SmolLM2's tokenizer
        "overwrite": True,
    }
    data["eval"] = {"text": "fixture:austen/persuasion", "windows": args.eval_windows, "seq_len": args.seq_len}
    for pair in args.set:
        key, value = pair.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return data


def synthetic(args) -> Path:
    from strata_quant.pipeline import fixtures

    layers = args.layers[0]
    name = f"synthetic-{args.hidden}x{layers}-ffn{args.intermediate}"
    return fixtures.synthetic_llama(
        fixtures.cache_dir() / "models" / name,
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
    )


def one(args) -> dict:
    """One job in this process (the model written beforehand by another: its peak is not the driver's)."""
    import ray

    from benchmarks.common import PeakRSS
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.job import run_full_job

    layers = args.layers[0]
    model = synthetic(args)  # cached by the --make step: only its manifest is read here
    tmp = Path(tempfile.mkdtemp(prefix="strata-drvmem-"))
    try:
        data = job_config(args, model, tmp)
        if args.trace_in_driver:
            from strata_quant.pipeline import probe

            probe.IN_PLACE_BYTES = float("inf")
        if args.plan_only:
            from strata_quant.pipeline.preflight import check_job

            pf = check_job(parse_config(data, "benchmark"))
            return {
                "layers": layers,
                "params": pf.reader.num_params(),
                "trace_in_driver": args.trace_in_driver,
                "plan_driver_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "plan_children_peak_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            }
        job_yaml = tmp / "job.yaml"
        job_yaml.write_text(yaml.safe_dump(data))
        check = subprocess.run(
            [sys.executable, "-m", "strata_quant.pipeline.cli", "check", str(job_yaml)], capture_output=True, text=True
        )
        if check.returncode != 0:
            sys.exit(f"strata check refused the job (exit {check.returncode}): {check.stderr.strip()[-2000:]}")
        # the largest process waited for so far: the check or its probe child
        check_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        cfg = parse_config(data, "benchmark")
        ray.init(num_cpus=max(2, args.workers), include_dashboard=False, logging_level="WARNING")
        with PeakRSS() as workers, PeakRSS(match="publish") as publisher:
            report = run_full_job(cfg, progress=False)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "layers": layers,
        "params": report["params"],
        "driver_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "driver_peak_sampled_bytes": workers.driver,
        "trace_in_driver": args.trace_in_driver,
        "check": check.stdout.strip().splitlines()[-1],
        "check_peak_bytes": check_peak,
        "worker_peak_bytes": max(workers.workers.values(), default=0),
        "publish_peak_bytes": max(publisher.workers.values(), default=0),
        "timings": report["timings"],
        "checks": [
            {k: c.get(k) for k in ("format", "bit_exact_linears", "reader", "whole_model_checks")}
            for c in report["checks"]
        ],
        "ppl": {n: r["ppl"] for n, r in report["quality"]["rows"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a job config to run (default: GPTQ W4 g64)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--trace-in-driver", action="store_true", help="the plan's layer trace in the driver")
    parser.add_argument("--plan-only", action="store_true", help="only the plan's checks, in the measured process")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        print(synthetic(args))
        return
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return

    from benchmarks.common import machine

    print(f"machine: {machine()}")
    print(
        f"synthetic Llama {args.hidden} wide, FFN {args.intermediate}, {args.heads}/{args.kv_heads} heads; "
        f"{args.workers} workers; {args.samples} × {args.seq_len} calibration tokens; gptq + gguf; "
        f"eval {args.eval_windows} × {args.seq_len}"
        + (f"; {args.config} {' '.join(args.set)}" if args.config else "")
        + ("; layer traced in the driver" if args.trace_in_driver else "; layer traced in a child process")
    )
    rows = []
    for layers in args.layers:
        argv = [a for a in sys.argv[1:] if a]
        if "--layers" in argv:  # this depth only
            i = argv.index("--layers")
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            argv = argv[:i] + argv[j:]
        here = [sys.executable, "-m", "benchmarks.driver_memory", *argv, "--layers", str(layers)]
        subprocess.run([*here, "--make"], check=True, capture_output=True)
        out = subprocess.run(
            [*here, "--one"],
            capture_output=True,
            text=True,
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{layers} blocks failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        row = json.loads(line[len("RESULT ") :])
        rows.append(row)
        if args.plan_only:
            print(
                f"{layers:3d} blocks ({row['params'] / 1e9:.2f} B params): plan in the driver, peak "
                f"{row['plan_driver_peak_bytes'] / 2**20:6.0f} MiB; its child processes' peak "
                f"{row['plan_children_peak_bytes'] / 2**20:6.0f} MiB",
                flush=True,
            )
            continue
        t = row["timings"]
        print(
            f"{layers:3d} blocks ({row['params'] / 1e9:.2f} B params): driver peak {row['driver_peak_bytes'] / 2**20:6.0f} MiB, "
            f"worker peak {row['worker_peak_bytes'] / 2**20:6.0f} MiB, publish task peak "
            f"{row['publish_peak_bytes'] / 2**20:6.0f} MiB; " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in t.items()),
            flush=True,
        )
        print(f"    {row['check']} (peak of strata check and its probe: {row['check_peak_bytes'] / 2**20:.0f} MiB)")
        for check in row["checks"]:
            print(f"    verified {check}")
        print(f"    ppl {row['ppl']}")
    if len(rows) > 1 and not args.plan_only:
        growth = rows[-1]["driver_peak_bytes"] / rows[0]["driver_peak_bytes"] - 1
        print(f"driver peak growth {rows[0]['layers']} → {rows[-1]['layers']} blocks: {growth:+.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
