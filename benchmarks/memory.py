"""Peak RSS of each worker and of the driver for a synthetic Llama with 4 and 32 blocks.

    .venv/bin/python benchmarks/memory.py

Same width as SmolLM2 (576, FFN 1536, 9 heads / 3 KV heads); the worker peak should not
grow with depth (one block at a time), and the driver holds metadata only.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import ray

from benchmarks.common import PeakRSS, machine, run_config
from strata_quant.pipeline import fixtures


def main() -> None:
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    print(f"machine: {machine()}")
    print("synthetic Llama 576 wide, FFN 1536; 2 workers; 16 × 512 calibration tokens; GPTQ W4 g64")
    rows = {}
    for layers in (4, 32):
        model = fixtures.synthetic_llama(
            fixtures.cache_dir() / "models" / f"synthetic-576x{layers}",
            hidden=576,
            intermediate=1536,
            layers=layers,
            heads=9,
            kv_heads=3,
        )
        tmp = Path(tempfile.mkdtemp(prefix="strata-mem-"))
        try:
            with PeakRSS() as rss:
                run_config(str(model), str(tmp), 2, "quantized", 16, 512)
            rows[layers] = (max(rss.workers.values()), rss.driver)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"{layers:3d} blocks: worker peak {rows[layers][0] / 2**20:7.0f} MiB, "
            f"driver peak {rows[layers][1] / 2**20:6.0f} MiB",
            flush=True,
        )
    growth = rows[32][0] / rows[4][0] - 1
    print(f"worker peak growth 4 → 32 blocks: {growth:+.1%}; driver peak {rows[32][1] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
