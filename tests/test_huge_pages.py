"""Workers' large allocations on transparent huge pages (run.huge_pages): the runtime_env the
run gives its actors, and what glibc does with it in a real Ray worker process."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata_quant.pipeline.config import RunConfig
from strata_quant.pipeline.run import HUGE_PAGES_TUNABLE, worker_runtime_env

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The kernel's THP mode (the bracketed word), or None where there is no THP."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def test_opt_in_and_merged_with_inherited_tunables():
    assert RunConfig().huge_pages is False
    assert RunConfig(huge_pages=True).huge_pages is True
    assert worker_runtime_env(True) == {"env_vars": {"GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}}
    env = worker_runtime_env(True, "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0")
    # the caller's other tunables stay; its hugetlb setting is replaced, not duplicated
    assert env == {"env_vars": {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"}}
    assert worker_runtime_env(False, "glibc.malloc.arena_max=2") is None


def _huge_pages_of_a_64_mib_tensor() -> tuple[str | None, int]:
    """In a Ray worker: (its GLIBC_TUNABLES, KiB of anonymous huge pages a fresh 64 MiB tensor added)."""
    import os

    import torch

    def anon_huge_kib() -> int:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
        return 0

    before = anon_huge_kib()
    block = torch.ones(16 << 20, dtype=torch.float32)  # 64 MiB: mapped by malloc, not from the heap
    after = anon_huge_kib()
    del block
    return os.environ.get("GLIBC_TUNABLES"), after - before


# a kernel built without THP, or with it turned off, never hands out huge pages: there is nothing
# to observe (this machine and CI run in "madvise" mode, where the test runs)
@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="the kernel offers no transparent huge pages")
def test_ray_worker_maps_large_tensors_on_huge_pages(ray_session):
    import ray

    probe = ray.remote(_huge_pages_of_a_64_mib_tensor)
    tunables, huge_kib = ray.get(probe.options(runtime_env=worker_runtime_env(True)).remote())
    assert tunables == HUGE_PAGES_TUNABLE
    # at least half, not all 64 MiB: only the 2 MiB-aligned stretches of malloc's mapping can
    # be huge pages (its chunk header and the unaligned ends stay 4 KiB pages), and the kernel
    # falls back to 4 KiB pages wherever it finds no free 2 MiB frame at fault time
    assert huge_kib >= 32 << 10, f"only {huge_kib} KiB of a 64 MiB tensor on huge pages"
    if _thp_mode() == "madvise":  # without the tunable glibc never asks for them
        tunables, huge_kib = ray.get(probe.remote())
        assert tunables is None and huge_kib == 0


def test_run_with_huge_pages_gives_the_same_bytes(tmp_path, tiny_model_path, emma_path, ray_session):
    """run_job starts its actors with the runtime_env (W=2 here) and they store the bytes a
    W=1 run without it stores: the allocator's pages do not touch the arithmetic."""
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import run_job
    from tests.test_scaleout import hashes, tiny

    plain = run_job(parse_config(tiny(tmp_path / "plain", workers=1)), progress=False)
    huge = run_job(parse_config(tiny(tmp_path / "huge", workers=2, huge_pages=True)), progress=False)
    assert huge.run_id == plain.run_id  # huge_pages is not part of the run's fingerprint
    assert len(hashes(plain)) == 21 and hashes(huge) == hashes(plain)
