"""INT8 weight quantization helpers: which linears to keep in 16-bit because of activation outliers.

INT8 itself is on the integer grid already: per-channel symmetric absmax is
``QuantSpec(8, -1, sym=True)`` and asymmetric zero-point ``QuantSpec(8, -1, sym=False)``,
solved by :func:`workers.rtn.rtn_quantize` or :func:`workers.gptq.gptq_quantize`.

Outliers (LLM.int8, Dettmers et al., 2022): a few hidden-state feature dimensions carry
magnitudes far above the rest (≥ 6 in absolute value in their criterion), and the linears that
read them are the ones that lose most under 8-bit. From the calibration statistics each linear
already has — the Gram matrix S = Σ xᵀx over n input rows (H = 2S/n), optionally the running
max |x| per channel — we form per input channel

    rms_c = sqrt(S[c, c] / n),   z_c = (rms_c − median(rms)) / (1.4826 · MAD(rms))

(a robust z-score: 1.4826·MAD estimates σ for normal data and is not inflated by the outliers
themselves). A channel is an outlier when z_c > ``sigma`` (6 by default, the "6σ" rule) and, when
per-channel max |x| is given and ``abs_threshold`` is set, also max|x_c| ≥ ``abs_threshold``
(LLM.int8's 6.0). A linear whose inputs have any outlier channel is returned for
``modules_to_not_convert`` (``llm_int8_skip_modules`` in transformers' bitsandbytes config).
"""

from __future__ import annotations

import torch


def channel_rms(gram_sum: torch.Tensor, count: int) -> torch.Tensor:
    """rms_c = sqrt(S[c, c] / n) from the Gram sum S = Σ xᵀx over n rows (or pass H with count 2)."""
    return (torch.diagonal(gram_sum).double().clamp(min=0) / max(count, 1)).sqrt()


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """(v − median(v)) / (1.4826 · MAD(v)); a constant vector gives zeros."""
    v = values.double()
    med = v.median()
    mad = (v - med).abs().median() * 1.4826
    if float(mad) == 0.0:
        spread = (v - med).abs().max()
        return (
            torch.where((v - med).abs() > 0, torch.full_like(v, float("inf")), torch.zeros_like(v))
            if spread > 0
            else torch.zeros_like(v)
        )
    return (v - med) / mad


def outlier_channels(
    rms: torch.Tensor, max_abs: torch.Tensor | None = None, sigma: float = 6.0, abs_threshold: float | None = None
) -> torch.Tensor:
    """Boolean mask of outlier input channels (see the module docstring)."""
    mask = robust_z(rms) > sigma
    if max_abs is not None and abs_threshold is not None:
        mask &= max_abs.double() >= abs_threshold
    return mask


def int8_skip_modules(
    stats: dict[str, dict[str, torch.Tensor | int]],
    sigma: float = 6.0,
    abs_threshold: float | None = None,
) -> list[str]:
    """Names of linears to keep in 16-bit. ``stats[name]`` has ``gram`` (S = Σ xᵀx, or the
    Hessian) and ``count`` (n; use 2 when passing H = 2S/n), and optionally ``max_abs`` (per-channel
    max |x|). Sorted, for a deterministic config."""
    out = []
    for name, s in stats.items():
        rms = channel_rms(s["gram"], int(s["count"]))  # type: ignore[arg-type]
        max_abs = s.get("max_abs")
        if bool(outlier_channels(rms, max_abs, sigma, abs_threshold).any()):  # type: ignore[arg-type]
            out.append(name)
    return sorted(out)
