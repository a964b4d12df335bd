"""The streaming sharded safetensors writer, read back by the safetensors library."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from strata_quant.pipeline.assemble import ShardedSafetensorsWriter


def test_streamed_shards_read_back_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.f16": torch.randn(64, 33, generator=gen).half(),
        "b.bf16": torch.randn(7, generator=gen).bfloat16(),
        "c.i32": torch.randint(-(2**31), 2**31 - 1, (5, 3), generator=gen, dtype=torch.int32),
        "d.u8": torch.randint(0, 255, (3, 5, 2), generator=gen, dtype=torch.uint8),
        "e.f32": torch.randn(128, 17, generator=gen),
        "f.i64": torch.tensor([2, 3], dtype=torch.int64),
        "g.empty": torch.zeros(0, 4),
        "h.transposed": torch.randn(6, 9, generator=gen).t(),  # non-contiguous input
    }
    writer = ShardedSafetensorsWriter(tmp_path, shard_bytes=4096, metadata={"format": "pt"})
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert len(files) > 1 and not list(tmp_path.glob(".data-*"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name, t in tensors.items():
        with safe_open(tmp_path / index["weight_map"][name], "pt") as f:
            assert f.metadata() == {"format": "pt"}
            got = f.get_tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t.contiguous())
