"""Peak RSS of assembling a GPTQ checkpoint from a run of a synthetic model larger than 4 GB.

    .venv/bin/python -m benchmarks.assemble_memory

Builds a random Llama (hidden 4096, FFN 11008, 10 blocks: 2.2 G parameters, 4.4 GB in
fp16), quantizes it with RTN W4 g128 on one Ray worker (RTN needs no statistics, so this
measures assembly, not solving), then assembles the GPTQ folder in a fresh process and
reports that process's peak RSS against the checkpoint size.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine

ASSEMBLE = """
import json, resource, sys, time
from pathlib import Path
from pipeline.assemble import ResultSource, assemble_gptq
from pipeline.checkpoint import CheckpointReader
from pipeline.run import load_records
from pipeline.store import open_store
model, store_root, run_id, dest = sys.argv[1:5]
store = open_store(store_root)
reader = CheckpointReader(model)
t = time.perf_counter()
results = ResultSource(store, load_records(store, f"runs/{run_id}", reader.num_layers))
assemble_gptq(reader, results, Path(dest), shard_size="1GB")
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    import json

    import ray

    from pipeline import fixtures
    from pipeline.config import parse_config
    from pipeline.run import run_job

    print(f"machine: {machine()}")
    model = fixtures.synthetic_llama(
        fixtures.cache_dir() / "models" / "synthetic-4096x10",
        hidden=4096,
        intermediate=11008,
        layers=10,
        heads=32,
        kv_heads=8,
    )
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    tmp = Path(tempfile.mkdtemp(prefix="strata-asm-"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        cfg = parse_config(
            {
                "name": "asm",
                "model": str(model),
                "calibration": {"source": "fixture:austen/emma", "num_samples": 2, "seq_len": 32},
                "quant": {"method": "rtn", "bits": 4, "group_size": 128},
                "run": {"workers": 1, "batch_size": 2, "store": str(tmp / "store"), "threads_per_worker": 2},
                "output": {"formats": ["gptq"]},
                "eval": None,
            }
        )
        t = time.perf_counter()
        outcome = run_job(cfg, progress=False)
        run_s = time.perf_counter() - t
        ray.shutdown()
        out = subprocess.run(
            [sys.executable, "-c", ASSEMBLE, str(model), str(tmp / "store"), outcome.run_id, str(tmp / "gptq")],
            capture_output=True,
            text=True,
            check=True,
        )
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        produced = sum(p.stat().st_size for p in (tmp / "gptq").glob("*.safetensors"))
        print(
            f"checkpoint {size / 1e9:.2f} GB fp16 ({len(list(model.glob('*.safetensors')))} shards); "
            f"RTN run {run_s:.0f}s"
        )
        print(
            f"assembly: {stats['seconds']:.0f}s, GPTQ output {produced / 1e9:.2f} GB in 1 GB shards, "
            f"peak RSS of the assembling process {stats['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"({stats['peak_rss_bytes'] / size:.0%} of the checkpoint)"
        )
        print(f"driver peak RSS (this process) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
