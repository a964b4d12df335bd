"""benchmarks.gguf_agreement's emulation of llama.cpp's activation rounding: ggml's Q8_0 on linear inputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp")

from benchmarks.gguf_agreement import ActivationRounding, q8_0_round  # noqa: E402


def test_q8_0_round_is_ggml_q8_0():
    """Per 32-value block: d = max|x| / 127 kept as fp16, values round(x / d) · d; an outlier coarsens its block."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 5
    x[0, 3] = 100.0
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    want = (torch.round(blocks / d) * d.half().float()).reshape(x.shape)
    got = q8_0_round(x)
    assert torch.equal(got, want)
    err = (got - x).abs().reshape(-1, 32)
    assert bool((err <= 0.51 * d).all())  # half a step (d as fp16 moves it a little)
    assert err[0].max() > 4 * err[2].max()  # the block with the outlier is coarser


def test_activation_rounding_hooks_only_the_named_linears():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(64, 64, bias=False)
            self.down_proj = torch.nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return self.down_proj(self.q_proj(x))

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block()])
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    rounding = ActivationRounding(model)
    dense = model.layers[0](x)
    rounding.leaves = {"down_proj"}
    only_down = model.layers[0](x)
    rounding.leaves = {"*"}
    both = model.layers[0](x)
    assert not torch.equal(dense, only_down) and not torch.equal(only_down, both)
    assert set(rounding.mean_error()) == {"q_proj", "down_proj"}
    assert 0 < rounding.mean_error()["q_proj"] < 0.02
    rounding.leaves = set()
    assert torch.equal(model.layers[0](x), dense)
