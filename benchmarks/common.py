"""Shared bits of the benchmarks: machine description, a peak-RSS sampler, a run helper."""

from __future__ import annotations

import os
import platform
import threading
import time

import psutil


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {gpu}, Python {platform.python_version()}"


def own_ray_workers(match: str = "RayBlockWorker") -> list[psutil.Process]:
    """This driver's Ray worker actors whose command line names ``match``. Only our own Ray
    (ray.init starts it as our descendants): actors of other Ray clusters on the machine
    (a test suite, another benchmark) are not ours."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(match in part for part in (p.cmdline() or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


class _Poller:
    """Calls ``tick`` every ``period`` seconds on a daemon thread while the context is open."""

    def __init__(self, period: float = 0.05):
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def _loop(self):
        while not self._stop.is_set():
            self.tick()
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class PeakRSS(_Poller):
    """Samples the RSS of this process and of every Ray worker actor process every 50 ms."""

    def __init__(self, match: str = "RayBlockWorker", period: float = 0.05):
        super().__init__(period)
        self.match = match
        self.driver = 0
        self.workers: dict[int, int] = {}
        self._me = psutil.Process()

    def tick(self) -> None:
        self.driver = max(self.driver, self._me.memory_info().rss)
        for p in own_ray_workers(self.match):
            try:
                self.workers[p.pid] = max(self.workers.get(p.pid, 0), p.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


class CorePinner(_Poller):
    """Confines each of this driver's Ray worker actors to a core of its own, every thread of
    it, while a run goes on: W workers then use W cores, so a worker with a solver thread
    beside its forward thread gets no more CPU than one with a single thread. Cores go to the
    live workers in pid order (rank order as Ray starts them). Each thread is pinned once
    (threads started later inherit their creator's mask, and are pinned when seen), and the
    scan runs every 0.25 s, backing off to every 2 s while it finds nothing new: polling
    every 50 ms and pinning every thread each time took 10 % of a core, on the cores the
    workers were measured on."""

    def __init__(self, match: str = "RayBlockWorker", period: float = 0.25):
        super().__init__(period)
        self.first_period = period
        self.match = match
        self.cores = sorted(os.sched_getaffinity(0))
        self._threads: set[tuple[int, int]] = set()  # (thread id, core) done

    def tick(self) -> None:
        pinned = len(self._threads)
        for i, p in enumerate(sorted(own_ray_workers(self.match), key=lambda p: p.pid)):
            core = self.cores[i % len(self.cores)]
            try:
                for thread in p.threads():
                    if (thread.id, core) not in self._threads:
                        os.sched_setaffinity(thread.id, {core})
                        self._threads.add((thread.id, core))
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                pass
        # back off while nothing new appears (threads started later inherit a pinned mask), up
        # to 2 s: the scan runs in the driver, on the cores the workers are measured on
        self.period = self.first_period if len(self._threads) > pinned else min(2.0, self.period * 2)


def run_config(
    model: str, store: str, workers: int, propagate: str, samples: int, seq_len: int, run: dict | None = None, **quant
):
    """One quantization run (no artifacts, no eval); returns the RunOutcome. ``run``: extra
    ``run`` section keys (e.g. overlap_depth)."""
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import run_job

    cfg = parse_config(
        {
            "name": "bench",
            "model": model,
            "calibration": {"source": "fixture:austen/emma", "num_samples": samples, "seq_len": seq_len},
            "quant": {"method": "gptq", "bits": 4, "group_size": 64, **quant},
            "run": {
                "workers": workers,
                "propagate": propagate,
                "batch_size": 4,
                "store": store,
                "threads_per_worker": 1,
                **(run or {}),
            },
            "output": {"formats": ["gptq"]},
            "eval": None,
        }
    )
    return run_job(cfg, progress=False)


def block_seconds(outcome) -> float:
    """Wall time of the block loop: the sum of the per-block wall times in the records."""
    return sum(r["wall_s"] for r in outcome.records.values())
