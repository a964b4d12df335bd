"""NF4 (4-bit NormalFloat, QLoRA) with bitsandbytes' block absmax and double quantization.

Levels. NormalFloat puts the 16 levels at quantiles of N(0, 1), scaled to [−1, 1], with an
exact zero and one more positive level than negative ones (bitsandbytes
``create_normal_map(offset=0.9677083, use_extra_value=True)``):

    pos_i = Φ⁻¹(p_i),  p = linspace(δ, ½, 9)[:-1]   (8 positive levels, δ = 0.9677083)
    neg_i = −Φ⁻¹(p_i), p = linspace(δ, ½, 8)[:-1]   (7 negative levels)
    levels = sort(pos ∪ {0} ∪ neg) / max(pos)

(δ is the outermost quantile: the largest level sits at Φ⁻¹(δ) ≈ 1.848σ before scaling.)
:func:`normal_float_levels` derives them; :data:`NF4_LEVELS` is the table bitsandbytes
ships (``get_4bit_type("nf4")``) and uses to quantize — the two agree to fp32 rounding.

Blocks. The weight is flattened row-major and cut into blocks of B = 64 values (a block is
64 consecutive inputs of one output row when K % 64 = 0). Per block, a = max|w| (fp32),
and each value gets the nearest level of w / a (ties go to the lower level, as bitsandbytes'
``bucketize`` over the midpoints):  ŵ = levels[q] · a.

Double quantization (bitsandbytes ``compress_statistics=True``): the fp32 absmax vector
is centred on its mean c = mean(a) and quantized blockwise again, 256 constants a block,
with the signed 8-bit *dynamic* map (``create_dynamic_map``, :func:`dynamic_map`):

    a' = a − c;  per block of 256: m = max|a'| (fp32),  r = nearest(dynamic_map, a' / m)
    â = dynamic_map[r] · m + c

so a block costs 4 bits per weight + 8 bits per 64 weights + 32 bits per 64·256 weights
(+ one fp32 offset per tensor): 4.127 bits/weight instead of 4.5 without double quant.

Packing (bitsandbytes ``quantize_4bit``): element 2i goes in the high nibble of byte i and
element 2i+1 in the low nibble; the bytes are a uint8 tensor of shape [⌈N·K/2⌉, 1].

GPTQ on the NF4 grid: :func:`gptq_nf4` runs GPTQ's column-by-column error feedback (the
damped inverse Cholesky of :mod:`workers.gptq`), rounding each column to the nearest level
of its block's scaled codebook levels · â. The block scales are fixed up front from the
original weights (and double-quantized first, so the codes are chosen against the exact
scales a reader will use) — the NF4 counterpart of GPTQ's static groups.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from strata_quant.workers.gptq import damped_inverse_cholesky

NF4_OFFSET = 0.9677083
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

# bitsandbytes.functional.get_4bit_type("nf4") (0.50.2), the table every reader uses
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


def normal_float_levels(offset: float = NF4_OFFSET, use_extra_value: bool = True) -> torch.Tensor:
    """The 16 NormalFloat levels derived from N(0, 1) quantiles (see the module docstring).

    The quantile points are made in float32 and Φ⁻¹ is evaluated in float64, as
    bitsandbytes does (torch.linspace, then scipy's norm.ppf); the levels are float32.
    With ``use_extra_value=False`` the symmetric variant (7 + 7 levels and zero, padded
    with a second zero to 16) is returned.
    """
    n_pos = 9 if use_extra_value else 8
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n_pos, dtype=torch.float32)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())
    zeros = torch.zeros(16 - pos.numel() - neg.numel(), dtype=torch.float64)
    values = torch.cat([pos, zeros, neg]).float().sort().values
    return values / values.max()


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic (dynamic-exponent) map, 256 sorted float32 values.

    For exponent e = 0..6 the fraction bits left are i = e, and 2^i (signed) values
    10^(e−6) · mid(linspace(0.1, 1, 2^i + 1)) are added with both signs; then 0 and 1.0.
    The signed map spans [−0.99297, 1] with a dense region near zero (Dettmers, 2016).
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def nearest_level(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``levels`` for each value (ties → lower index),
    i.e. bucketize over the midpoints, as bitsandbytes' quantizers do."""
    bounds = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled.float().contiguous(), bounds.to(scaled.device))


def blockwise_absmax_quantize(
    values: torch.Tensor, levels: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten, cut into blocks of ``blocksize`` (the last may be partial), a = max|x| per block
    (fp32), codes = nearest(levels, clamp(x · (1/a), −1, 1)). Returns (uint8 codes in the shape of
    ``values``, fp32 absmax [⌈n/B⌉])."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    n_blocks = math.ceil(n / blocksize)
    padded = torch.zeros(n_blocks * blocksize, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    blocks = padded.view(n_blocks, blocksize)
    absmax = blocks.abs().max(dim=1).values
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)[:n]
    codes = nearest_level(scaled, levels).to(torch.uint8)
    return codes.reshape(values.shape), absmax


def blockwise_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """x = levels[code] · absmax[i // B] in fp32 (flattened order), in the shape of ``codes``."""
    flat = levels.to(codes.device)[codes.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(blocksize)[: flat.numel()]
    return (flat * scale).reshape(codes.shape)


@dataclass
class NF4Linear:
    """An NF4-quantized weight [N, K]: 4-bit level indices, block absmax, optional double quant.

    Without double quant ``absmax`` is the fp32 absmax per block. With it, ``absmax`` is the
    uint8 code of (absmax − offset) on the dynamic map, ``nested_absmax`` the fp32 absmax of
    each block of 256 constants and ``offset`` the mean that was subtracted.
    """

    codes: torch.Tensor  # uint8 [N, K], indices into NF4_LEVELS
    absmax: torch.Tensor  # float32 [nB] or uint8 [nB] (double quant)
    shape: tuple[int, int]
    blocksize: int = BLOCKSIZE
    nested_absmax: torch.Tensor | None = None  # float32 [⌈nB/256⌉]
    offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    method: str = "nf4"
    params: dict | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax a reader uses: stored directly, or dynamic_map[r] · m + offset."""
        if not self.double_quant:
            return self.absmax.float()
        assert self.offset is not None and self.nested_absmax is not None
        centred = blockwise_dequantize(self.absmax, self.nested_absmax, dynamic_map(), self.nested_blocksize)
        return centred + torch.tensor(self.offset, dtype=torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = NF4_LEVELS[codes] · absmax[block], in fp32, then cast to ``dtype``."""
        return blockwise_dequantize(self.codes, self.block_absmax(), NF4_LEVELS, self.blocksize).to(dtype)

    def bits_per_weight(self) -> float:
        """Stored bits per weight: 4-bit codes + the absmax constants (+ nested constants, offset)."""
        n = self.codes.numel()
        bits = 4 * n + self.absmax.numel() * self.absmax.element_size() * 8
        if self.double_quant:
            bits += self.nested_absmax.numel() * 32 + 32  # type: ignore[union-attr]
        return bits / n

    def packed(self) -> torch.Tensor:
        """bitsandbytes byte layout: uint8 [⌈N·K/2⌉, 1], element 2i high nibble, 2i+1 low nibble."""
        return pack_nibbles(self.codes)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and one metadata string for the run store (same role as QuantizedLinear's)."""
        tensors = {"codes": self.codes.contiguous(), "absmax": self.absmax.contiguous()}
        if self.nested_absmax is not None:
            tensors["nested_absmax"] = self.nested_absmax.contiguous()
        meta = {
            "schema": 1,
            "kind": "nf4",
            "shape": list(self.shape),
            "blocksize": self.blocksize,
            "nested_blocksize": self.nested_blocksize,
            "offset": self.offset,
            "method": self.method,
            "params": self.params or {},
        }
        return tensors, {"strata_result": json.dumps(meta, sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> NF4Linear:
        meta = json.loads(metadata["strata_result"])
        if meta.get("kind") != "nf4":
            raise ValueError("not an NF4 result")
        return cls(
            codes=tensors["codes"],
            absmax=tensors["absmax"],
            shape=tuple(meta["shape"]),  # type: ignore[arg-type]
            blocksize=int(meta["blocksize"]),
            nested_absmax=tensors.get("nested_absmax"),
            offset=meta["offset"],
            nested_blocksize=int(meta["nested_blocksize"]),
            method=meta["method"],
            params=meta["params"],
        )


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Flattened 4-bit codes → uint8 [⌈n/2⌉, 1]: byte i = code[2i] << 4 | code[2i+1]."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1).contiguous()


def unpack_nibbles(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 codes in ``shape``."""
    flat = packed.reshape(-1).to(torch.uint8)
    out = torch.empty(flat.numel() * 2, dtype=torch.uint8, device=flat.device)
    out[0::2] = flat >> 4
    out[1::2] = flat & 0xF
    return out[: math.prod(shape)].reshape(shape)


def double_quantize(
    absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """bitsandbytes' nested quantization of the fp32 absmax vector: c = mean(a), then
    8-bit blockwise dynamic-map quantization of a − c. Returns (uint8 codes, fp32 nested absmax, c)."""
    offset = absmax.float().mean()
    codes, nested = blockwise_absmax_quantize(
        absmax.float() - offset, dynamic_map().to(absmax.device), nested_blocksize
    )
    return codes, nested, float(offset)


def _block_scales(w: torch.Tensor, blocksize: int, double_quant: bool, nested_blocksize: int):
    """Per-block absmax of w [N, K] (flattened blocks), optionally double-quantized.
    Returns (stored absmax, nested absmax | None, offset | None, the fp32 absmax a reader uses)."""
    _, absmax = blockwise_absmax_quantize(w, NF4_LEVELS, blocksize)
    if not double_quant:
        return absmax, None, None, absmax
    q, nested, offset = double_quantize(absmax, nested_blocksize)
    used = blockwise_dequantize(q, nested, dynamic_map(), nested_blocksize) + torch.tensor(offset)
    return q, nested, offset, used


def nf4_quantize(
    weight: torch.Tensor,
    blocksize: int = BLOCKSIZE,
    double_quant: bool = True,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> NF4Linear:
    """Round-to-nearest NF4, bit-for-bit as ``bitsandbytes.functional.quantize_4bit(W, blocksize,
    quant_type="nf4", compress_statistics=double_quant)``: the codes are chosen against the fp32
    absmax (not the double-quantized one), exactly as bitsandbytes does."""
    w = weight.float()
    codes, absmax = blockwise_absmax_quantize(w, NF4_LEVELS.to(w.device), blocksize)
    result = NF4Linear(codes=codes, absmax=absmax, shape=tuple(w.shape), blocksize=blocksize)  # type: ignore[arg-type]
    if double_quant:
        result.absmax, result.nested_absmax, result.offset = double_quantize(absmax, nested_blocksize)
        result.nested_blocksize = nested_blocksize
    result.params = {"double_quant": double_quant}
    return result


def gptq_codebook(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    levels: torch.Tensor,
    scales: torch.Tensor,
    blocksize: int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, float, int]:
    """GPTQ's error feedback onto an arbitrary sorted codebook ``levels`` with fixed scales.

    ``scales`` [N, K / blocksize] holds one scale per (row, block of inputs). With U the upper
    Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ (:func:`workers.gptq.damped_inverse_cholesky`),
    for each column j in order, with s the scale of its block:

        q_j = nearest(levels, clamp(w_j · (1/s), −1, 1)),  ŵ_j = levels[q_j] · s,
        e_j = (w_j − ŵ_j) / U[j, j],                   W[:, j:] −= e_j · U[j, j:]

    (lazy batch updates every ``block_size`` columns, as :func:`workers.gptq.gptq_quantize`).
    Dead inputs (diag H = 0) get weight 0. Returns (uint8 codes [N, K], λ used, dead inputs).
    """
    w = weight.float().clone()
    n_rows, n_cols = w.shape
    if n_cols % blocksize:
        raise ValueError(f"in_features {n_cols} must be a multiple of the blocksize {blocksize}")
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale = scales.float().to(w.device)
    inv = 1.0 / scale.clamp(min=1e-38)  # w · (1/s), as bitsandbytes scales a block
    upper, lam = damped_inverse_cholesky(h, damp)
    upper = upper.to(torch.float32)
    levels = levels.float().to(w.device)
    codes = torch.zeros(n_rows, n_cols, dtype=torch.uint8, device=w.device)
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        w_blk = w[:, i1:i2].clone()
        err_blk = torch.zeros_like(w_blk)
        u_blk = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            s = scale[:, col // blocksize]
            q = nearest_level(torch.clamp(w_blk[:, i] * inv[:, col // blocksize], -1, 1), levels)
            codes[:, col] = q.to(torch.uint8)
            err = (w_blk[:, i] - levels[q] * s) / u_blk[i, i]
            w_blk[:, i:] -= err.unsqueeze(1) * u_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        w[:, i2:] -= err_blk @ upper[i1:i2, i2:]
    return codes, lam, int(dead.sum())


def gptq_nf4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    blocksize: int = BLOCKSIZE,
    double_quant: bool = True,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    damp: float = 0.01,
    block_size: int = 128,
) -> NF4Linear:
    """GPTQ on the NF4 grid (:func:`gptq_codebook` with :data:`NF4_LEVELS`).

    The block absmax comes from the original weights (dead inputs zeroed) and, with
    ``double_quant``, is double-quantized *before* the codes are chosen, so the error feedback
    works against the exact scales a reader reconstructs. K % blocksize must be 0.
    """
    return gptq_nf4_stacked(
        [weight],
        hessian,
        blocksize=blocksize,
        double_quant=double_quant,
        nested_blocksize=nested_blocksize,
        damp=damp,
        block_size=block_size,
    )[0]


def gptq_nf4_stacked(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    *,
    blocksize: int = BLOCKSIZE,
    double_quant: bool = True,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    damp: float = 0.01,
    block_size: int = 128,
) -> list[NF4Linear]:
    """:func:`gptq_nf4` of several linears that share one input (q/k/v, gate/up) in one solve.

    Each linear keeps its own block scales (and double-quantization offset): they are computed
    per tensor, as a reader quantizing each linear alone would. The error feedback of GPTQ runs
    along rows given H, so the rows of all linears, stacked with their scales, are solved by one
    :func:`gptq_codebook` (one damped inverse Cholesky) and split again — the same codes as
    solving each linear alone.
    """
    dead_mask = torch.diag(hessian) == 0
    parts, scales = [], []
    for weight in weights:
        w = weight.float().clone()
        w[:, dead_mask] = 0.0
        n_rows, n_cols = w.shape
        if n_cols % blocksize:
            raise ValueError(f"in_features {n_cols} must be a multiple of the NF4 blocksize {blocksize}")
        stored, nested, offset, used = _block_scales(w, blocksize, double_quant, nested_blocksize)
        parts.append((w, stored, nested, offset))
        scales.append(used.view(n_rows, n_cols // blocksize))
    stacked = torch.cat([w for w, *_ in parts], dim=0)
    codes, lam, dead = gptq_codebook(
        stacked, hessian, NF4_LEVELS, torch.cat(scales, dim=0), blocksize, damp=damp, block_size=block_size
    )
    out, start = [], 0
    for w, stored, nested, offset in parts:
        n_rows, n_cols = w.shape
        out.append(
            NF4Linear(
                codes=codes[start : start + n_rows].contiguous(),
                absmax=stored,
                shape=(n_rows, n_cols),
                blocksize=blocksize,
                nested_absmax=nested,
                offset=offset,
                nested_blocksize=nested_blocksize,
                method="gptq-nf4",
                params={"double_quant": double_quant, "damp": damp, "damp_used": lam, "dead_inputs": dead},
            )
        )
        start += n_rows
    return out
