"""GPTQ on llama.cpp's grids (workers/ggml.py) and their block bytes (pipeline/formats/gguf_quants.py).

* Every type, on random weights (with an all-zero row stretch and a dead input) and on SmolLM2's
  weights with their real Hessians: the packed blocks dequantize, in gguf-py and in llama.cpp's own
  to_float (libggml of llama-cpp-python), to exactly the solver's weights, bit for bit.
* On SmolLM2's layers, GPTQ on the grid has a smaller output error tr(E H Eᵀ)/tr(W H Wᵀ) than
  llama.cpp's own quantization with the importance matrix of the same activations. The SmolLM2
  fixture is itself a dequantized Q4_1 GGUF: its weights lie on the Q4_1 grid (and so on Q5_1's),
  where any fit gives back the fixture within its fp16 rounding; there both errors must be tiny.
* A K-quant refuses a row that is not a multiple of 256 (SmolLM2's 576-wide inputs), a legacy
  type one that is not a multiple of 32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strata_quant.pipeline.formats.gguf_quants import pack
from strata_quant.workers.ggml import GRIDS, gptq_ggml, rtn_ggml
from strata_quant.workers.gptq import relative_output_error

pytest.importorskip("llama_cpp")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from tests.ggml_reference import ggml_dequantize, ggml_quantize  # noqa: E402

TYPES = list(GRIDS)
K_TYPES = [t for t, g in GRIDS.items() if g.k_quant]
LEGACY = [t for t, g in GRIDS.items() if not g.k_quant]


def _assert_exact(result, name: str) -> None:
    n, k = result.shape
    ours = result.dequantize().numpy()
    data = pack(result)
    by_gguf = dequantize(data, GGMLQuantizationType[name]).reshape(n, k)
    by_ggml = ggml_dequantize(data, name, k)
    assert np.array_equal(ours.view(np.uint32), by_gguf.view(np.uint32)), f"{name}: gguf-py differs"
    assert np.array_equal(ours.view(np.uint32), by_ggml.view(np.uint32)), f"{name}: llama.cpp differs"


@pytest.fixture(scope="module")
def random_case():
    g = torch.Generator().manual_seed(0)
    n, k = 24, 512
    w = torch.randn(n, k, generator=g) * 0.02
    w[3, :96] = 0.0  # all-zero sub-blocks and legacy blocks
    w[5, 300] = 0.5  # an outlier
    x = torch.randn(1024, k, generator=g) * (torch.rand(k, generator=g) * 2 + 0.1)
    x[:, 7] = 0.0  # a dead input
    return w, 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize("name", TYPES)
def test_random_weights_pack_exactly(name, random_case):
    w, h = random_case
    g = gptq_ggml(w, h, name)
    _assert_exact(g, name)
    _assert_exact(rtn_ggml(w, name, torch.diag(h)), name)
    assert g.params["dead_inputs"] == 1
    assert int(g.codes.max()) <= GRIDS[name].qmax
    # the solver lowers the output error below rounding on the same kind of grid
    assert relative_output_error(w, g.dequantize(), h) < relative_output_error(w, rtn_ggml(w, name).dequantize(), h)


@pytest.fixture(scope="module")
def smollm2_layer(smollm2_path, emma_path):
    """Layer 5's down_proj (K = 1536) and q_proj (K = 576) weights and their Hessians from 4 windows
    of 256 tokens of Emma through the real model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, torch_dtype=torch.float32).eval()
    text = emma_path.read_text() if hasattr(emma_path, "read_text") else open(emma_path).read()
    ids = tok.encode(text[50000:150000], add_special_tokens=False)[: 4 * 256]
    layer = model.model.layers[5]
    mods = {"down": layer.mlp.down_proj, "q": layer.self_attn.q_proj}
    sums = {key: 0 for key in mods}
    count = [0]

    def hook(key):
        def f(_m, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            sums[key] = sums[key] + x.t() @ x
            if key == "q":
                count[0] += x.shape[0]

        return f

    handles = [m.register_forward_hook(hook(key)) for key, m in mods.items()]
    with torch.no_grad():
        for i in range(4):
            model(torch.tensor([ids[i * 256 : (i + 1) * 256]]))
    for hd in handles:
        hd.remove()
    out = {key: (m.weight.detach().float().clone(), (2 * sums[key] / count[0]).float()) for key, m in mods.items()}
    del model
    return out


@pytest.mark.parametrize("name", TYPES)
def test_smollm2_exact_and_better_than_llamacpp_imatrix(name, smollm2_layer):
    w, h = smollm2_layer["down"]
    g = gptq_ggml(w, h, name)
    _assert_exact(g, name)
    imatrix = (torch.diag(h) / 2).numpy()  # llama-imatrix's mean x² per input
    ref = ggml_dequantize(ggml_quantize(w.numpy(), name, imatrix), name, w.shape[1])
    ours_err = relative_output_error(w, g.dequantize(), h)
    ref_err = relative_output_error(w, torch.from_numpy(ref), h)
    print(f"{name}: GPTQ on grid {ours_err:.3e}, llama.cpp imatrix {ref_err:.3e} ({ours_err / ref_err:.2f}x)")
    if name in ("Q4_1", "Q5_1"):  # the fixture's own grid (see the module docstring)
        assert ours_err < 1e-6 and ref_err < 1e-6
    else:
        assert ours_err < ref_err


@pytest.mark.parametrize("name", LEGACY)
def test_smollm2_576_wide_rows_in_legacy_types(name, smollm2_layer):
    w, h = smollm2_layer["q"]
    assert w.shape[1] == 576
    _assert_exact(gptq_ggml(w, h, name), name)


@pytest.mark.parametrize("name", K_TYPES)
def test_k_types_refuse_rows_not_multiple_of_256(name, smollm2_layer):
    w, h = smollm2_layer["q"]
    with pytest.raises(ValueError, match=f"{name} stores rows in blocks of 256 values; a row of 576"):
        gptq_ggml(w, h, name)
    with pytest.raises(ValueError, match="not a multiple"):
        rtn_ggml(w, name)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_types_refuse_rows_not_multiple_of_32(name):
    with pytest.raises(ValueError, match=f"{name} stores rows in blocks of 32 values; a row of 100"):
        gptq_ggml(torch.randn(4, 100), torch.eye(100), name)


@pytest.mark.parametrize("name", TYPES)
def test_diag_shrink_moves_gptq_towards_importance_weighted_rounding(name):
    """α = 1 leaves H's diagonal alone: no feedback, each block's grid fitted on W itself, the codes nearest, which
    is llama.cpp's rounding with the importance matrix diag H (rtn_ggml) bit for bit; α = 0.5 lies between, packs
    exactly, and its output error under the full H lies between GPTQ's and the rounding's."""
    g = torch.Generator().manual_seed(1)
    n, k = 16, 512
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(2048, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k**0.5)
    h = 2 * x.t() @ x / x.shape[0]
    rounded = rtn_ggml(w, name, torch.diag(h)).dequantize()
    assert torch.equal(gptq_ggml(w, h, name, diag_shrink=1.0).dequantize(), rounded)
    half = gptq_ggml(w, h, name, diag_shrink=0.5)
    _assert_exact(half, name)
    assert half.params["diag_shrink"] == 0.5 and "diag_shrink" not in gptq_ggml(w, h, name).params
    errs = [relative_output_error(w, q, h) for q in (gptq_ggml(w, h, name).dequantize(), half.dequantize(), rounded)]
    assert errs[0] < errs[1] < errs[2], errs


@pytest.mark.parametrize("name", TYPES)
def test_refine_passes_lower_the_objective_and_pack_exactly(name, random_case):
    """Coordinate descent after GPTQ keeps every grid, moves codes only within range, never raises the error
    under the damped H it descends (each pass lowers it or leaves it), and the file's blocks are the result."""
    from strata_quant.workers.ggml import refine_codes, refine_ggml

    w, h = random_case
    w = w.clone()
    w[:, 7] = 0.0  # the dead input, as the solve zeroes it
    g = gptq_ggml(w, h, name)
    damped = h.clone()
    damped.diagonal().add_(g.params["damp_used"] * float(torch.diag(h).double().mean()))

    def loss(codes):
        e = (w - type(g)(g.grid, codes, g.d, g.dmin, g.sc, g.mins).dequantize()).double()
        return float(torch.einsum("ij,jk,ik->", e, damped.double(), e))

    losses = [loss(g.codes)]
    for passes in (1, 2, 3):
        codes, moved = refine_codes(w, damped, g, passes)
        assert int(codes.max()) <= GRIDS[name].qmax and moved > 0
        losses.append(loss(codes))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.995 * losses[0], losses
    r = gptq_ggml(w, h, name, refine_passes=2)
    _assert_exact(r, name)
    assert r.params["refine_passes"] == 2 and r.params["refine_moves"] > 0 and "refine_passes" not in g.params
    for key in ("d", "dmin", "sc", "mins"):  # the grids are GPTQ's
        a, b = getattr(r, key), getattr(g, key)
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(r.codes, refine_codes(w, damped, g, 2)[0])
    assert torch.equal(r.codes, refine_ggml(w, h, g, 2).codes)  # the refine of GPTQ's result, as a benchmark calls it
