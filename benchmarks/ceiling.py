"""The machine's own two-worker ceiling: the throughput of two one-thread processes running a
matmul loop at once, against one alone (no strata code; what W=2 could reach at best).

    .venv/bin/python -m benchmarks.ceiling
"""

from __future__ import annotations

import multiprocessing as mp
import time

import torch

from benchmarks.common import machine


def _work(kind: str, out) -> None:
    torch.set_num_threads(1)
    if kind == "linear":  # a forward's shape: 4096 tokens through a 576 → 1536 linear
        a, w = torch.randn(4096, 576), torch.randn(576, 1536)
        t = time.perf_counter()
        for _ in range(60):
            a @ w
    else:  # a Gram: XᵀX of 4096 tokens at K = 1536
        a = torch.randn(4096, 1536)
        t = time.perf_counter()
        for _ in range(15):
            a.T @ a
    out.put(time.perf_counter() - t)


def main() -> None:
    print(f"machine: {machine()}")
    for kind in ("linear", "gram"):
        out = mp.Queue()
        alone = mp.Process(target=_work, args=(kind, out))
        alone.start()
        alone.join()
        t1 = out.get()
        pair = [mp.Process(target=_work, args=(kind, out)) for _ in range(2)]
        for p in pair:
            p.start()
        for p in pair:
            p.join()
        t2 = max(out.get(), out.get())
        print(f"{kind}: one process {t1:.2f} s; two at once {t2:.2f} s each → throughput {2 * t1 / t2:.2f}×")


if __name__ == "__main__":
    main()
