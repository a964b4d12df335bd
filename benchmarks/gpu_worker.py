"""strata's block worker on a GPU against the same worker on the CPU, in one process (no Ray).

    python3 -m benchmarks.gpu_worker --model MODEL_DIR [--methods gptq,awq_gptq,…] [--device cuda]

For each method, every block of ``MODEL_DIR`` goes through ``workers.actor.BlockWorker`` on the
CPU and on ``--device`` with the same calibration ids (seeded random token ids, ``--samples`` ×
``--seq``): statistics, solves, store writes and propagation, the float-propagation solver
thread, and a replay of the stored results. Prints, per method, the share of equal codes
(integer results), the largest difference of dequantized weights, the mean output error of
both runs, and the worker time on each device. A GPU run passes when the two agree up to the
rounding ties that different summation orders flip (a handful of codes, each one grid step).

This is the check behind ``run.device: cuda``; Ray's GPU placement itself (num_gpus=1 per
actor, NCCL group) is exercised only where a Ray cluster with GPUs is at hand.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from strata_quant.pipeline.checkpoint import open_checkpoint
from strata_quant.pipeline.store import LocalStore
from strata_quant.workers.actor import BlockWorker
from strata_quant.workers.job import WorkerJob
from strata_quant.workers.records import result_from_bytes
from strata_quant.workers.result import QuantSpec

METHOD_JOBS = {
    "gptq": {},
    "gptq_act_order": {"method": "gptq", "act_order": True},
    "gptq_float": {"method": "gptq", "propagate": "float", "overlap_depth": 2},
    "gptq_bf16_hidden": {"method": "gptq", "hidden_dtype": "bfloat16"},
    "awq": {"method": "awq"},
    "awq_gptq": {"method": "awq_gptq"},
    "rtn": {"method": "rtn"},
    "gptq_nf4": {"method": "gptq_nf4", "nf4_blocksize": 32},
    "fp8": {"method": "fp8"},
    "probe": {"method": "gptq", "sensitivity_bits": [3, 4, 8]},
}


def run_worker(model: str, device: str, options: dict, ids: torch.Tensor, spec: QuantSpec) -> dict:
    """All blocks through one BlockWorker; then a replay of the stored results. Returns the
    stored results by linear, the record entries and the seconds taken."""
    reader = open_checkpoint(model)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        fields = {"method": "gptq", **options}
        job = WorkerJob(model_config=reader.config, spec=spec, run_prefix="runs/gpu", device=device, **fields)
        worker = BlockWorker(0, 1, reader, store, job)
        worker.load_samples(ids)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        entries: dict[int, list[dict]] = {}
        for b in range(reader.num_layers):
            out = worker.process_block(b)
            entries.setdefault(b, []).extend(out["results"])
            for done in out.get("finished", []):
                entries.setdefault(done["block"], []).extend(done["results"])
        for done in worker.drain():
            entries.setdefault(done["block"], []).extend(done["results"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        results = {}
        for es in entries.values():
            for e in es:
                results[e["name"]] = result_from_bytes(store.get_bytes(e["key"]))
        # replay (resume): a fresh worker advances its samples through the stored results
        replayer = BlockWorker(0, 1, reader, store, job)
        replayer.load_samples(ids)
        for b in range(reader.num_layers):
            replayer.process_block(b, replay={"results": entries[b]})
        final = torch.cat([h.float().cpu().flatten() for h, _ in replayer.batches])
        worker.shutdown()
        replayer.shutdown()
    flat = [e for es in entries.values() for e in es]
    return {"results": results, "entries": flat, "seconds": seconds, "final_hidden": final}


def compare(a: dict, b: dict) -> dict:
    """Agreement of two runs of the same job on different devices."""
    equal = total = 0
    max_diff = 0.0
    for name, ra in a["results"].items():
        rb = b["results"][name]
        codes_a, codes_b = getattr(ra, "codes", None), getattr(rb, "codes", None)
        if codes_a is not None and codes_b is not None:
            equal += int((codes_a == codes_b).sum())
            total += codes_a.numel()
        max_diff = max(max_diff, float((ra.dequantize() - rb.dequantize()).abs().max()))

    def mean_err(run):
        errs = [e["output_rel_error"] for e in run["entries"] if "output_rel_error" in e]
        return sum(errs) / len(errs) if errs else float("nan")

    hid_a, hid_b = a["final_hidden"], b["final_hidden"]
    return {
        "linears": len(a["results"]),
        "codes_equal": equal / total if total else None,
        "max_weight_diff": max_diff,
        "mean_output_rel_error": [mean_err(a), mean_err(b)],
        "replayed_hidden_rel_diff": float((hid_a - hid_b).norm() / hid_a.norm().clamp(min=1e-30)),
        "seconds": [a["seconds"], b["seconds"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--methods", default=",".join(METHOD_JOBS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--baseline", default="cpu")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    reader = open_checkpoint(args.model)
    vocab = int(reader.config["vocab_size"])
    ids = torch.randint(0, vocab, (args.samples, args.seq), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(args.bits, args.group_size, True)
    report = {}
    print(
        f"{'method':18s} {'codes equal':>11s} {'max |ΔW|':>9s} {'out err base/dev':>18s} {'hidden Δ':>9s} {'s base/dev':>12s}"
    )
    for method in args.methods.split(","):
        options = METHOD_JOBS[method]
        try:
            base = run_worker(args.model, args.baseline, options, ids, spec)
            dev = run_worker(args.model, args.device, options, ids, spec)
            row = compare(base, dev)
        except Exception as err:  # report and go on: one broken method must not hide the others
            import traceback

            traceback.print_exc()
            row = {"error": f"{type(err).__name__}: {err}"}
            print(f"{method:18s} FAILED {row['error']}", flush=True)
            report[method] = row
            continue
        report[method] = row
        ce = "—" if row["codes_equal"] is None else f"{100 * row['codes_equal']:.3f}%"
        errs = "/".join(f"{e:.5f}" for e in row["mean_output_rel_error"])
        secs = "/".join(f"{s:.1f}" for s in row["seconds"])
        print(
            f"{method:18s} {ce:>11s} {row['max_weight_diff']:9.2e} {errs:>18s} "
            f"{row['replayed_hidden_rel_diff']:9.2e} {secs:>12s}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
