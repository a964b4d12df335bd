"""The block bytes of every ggml type strata solves on (workers/ggml.py), in one place.

Each packer turns a :class:`GGMLQuantized` (codes and the stored numbers of its blocks) into
the rows of blocks llama.cpp reads, such that gguf-py's and llama.cpp's dequantizers give back
:meth:`GGMLQuantized.dequantize` bit for bit. Layouts follow the block structs of
ggml-common.h and the dequantizers of ggml-quants.c / gguf-py's quants.py (fp16 and u32 little
endian):

    Q4_0  d, qs[16]                       qs[j] = q[j] | q[j+16] << 4
    Q4_1  d, m, qs[16]
    Q5_0  d, qh (u32: bit j = bit 4 of q[j]), qs[16]
    Q5_1  d, m, qh, qs[16]
    Q8_0  d, int8 (q − 128)[32]
    Q2_K  scales[16] (sc | m << 4), qs[64], d, dmin
    Q3_K  hmask[32], qs[64], scales[12] (6-bit sc + 32), d
    Q4_K  d, dmin, scales[12] (6-bit sc and m), qs[128]
    Q5_K  d, dmin, scales[12], qh[32], qs[128]
    Q6_K  ql[128], qh[64], scales[16] (int8), d
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from strata_quant.workers.ggml import GGMLQuantized


def _f16(t) -> np.ndarray:
    """fp16 [rows, nb] → bytes [rows·nb, 2]."""
    return np.ascontiguousarray(t.cpu().numpy().astype(np.float16).reshape(-1, 1)).view(np.uint8)


def _codes(q: GGMLQuantized) -> np.ndarray:
    """Codes as uint8 [rows·nb, block]."""
    return q.codes.cpu().numpy().astype(np.uint8).reshape(-1, q.grid.block)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def _fifth_bits(c: np.ndarray) -> np.ndarray:
    """u32 little endian with bit j = bit 4 of code j, as 4 bytes per block."""
    return np.packbits((c >> 4) & 1, axis=-1, bitorder="little")


def _crumbs(c: np.ndarray) -> np.ndarray:
    """2-bit values of a K-quant block [nb, 256] → qs [nb, 64]: per half of 128 values,
    byte l holds values l, l+32, l+64, l+96 at bits 0, 2, 4, 6."""
    h = (c & 3).reshape(-1, 2, 4, 32)
    return (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(-1, 64)


def _k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins → the 12 bytes get_scale_min_k4 reads."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def _q4_k_nibbles(c: np.ndarray) -> np.ndarray:
    """Low nibbles of a block [nb, 256] → qs [nb, 128]: per 64 values, byte l = v[l] | v[l+32] << 4."""
    h = c.reshape(-1, 4, 2, 32)
    return _nibbles(h[:, :, 0], h[:, :, 1]).reshape(-1, 128)


def pack_legacy(q: GGMLQuantized) -> np.ndarray:
    c = _codes(q)
    name = q.grid.name
    if name == "Q8_0":
        return np.concatenate([_f16(q.d), (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=1)
    parts = [_f16(q.d)]
    if q.grid.affine:
        parts.append(_f16(q.dmin))
    if q.grid.bits == 5:
        parts.append(_fifth_bits(c))
    parts.append(_nibbles(c[:, :16], c[:, 16:]))
    return np.concatenate(parts, axis=1)


def pack_q2_k(q: GGMLQuantized) -> np.ndarray:
    c = _codes(q)
    sc = q.sc.cpu().numpy().astype(np.uint8).reshape(-1, 16)
    m = q.mins.cpu().numpy().astype(np.uint8).reshape(-1, 16)
    return np.concatenate([(sc & 0xF) | ((m & 0xF) << 4), _crumbs(c), _f16(q.d), _f16(q.dmin)], axis=1)


def pack_q3_k(q: GGMLQuantized) -> np.ndarray:
    c = _codes(q)
    hmask = np.packbits((c >> 2).reshape(-1, 8, 32) & 1, axis=1, bitorder="little").reshape(-1, 32)
    ls = (q.sc.cpu().numpy().astype(np.int16) + 32).astype(np.uint8).reshape(-1, 16)
    scales = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    scales[:, 0:8] = _nibbles(ls[:, 0:8], ls[:, 8:16])
    hi = (ls >> 4) & 3  # scales[8 + j%4] holds bits 4–5 of scale j at 2·(j // 4)
    scales[:, 8:12] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    return np.concatenate([hmask, _crumbs(c), scales, _f16(q.d)], axis=1)


def pack_q4_k(q: GGMLQuantized) -> np.ndarray:
    c = _codes(q)
    scales = _k4_scales(q.sc.cpu().numpy().reshape(-1, 8), q.mins.cpu().numpy().reshape(-1, 8))
    return np.concatenate([_f16(q.d), _f16(q.dmin), scales, _q4_k_nibbles(c)], axis=1)


def pack_q5_k(q: GGMLQuantized) -> np.ndarray:
    c = _codes(q)
    scales = _k4_scales(q.sc.cpu().numpy().reshape(-1, 8), q.mins.cpu().numpy().reshape(-1, 8))
    # qh[l] bit i: bit 4 of value 32·i + l (the i-th run of 32 values)
    qh = np.packbits((c >> 4).reshape(-1, 8, 32) & 1, axis=1, bitorder="little").reshape(-1, 32)
    return np.concatenate([_f16(q.d), _f16(q.dmin), scales, qh, _q4_k_nibbles(c)], axis=1)


def pack_q6_k(q: GGMLQuantized) -> np.ndarray:
    c = _codes(q).reshape(-1, 2, 4, 32)  # per half of 128: four runs of 32
    ql = np.concatenate([_nibbles(c[:, :, 0], c[:, :, 2]), _nibbles(c[:, :, 1], c[:, :, 3])], axis=2).reshape(-1, 128)
    hb = c >> 4
    qh = (hb[:, :, 0] | (hb[:, :, 1] << 2) | (hb[:, :, 2] << 4) | (hb[:, :, 3] << 6)).reshape(-1, 64)
    sc = q.sc.cpu().numpy().astype(np.int8).reshape(-1, 16).view(np.uint8)
    return np.concatenate([ql, qh, sc, _f16(q.d)], axis=1)


PACKERS = {
    "Q4_0": pack_legacy,
    "Q4_1": pack_legacy,
    "Q5_0": pack_legacy,
    "Q5_1": pack_legacy,
    "Q8_0": pack_legacy,
    "Q2_K": pack_q2_k,
    "Q3_K": pack_q3_k,
    "Q4_K": pack_q4_k,
    "Q5_K": pack_q5_k,
    "Q6_K": pack_q6_k,
}


def pack(q: GGMLQuantized) -> np.ndarray:
    """The tensor's data as uint8 [N, row bytes] (rows of blocks, as llama.cpp stores a [K, N] tensor)."""
    n, k = q.shape
    blocks = PACKERS[q.grid.name](q)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[q.grid.name]]
    if blocks.shape != (n * k // block, size):
        raise AssertionError(f"{q.grid.name}: packed {blocks.shape}, expected {(n * k // block, size)}")
    return np.ascontiguousarray(blocks).reshape(n, k // block * size)
