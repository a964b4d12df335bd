"""llama.cpp's own ggml quantizers and dequantizers, called in the libggml-base that
llama-cpp-python ships (ctypes): the reference the ggml-grid tests compare strata with.

ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix) runs llama-quantize's
per-type quantizer (with an importance matrix when one is given); the type traits' to_float
is the dequantizer llama.cpp uses for get_rows and the CPU fallback paths.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_lib = None


def _ggml():
    global _lib
    if _lib is None:
        import llama_cpp

        path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_void_p,
        ]  # fmt: skip
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        _lib = lib
    return _lib


def ggml_quantize(weight: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's quantization of float32 rows [N, K] (imatrix [K] or None): uint8 [N, row bytes]."""
    qtype = GGMLQuantizationType[type_name]
    block, size = GGML_QUANT_SIZES[qtype]
    src = np.ascontiguousarray(weight, dtype=np.float32)
    n, k = src.shape
    dst = np.zeros((n, k // block * size), dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    _ggml().ggml_quantize_chunk(
        int(qtype), src.ctypes.data, dst.ctypes.data, 0, n, k, None if imat is None else imat.ctypes.data
    )
    return dst


def ggml_dequantize(data: np.ndarray, type_name: str, n_cols: int) -> np.ndarray:
    """llama.cpp's dequantizer (the type traits' to_float) of rows of blocks: float32 [N, n_cols]."""
    qtype = GGMLQuantizationType[type_name]
    src = np.ascontiguousarray(data, dtype=np.uint8)
    n = src.shape[0]
    out = np.zeros((n, n_cols), dtype=np.float32)
    to_float = _TO_FLOAT(_ggml().ggml_get_type_traits(int(qtype)).contents.to_float)
    to_float(src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n * n_cols)
    return out
