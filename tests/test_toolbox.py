"""The rest of the quantization toolbox: NF4 (+ double quant, GPTQ on NF4), FP8, INT8 outliers,
mixed precision and QAT — checked against bitsandbytes, compressed-tensors and transformers."""

from __future__ import annotations

import random

import pytest
import torch

from strata_quant.workers import nf4
from strata_quant.workers.fp8 import fp8_quantize
from strata_quant.workers.int8 import channel_rms, int8_skip_modules, outlier_channels
from strata_quant.workers.mixed import (
    average_bits,
    choose_bits_brute_force,
    choose_bits_dp,
    choose_bits_greedy,
    hessian_error,
)
from strata_quant.workers.result import QuantSpec


def _bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (extra 'bnb') is not installed")


def _hessian(k: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """H = 2 XᵀX / n for correlated inputs with a spread of channel scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=gen) @ mix * torch.logspace(-1, 0.5, k)
    return 2 * x.T @ x / n


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("tiny") / "src"
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(path)
    return path


def _linears(path):
    from safetensors.torch import load_file

    sd = load_file(path / "model.safetensors")
    return {k[: -len(".weight")]: v.float() for k, v in sd.items() if ".layers." in k and k.endswith("proj.weight")}


IDS = torch.tensor([[1, 17, 200, 3, 99, 42, 7, 255, 128, 64, 5, 0]])

# ------------------------------------------------------------------------------------------------ NF4


def test_nf4_levels_derived_from_normal_quantiles_equal_the_published_table() -> None:
    levels = nf4.normal_float_levels()
    assert torch.equal(levels, nf4.NF4_LEVELS)
    assert levels[7] == 0 and levels[0] == -1 and levels[-1] == 1
    assert (levels < 0).sum() == 7 and (levels > 0).sum() == 8  # the asymmetric construction


def test_dynamic_map_is_bitsandbytes() -> None:
    F = _bnb()
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (96, 576), (7, 130)])
def test_nf4_is_bitsandbytes_quantize_4bit(dtype, shape) -> None:
    """Codes and fp32 absmax equal bitsandbytes' bit for bit; the reader's dequantize_4bit of our
    state equals ours exactly, with and without double quantization."""
    F = _bnb()
    torch.manual_seed(0)
    w = (torch.randn(*shape) * 0.02).to(dtype)
    w[0, :5] = 0
    q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = nf4.nf4_quantize(w, double_quant=False)
    assert torch.equal(ours.packed(), q) and torch.equal(ours.absmax, st.absmax)
    assert torch.equal(F.dequantize_4bit(q, st), ours.dequantize(dtype))
    # double quant: the reader decodes our constants exactly
    dq = nf4.nf4_quantize(w, double_quant=True)
    state = F.QuantState(
        absmax=dq.absmax,
        shape=torch.Size(shape),
        dtype=dtype,
        blocksize=64,
        code=nf4.NF4_LEVELS,
        quant_type="nf4",
        offset=torch.tensor(dq.offset),
        state2=F.QuantState(absmax=dq.nested_absmax, code=nf4.dynamic_map(), blocksize=256, dtype=torch.float32),
    )
    assert torch.equal(F.dequantize_4bit(dq.packed(), state), dq.dequantize(dtype))


def test_double_quant_rounding_is_the_reference_backend() -> None:
    """Nested 8-bit codes equal bitsandbytes' pure-torch ("default") kernel exactly. Its CPU C kernel
    (approximate binary search) differs on a few constants near a midpoint — always picking the
    farther level — so ours are never worse."""
    _bnb()
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    ref_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    code = nf4.dynamic_map()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=gen) * 0.01
    ours, absmax = nf4.blockwise_absmax_quantize(x, code, 256)
    q_ref, a_ref = op.redispatch(ref_keys, x, code, 256)
    assert torch.equal(ours, q_ref) and torch.equal(absmax, a_ref)
    q_cpu, _ = op(x, code, 256)
    scaled = x / absmax.repeat_interleave(256)[: x.numel()]
    assert ((code[ours.long()] - scaled).abs() <= (code[q_cpu.long()] - scaled).abs()).all()


def test_nf4_bits_per_weight() -> None:
    w = torch.randn(4096, 4096 // 16)
    assert nf4.nf4_quantize(w, double_quant=False).bits_per_weight() == 4.5
    assert nf4.nf4_quantize(w, double_quant=True).bits_per_weight() == pytest.approx(
        4 + 8 / 64 + 32 / (64 * 256), abs=1e-4
    )


def test_nf4_checkpoint_loads_in_transformers(tiny_llama, tmp_path) -> None:
    _bnb()
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline.formats import bnb_nf4

    results = {n: nf4.nf4_quantize(w) for n, w in _linears(tiny_llama).items()}
    out = bnb_nf4.export_model(tiny_llama, results, tmp_path / "nf4")
    stored = load_file(out / "model.safetensors")
    for name, r in results.items():
        assert torch.equal(bnb_nf4.decode_linear(stored, name), r.dequantize(torch.float16)), name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
    import bitsandbytes.functional as F

    for name, r in results.items():
        mod = model.get_submodule(name)
        assert type(mod).__name__ == "Linear4bit"
        assert torch.equal(F.dequantize_4bit(mod.weight.data, mod.weight.quant_state), r.dequantize(torch.float16))
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_nf4_result_round_trips_through_store_tensors() -> None:
    r = nf4.nf4_quantize(torch.randn(32, 128))
    back = nf4.NF4Linear.from_tensors(*r.to_tensors())
    assert torch.equal(back.dequantize(), r.dequantize())


def test_gptq_on_nf4_lowers_hessian_weighted_error() -> None:
    from strata_quant.workers.gptq import gptq_quantize
    from strata_quant.workers.rtn import rtn_quantize

    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    h = _hessian(256)
    spec = QuantSpec(4, 64, True)
    int_ratio = hessian_error(w, gptq_quantize(w, h, spec).dequantize(), h) / hessian_error(
        w, rtn_quantize(w, spec).dequantize(), h
    )
    for dq in (False, True):
        rtn = nf4.nf4_quantize(w, double_quant=dq)
        g = nf4.gptq_nf4(w, h, double_quant=dq)
        e_rtn, e_g = hessian_error(w, rtn.dequantize(), h), hessian_error(w, g.dequantize(), h)
        assert e_g < 0.92 * e_rtn, (dq, e_g, e_rtn)
        # the gain matches GPTQ's on the integer grid of the same size (4-bit, 64 per group)
        assert abs(e_g / e_rtn - int_ratio) < 0.05
        assert torch.equal(g.absmax, rtn.absmax)  # same block scales; only the codes differ
    # with H = I there is nothing to feed back: GPTQ-on-NF4 is plain NF4 rounding
    eye = torch.eye(256)
    plain = nf4.nf4_quantize(w, double_quant=False)
    assert torch.equal(nf4.gptq_nf4(w, eye, damp=0.0, double_quant=False).codes, plain.codes)


# ------------------------------------------------------------------------------------------------ FP8


@pytest.mark.parametrize("fmt,fmax", [("e4m3", 448.0), ("e5m2", 57344.0)])
@pytest.mark.parametrize("block", [None, (32, 32), (24, 40)])
def test_fp8_scales_and_rounding(fmt, fmax, block) -> None:
    torch.manual_seed(0)
    w = torch.randn(70, 100)
    w[3] = 0
    r = fp8_quantize(w, fmt=fmt, block=block)
    assert r.weight.dtype == {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    if block is None:
        assert r.scale.shape == (70, 1)
        assert torch.equal(r.scale[:, 0], torch.where(w.abs().amax(1) > 0, w.abs().amax(1) / fmax, 1.0))
        assert torch.equal(r.weight.float().abs().amax(1)[torch.arange(70) != 3], torch.full((69,), fmax))
    else:
        assert r.scale.shape == (-(-70 // block[0]), -(-100 // block[1]))
    # nearest fp8 of w / s: the cast's round-to-nearest-even
    from strata_quant.workers.fp8 import expand_scale

    assert torch.equal(r.weight, (w / expand_scale(r.scale, (70, 100), block)).clamp(-fmax, fmax).to(r.weight.dtype))
    rel = (r.dequantize() - w).norm() / w.norm()
    assert rel < (0.04 if fmt == "e4m3" else 0.08)


def test_fp8_bf16_scales_never_overflow() -> None:
    w = torch.randn(64, 64) * 3
    r = fp8_quantize(w, scale_dtype=torch.bfloat16)
    assert r.scale.dtype == torch.bfloat16
    assert (r.scale.float() >= w.abs().amax(1, keepdim=True) / 448).all()
    assert torch.isfinite(r.weight.float()).all()


@pytest.mark.parametrize("block", [None, (64, 64)])
def test_fp8_checkpoint_loads_in_transformers(tiny_llama, tmp_path, block) -> None:
    """transformers + compressed-tensors load the float-quantized artifact; every linear's weight is
    our dequantized weight exactly (fp32 model, fp32 scales)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline.formats import fp8 as fp8_format

    results = {n: fp8_quantize(w, block=block) for n, w in _linears(tiny_llama).items()}
    out = fp8_format.export_model(tiny_llama, results, tmp_path / "fp8", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        model(IDS)
    state = model.state_dict()
    for name, r in results.items():
        assert torch.equal(state[f"{name}.weight"], r.dequantize()), name


def test_fp8_config_parses_in_compressed_tensors() -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    from strata_quant.pipeline.formats import fp8 as fp8_format

    for block, dyn in [(None, False), ((128, 128), True)]:
        parsed = QuantizationConfig.model_validate(fp8_format.quantization_config(block, dyn))
        args = parsed.config_groups["group_0"].weights
        assert args.type == "float" and args.num_bits == 8 and parsed.format == "float-quantized"
        assert args.strategy == ("channel" if block is None else "block")


# ------------------------------------------------------------------------------------------------ INT8


def test_int8_outlier_linears_are_kept_in_16_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    stats = {}
    for name, boost in [("clean.q_proj", 1.0), ("outlier.down_proj", 100.0), ("heavy_tail.up_proj", None)]:
        if boost is None:
            x = torch.distributions.StudentT(5.0).sample((4096, 64))  # heavy tails, no outlier channel
        else:
            x = torch.randn(4096, 64, generator=gen)
            x[:, 17] *= boost
        stats[name] = {"gram": x.T @ x, "count": x.shape[0], "max_abs": x.abs().amax(0)}
    assert int8_skip_modules(stats) == ["outlier.down_proj"]
    assert int8_skip_modules(stats, abs_threshold=6.0) == ["outlier.down_proj"]
    rms = channel_rms(stats["outlier.down_proj"]["gram"], 4096)
    assert outlier_channels(rms).nonzero().flatten().tolist() == [17]
    # the same from the pipeline's Hessian H = 2 S / n (count 2)
    h = 2 * stats["outlier.down_proj"]["gram"] / 4096
    assert outlier_channels(channel_rms(h, 2)).nonzero().flatten().tolist() == [17]


# -------------------------------------------------------------------------------------- mixed precision

COST = {2: 2.25, 3: 3.25, 4: 4.25, 8: 8.25}


def _random_problem(seed: int, n: int):
    rng = random.Random(seed)
    params, errors = {}, {}
    for i in range(n):
        name = f"l{i}"
        params[name] = rng.choice([64, 128, 192, 512]) * rng.choice([1, 3])
        base = rng.uniform(0.1, 10)
        errors[name] = {b: base * 4.0 ** (-b) * rng.uniform(0.5, 2) for b in COST}
    return errors, params


@pytest.mark.parametrize("seed", range(12))
def test_mixed_dp_is_optimal_and_greedy_is_feasible(seed) -> None:
    errors, params = _random_problem(seed, 6)
    target = random.Random(seed).uniform(2.5, 6.0)
    brute = choose_bits_brute_force(errors, params, target, COST)
    dp = choose_bits_dp(errors, params, target, COST)
    greedy = choose_bits_greedy(errors, params, target, COST)

    def total(c):
        return sum(errors[n][b] for n, b in c.items())

    assert average_bits(dp, params, COST) <= target + 1e-9
    assert average_bits(greedy, params, COST) <= target + 1e-9
    assert total(dp) == pytest.approx(total(brute), rel=1e-12)
    assert total(greedy) >= total(brute) * (1 - 1e-12)


def test_mixed_budget_edges() -> None:
    errors, params = _random_problem(0, 5)
    uniform = {n: {4: e[4]} for n, e in errors.items()}
    assert set(choose_bits_dp(uniform, params, 4.25, COST).values()) == {4}
    assert set(choose_bits_dp(errors, params, 100.0, COST).values()) == {8}
    with pytest.raises(ValueError):
        choose_bits_dp(errors, params, 2.0, COST)


# ------------------------------------------------------------------------------------------------ QAT


def test_qat_export_equals_the_fake_quant_forward_and_fine_tune_lowers_loss() -> None:
    """A small Llama (the tiny fixture's shape, with the vocabulary cut to the tokens of the text so
    that the 2-core CI stays fast) fine-tuned 30 steps with next-token loss on Emma on the 3-bit
    g32 grid: the exported integer model has lower held-out loss than RTN on the same grid."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import tokenize_stream
    from strata_quant.pipeline.eval import with_weights
    from strata_quant.workers.qat import FakeQuantLinear, export_results, prepare_qat
    from strata_quant.workers.rtn import rtn_quantize

    tok = AutoTokenizer.from_pretrained(fixtures.tiny_llama())
    stream = tokenize_stream(tok, fixtures.austen("emma").read_text()[:20000])
    vocab, stream = torch.unique(stream, return_inverse=True)
    train = stream[: 16 * 64].view(16, 64)
    held = stream[16 * 64 : 20 * 64].view(4, 64)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    base = LlamaForCausalLM(cfg).eval()
    spec = QuantSpec(3, 32, True)

    def loss(model, ids):
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    linears = [n for n, m in base.named_modules() if ".layers." in f".{n}." and isinstance(m, torch.nn.Linear)]
    rtn = {n: rtn_quantize(base.get_submodule(n).weight.data, spec) for n in linears}
    before = loss(with_weights(base, {n: r.dequantize() for n, r in rtn.items()}), held)

    model = prepare_qat(with_weights(base, {}), spec, learnable_scales=True)
    # at initialisation QAT's grid is RTN's grid: same codes and scales
    init = export_results(model)
    assert all(torch.equal(init[n].codes, rtn[n].codes) and torch.equal(init[n].scales, rtn[n].scales) for n in rtn)
    for p in model.parameters():  # train the quantized linears (weights and scales) only
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            for p in m.parameters():
                p.requires_grad_(True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(30):
        ids = train[(step * 4) % 16 : (step * 4) % 16 + 4]
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    results = export_results(model)
    assert sorted(results) == sorted(linears) and all(r.method == "qat" for r in results.values())
    exported = with_weights(base, {n: r.dequantize() for n, r in results.items()})
    for name, r in results.items():
        fq = model.get_submodule(name)
        assert isinstance(fq, FakeQuantLinear)
        with torch.no_grad():
            assert torch.equal(fq.quantized_weight(), r.dequantize()), name
    with torch.no_grad():
        assert torch.equal(model(input_ids=held).logits, exported(input_ids=held).logits)
    after = loss(exported, held)
    assert after < before - 0.05, (before, after)
