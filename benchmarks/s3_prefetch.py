"""S3 block reads through a real SeaweedFS on loopback: bytes read per block against the
block's tensor bytes, and the wait in ``load_block`` with and without prefetch while each
block is "processed" for 0.2 s (a sleep standing in for the solves).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/s3_prefetch.py ~/.cache/strata/models/synthetic-576x32
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests import s3_server


def main(model: Path, work_s: float = 0.2) -> None:
    os.environ["AWS_ACCESS_KEY_ID"] = s3_server.ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = s3_server.SECRET_KEY
    os.environ["STRATA_CACHE"] = tempfile.mkdtemp(prefix="strata-bench-cache-")
    server = s3_server.start_s3_server(Path(tempfile.mkdtemp(prefix="strata-bench-weed-")))
    try:
        os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint
        server.make_bucket("bench-inputs")
        client = server.client()
        for f in model.iterdir():
            client.upload_file(str(f), "bench-inputs", f"m/{f.name}")
        from strata_quant.pipeline.checkpoint import CheckpointReader

        t = time.perf_counter()
        reader = CheckpointReader("s3://bench-inputs/m")
        plan_s = time.perf_counter() - t
        shard_bytes = sum(info.size for info in reader.shards.values())
        print(f"{model.name}: {len(reader.shards)} shards, {shard_bytes} bytes; reader made in {plan_s:.2f}s")
        n = reader.num_layers
        for mode in ("plain", "prefetch", "plain", "prefetch"):
            waits = []
            t0 = time.perf_counter()
            for b in range(n):
                t = time.perf_counter()
                reader.load_block(b)
                waits.append(time.perf_counter() - t)
                if mode == "prefetch" and b + 1 < n:
                    reader.prefetch_block(b + 1)
                time.sleep(work_s)
            total = time.perf_counter() - t0
            print(
                f"{mode:8s}: wait in load_block median {statistics.median(waits) * 1000:.1f} ms, "
                f"total {total:.2f}s for {n} blocks of {reader.block_bytes(0)} bytes"
            )
        want = 4 * sum(reader.block_bytes(b) for b in range(n))
        print(f"bytes read by the 4 passes: {reader.bytes_read} (block bytes × 4: {want})")
    finally:
        server.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
