"""Calibration statistics gathered from a linear layer's inputs."""

from __future__ import annotations

import torch
from torch import nn

from strata_quant.workers.awq import AbsMeanAccumulator
from strata_quant.workers.block import StagePasses, block_linears, run_block

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


class StopForward(Exception):
    """Raised by a hook to end a forward once what it needs has been seen."""


def collect_hessians(
    layer: nn.Module,
    batches: list[tuple[torch.Tensor, dict]],
    leaders: list[str],
    dtype: torch.dtype,
    stop_early: bool = False,
    passes: StagePasses | None = None,
    outputs: list[torch.Tensor] | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> dict[str, HessianAccumulator]:
    """Σ xᵀx of the inputs of the named linears over all batches.

    With ``stop_early`` the forward of a batch stops as soon as every named linear has seen
    its input, so a stage early in the block costs only the part of the block before it;
    with ``passes`` a stage's pass starts from what the previous stage's pass kept.
    ``outputs`` (a list, full passes only) receives each batch's block output in ``output_dtype``.
    """
    return collect_stats(
        layer, batches, leaders, dtype, stop_early, passes=passes, outputs=outputs, output_dtype=output_dtype
    )[0]


def collect_stats(
    layer: nn.Module,
    batches: list[tuple[torch.Tensor, dict]],
    leaders: list[str],
    dtype: torch.dtype,
    stop_early: bool = False,
    abs_means: bool = False,
    passes: StagePasses | None = None,
    outputs: list[torch.Tensor] | None = None,
    output_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, HessianAccumulator], dict[str, AbsMeanAccumulator]]:
    """Σ xᵀx (and with ``abs_means`` Σ|x| per channel) of the named linears' inputs."""
    if outputs is not None and (stop_early or passes is not None):
        raise ValueError("block outputs are kept only by full passes")
    linears = block_linears(layer)
    # sums live where the block runs (a GPU worker reduces them there)
    dev = {name: linears[name].weight.device for name in leaders}
    accs = {name: HessianAccumulator(linears[name].in_features, dev[name], dtype) for name in leaders}
    means = {name: AbsMeanAccumulator(linears[name].in_features, dev[name]) for name in leaders} if abs_means else {}
    seen: set[str] = set()

    def hook(name):
        def fn(_module, args):
            accs[name].add(args[0])
            if abs_means:
                means[name].add(args[0])
            seen.add(name)
            if stop_early and len(seen) == len(leaders):
                raise StopForward

        return fn

    if not batches:
        raise ValueError("this worker holds no calibration samples")
    hooks = [linears[name].register_forward_pre_hook(hook(name)) for name in leaders]
    try:
        for i, (hidden, kwargs) in enumerate(batches):
            seen.clear()
            try:
                if passes is None:
                    y = run_block(layer, hidden.float(), kwargs)  # hidden states may be kept in fp16/bf16
                    if outputs is not None:
                        outputs.append(y.to(output_dtype))
                else:
                    passes.run(i, hidden.float(), kwargs, leaders)
            except StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return accs, means
