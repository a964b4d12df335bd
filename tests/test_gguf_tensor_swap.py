"""benchmarks/gguf_tensor_swap: a group's tensors copied byte for byte from the other file, the rest untouched;
files whose tensors differ in type or shape are refused."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.gguf_tensor_swap import swap_tensors


def _write(path, tensors: dict[str, np.ndarray]) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    for name, x in tensors.items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _read(path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


def test_the_group_comes_from_the_other_file(tmp_path):
    rng = np.random.default_rng(0)
    names = ("blk.0.ffn_down.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight")
    a = {n: rng.standard_normal((4, 8)).astype(np.float32) for n in names}
    b = {n: rng.standard_normal((4, 8)).astype(np.float32) for n in names}
    _write(tmp_path / "a.gguf", a)
    _write(tmp_path / "b.gguf", b)
    swapped = swap_tensors(tmp_path / "a.gguf", tmp_path / "b.gguf", "ffn_down", tmp_path / "ab.gguf")
    assert swapped == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    got = _read(tmp_path / "ab.gguf")
    for n in names:
        np.testing.assert_array_equal(got[n], (b if "ffn_down" in n else a)[n])
    np.testing.assert_array_equal(_read(tmp_path / "a.gguf")["blk.0.ffn_down.weight"], a["blk.0.ffn_down.weight"])


def test_other_shapes_are_refused(tmp_path):
    _write(tmp_path / "a.gguf", {"blk.0.ffn_down.weight": np.zeros((4, 8), np.float32)})
    _write(tmp_path / "b.gguf", {"blk.0.ffn_down.weight": np.zeros((8, 4), np.float32)})
    with pytest.raises(ValueError, match="cannot be swapped"):
        swap_tensors(tmp_path / "a.gguf", tmp_path / "b.gguf", "ffn_down", tmp_path / "ab.gguf")
    with pytest.raises(ValueError, match="no tensor"):
        swap_tensors(tmp_path / "a.gguf", tmp_path / "b.gguf", "attn_v", tmp_path / "ab.gguf")
