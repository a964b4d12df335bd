"""Test-only worker actors: faults injected from outside the product, through ``run_job``'s
``worker_class`` (a subclass of the production actor), never through the production code path.

``faulty_worker(kill=..., sleep=..., fail=...)`` returns a RayBlockWorker subclass that, before
the block's own work:

* ``kill={"block": B, "rank": R, "marker": PATH, "after_s": S}`` SIGKILLs its own process S
  seconds into block B (once: the marker file, created first, keeps the replacement alive);
* ``sleep={"block": B, "rank": R, "seconds": S}`` stalls block B (its peers then wait in a
  collective);
* ``fail={"block": B, "rank": R, "message": M}`` raises RuntimeError(M) in block B;
* ``drop={"block": B, "linear": NAME}`` leaves the result of the linear whose name ends with
  NAME out of block B's answer (its object stays stored);
* ``lose={"block": B, "linear": NAME}`` deletes that result's object from a local-folder store
  after it was written (as if written to another node's disk).

``python -m tests.faulty_workers CONFIG FAULTS_JSON`` runs a job's quantization with such a
worker in a process of its own (a driver a test can kill).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from strata_quant.pipeline.run import RayBlockWorker


class FaultyWorker(RayBlockWorker):
    kill: dict | None = None
    sleep: dict | None = None
    fail: dict | None = None
    drop: dict | None = None
    lose: dict | None = None

    def _hits(self, fault: dict | None, b: int) -> bool:
        return bool(fault) and fault.get("block") == b and fault.get("rank", 0) == self.rank

    def process_block(self, b: int, replay: dict | None = None) -> dict:
        if self._hits(self.kill, b) and replay is None:
            try:  # once per marker, across processes
                fd = os.open(self.kill["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                fd = None
            if fd is not None:
                os.write(fd, f"{os.getpid()} block {b}\n".encode())
                os.close(fd)
                delay = float(self.kill.get("after_s", 0.0))
                if delay <= 0:
                    os.kill(os.getpid(), signal.SIGKILL)
                threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
        if self._hits(self.sleep, b):
            time.sleep(float(self.sleep["seconds"]))
        if self._hits(self.fail, b):
            raise RuntimeError(self.fail["message"])
        out = super().process_block(b, replay)
        for fault, act in ((self.drop, "drop"), (self.lose, "lose")):
            if fault and fault["block"] == b:
                hit = [e for e in out["results"] if e["name"].endswith(fault["linear"])]
                for entry in hit:
                    if act == "drop":
                        out["results"].remove(entry)
                    else:
                        (Path(self.store.root) / entry["key"]).unlink()
        return out


def faulty_worker(**faults) -> type:
    """A FaultyWorker subclass carrying ``faults`` (pickled to the workers by value)."""
    unknown = set(faults) - {"kill", "sleep", "fail", "drop", "lose"}
    if unknown:
        raise ValueError(f"unknown fault(s) {sorted(unknown)}")
    return type("FaultyWorker", (FaultyWorker,), dict(faults))


def main(argv: list[str]) -> int:
    from strata_quant.pipeline.config import load_config
    from strata_quant.pipeline.run import run_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, faults = argv
    run_job(load_config(config), progress=False, worker_class=faulty_worker(**json.loads(faults)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
