"""Calibration statistics gathered from a linear layer's inputs."""

from __future__ import annotations

import torch

_CAST_CHUNK = 1 << 18  # values per slice when a float32 Gram is added into a float64 sum (2 MiB in fp64:
# a heap block that is reused, where a fresh mmap of a whole fp64 copy faults in its pages each time)


class HessianAccumulator:
    """Running S = Σ xᵀx over input rows x ∈ ℝᴷ and their count n; H = 2·S / n.

    Each batch's Gram matrix is formed in float32 and added into a float64 sum: the
    fp32 partial sums are exact in fp64 in practice, so the total does not depend on
    how samples are split across workers (sharded sums equal the single-worker sum).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        gram = rows.t() @ rows
        if gram.dtype == self.sum.dtype:
            self.sum += gram
        elif self.sum.device.type != "cpu":  # a GPU: one mixed-dtype kernel, no temporary (slices
            # of 2 MiB were thousands of launches per add at K = 28672: +2 s per 70B block)
            self.sum.add_(gram)
        else:  # cast a slice at a time: a whole fp64 copy is 6.6 GB beside the sum at K = 28672
            # (cast, then add: the same values, and about twice as fast as a mixed-dtype add on CPUs)
            step = max(1, _CAST_CHUNK // gram.shape[1])
            for i in range(0, gram.shape[0], step):
                self.sum[i : i + step] += gram[i : i + step].to(self.sum.dtype)
        self.count += rows.shape[0]

    def hessian(self, total_sum: torch.Tensor | None = None, total_count: int | None = None) -> torch.Tensor:
        """H = 2·S / n (from this accumulator, or from sums reduced across workers)."""
        s = self.sum if total_sum is None else total_sum
        n = self.count if total_count is None else total_count
        if n == 0:
            raise ValueError("no calibration rows reached this linear")
        return s * (2.0 / n)
