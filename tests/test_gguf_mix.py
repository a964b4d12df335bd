"""llama.cpp's per-tensor types for its mixes (pipeline/formats/gguf_mix.py), against llama-quant.cpp's
rules as written (llama_tensor_get_type_impl, tensor_type_fallback), on SmolLM2's shapes (30 layers,
576 wide: every 576-long row falls back) and Qwen2.5-1.5B's (28 layers, 1536 / 8960 wide, GQA 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from strata_quant.pipeline.formats.gguf_mix import MIXES, ModelShape, fallback, tensor_type, use_more_bits

SMOL = ModelShape(n_layers=30, n_gqa=3)
QWEN = ModelShape(n_layers=28, n_gqa=6)


def smol(mix, name, shape):
    return tensor_type(mix, name, shape, SMOL, tied=True)


def qwen(mix, name, shape):
    return tensor_type(mix, name, shape, QWEN, tied=True)


def test_use_more_bits_is_llamacpps():
    picked = [i for i in range(30) if use_more_bits(i, 30)]
    # n/8 = 3, 7n/8 = 26: the first three, the last four, and every third from layer 5
    assert picked == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_fallbacks():
    assert [fallback(t, 576) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")] == [
        "Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q8_0"
    ]  # fmt: skip
    assert fallback("Q4_K", 100) == "F16" and fallback("Q8_0", 100) == "F16"
    assert fallback("Q4_K", 1536) == "Q4_K"


def test_q4_k_m_on_smollm2_shapes():
    assert smol("Q4_K_M", "blk.4.attn_q.weight", (576, 576)) == "Q5_0"  # Q4_K, 576 → fallback
    assert smol("Q4_K_M", "blk.0.ffn_down.weight", (576, 1536)) == "Q6_K"  # more bits, 1536 = 6·256
    assert smol("Q4_K_M", "blk.4.ffn_down.weight", (576, 1536)) == "Q4_K"
    assert smol("Q4_K_M", "blk.5.ffn_down.weight", (576, 1536)) == "Q6_K"
    assert smol("Q4_K_M", "blk.5.attn_v.weight", (192, 576)) == "Q8_0"  # Q6_K, 576 → Q8_0
    assert smol("Q4_K_M", "blk.4.attn_v.weight", (192, 576)) == "Q5_0"
    assert smol("Q4_K_M", "token_embd.weight", (49152, 576)) == "Q8_0"  # tied, 576 % 256
    assert smol("Q4_K_M", "blk.3.attn_norm.weight", (576,)) is None
    assert smol("Q4_K_M", "output_norm.weight", (576,)) is None


def test_q4_k_m_and_others_on_qwen_shapes():
    assert qwen("Q4_K_M", "token_embd.weight", (151936, 1536)) == "Q6_K"  # tied output head
    assert tensor_type("Q4_K_M", "token_embd.weight", (151936, 1536), QWEN, tied=False) == "Q4_K"
    assert tensor_type("Q4_K_M", "output.weight", (151936, 1536), QWEN, tied=False) == "Q6_K"
    assert qwen("Q4_K_M", "blk.10.attn_q.weight", (1536, 1536)) == "Q4_K"
    assert qwen("Q4_K_M", "blk.27.ffn_down.weight", (1536, 8960)) == "Q6_K"
    assert qwen("Q4_K_S", "blk.3.attn_v.weight", (256, 1536)) == "Q5_K"
    assert qwen("Q4_K_S", "blk.4.attn_v.weight", (256, 1536)) == "Q4_K"
    assert qwen("Q4_K_S", "blk.2.ffn_down.weight", (1536, 8960)) == "Q5_K"  # 2 < 28 // 8
    assert qwen("Q4_K_S", "blk.3.ffn_down.weight", (1536, 8960)) == "Q4_K"
    assert qwen("Q3_K_M", "blk.1.attn_v.weight", (256, 1536)) == "Q5_K"
    assert qwen("Q3_K_M", "blk.2.attn_v.weight", (256, 1536)) == "Q4_K"
    assert qwen("Q3_K_M", "blk.0.ffn_down.weight", (1536, 8960)) == "Q5_K"  # 0 < 28 // 16
    assert qwen("Q3_K_M", "blk.1.ffn_down.weight", (1536, 8960)) == "Q4_K"
    assert qwen("Q3_K_M", "blk.1.attn_output.weight", (1536, 1536)) == "Q4_K"
    assert qwen("Q3_K_M", "blk.1.ffn_up.weight", (8960, 1536)) == "Q3_K"
    assert qwen("Q3_K_L", "blk.9.attn_output.weight", (1536, 1536)) == "Q5_K"
    assert qwen("Q2_K", "blk.9.attn_v.weight", (256, 1536)) == "Q4_K"  # GQA ≥ 4
    assert smol("Q2_K", "blk.9.attn_v.weight", (192, 576)) == "Q4_0"  # Q3_K, 576 → Q4_0
    assert qwen("Q2_K", "blk.9.ffn_down.weight", (1536, 8960)) == "Q3_K"
    assert qwen("Q2_K", "blk.9.ffn_gate.weight", (8960, 1536)) == "Q2_K"
    assert qwen("Q5_K_M", "blk.5.attn_v.weight", (256, 1536)) == "Q6_K"
    assert qwen("Q5_K_S", "blk.5.attn_v.weight", (256, 1536)) == "Q5_K"
    assert qwen("Q6_K", "blk.5.ffn_down.weight", (1536, 8960)) == "Q6_K"
    assert qwen("Q8_0", "token_embd.weight", (151936, 1536)) == "Q8_0"
    assert qwen("Q8_0", "blk.5.attn_v.weight", (256, 1536)) == "Q8_0"


def test_expert_and_70b_rules():
    moe = ModelShape(n_layers=32, n_gqa=4, n_expert=8)
    assert tensor_type("Q4_K_M", "blk.3.attn_k.weight", (1024, 4096), moe, tied=False) == "Q8_0"
    assert tensor_type("Q4_K_M", "blk.3.attn_v.weight", (1024, 4096), moe, tied=False) == "Q8_0"
    assert tensor_type("Q4_K_M", "blk.3.attn_output.weight", (4096, 4096), moe, tied=False) == "Q5_K"
    assert tensor_type("Q5_K_S", "blk.3.attn_output.weight", (4096, 4096), moe, tied=False) == "Q5_K"
    assert tensor_type("Q4_K_M", "blk.3.ffn_gate_inp.weight", (8, 4096), moe, tied=False) is None
    big = ModelShape(n_layers=80, n_gqa=8, is_70b=True)
    assert tensor_type("Q4_K_M", "blk.13.attn_v.weight", (1024, 8192), big, tied=False) == "Q5_K"  # Q4_K → Q5_K
    assert tensor_type("Q4_K_M", "blk.12.attn_v.weight", (1024, 8192), big, tied=False) == "Q6_K"  # more bits


def test_unknown_mix_is_refused():
    with pytest.raises(ValueError, match="unknown GGUF mix 'Q4_K_X'"):
        smol("Q4_K_X", "blk.0.attn_q.weight", (576, 576))
    assert set(MIXES) == {"Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q3_K_M", "Q3_K_L", "Q2_K", "Q8_0"}


def _llama_quantize(src, dst, mix: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, the code of llama-quantize) for ``mix``."""
    import ctypes
    import os

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    assert rc == 0


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_path):
    from strata_quant.pipeline.fixtures import _fetch_smollm2_gguf

    return _fetch_smollm2_gguf()  # the fixture's own Q4_1 file (30 layers, 576 wide, tied embedding)


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_types_are_llama_quantizes_choices_on_smollm2(mix, smollm2_gguf, tmp_path):
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    dst = tmp_path / f"smol-{mix}.gguf"
    _llama_quantize(smollm2_gguf, dst, mix)
    reader = GGUFReader(dst)
    fields = {f.name: f for f in reader.fields.values()}
    n_layers = int(fields["llama.block_count"].parts[-1][0])
    n_gqa = int(fields["llama.attention.head_count"].parts[-1][0]) // int(
        fields["llama.attention.head_count_kv"].parts[-1][0]
    )
    names = [t.name for t in reader.tensors]
    model = ModelShape(n_layers=n_layers, n_gqa=n_gqa)
    checked = 0
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # torch order: rows along the last dim
        want = tensor_type(mix, t.name, shape, model, tied="output.weight" not in names)
        if want is None:
            assert t.tensor_type.name == "F32", t.name
            continue
        assert t.tensor_type.name == want, f"{mix}: {t.name} {shape} is {t.tensor_type.name}, rules say {want}"
        checked += 1
    assert checked == 1 + 7 * n_layers


# ------------------------------------------------------------------------------------- llama.cpp's dry run


def _file_types(path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def test_skeleton_is_the_layout_with_no_data(tiny_model_path, tmp_path):
    from gguf import GGUFReader

    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.formats.gguf import write_skeleton

    reader = open_checkpoint(tiny_model_path)
    path = write_skeleton(reader, tmp_path / "skeleton.gguf")
    gguf = GGUFReader(path)
    weights = [t for t in gguf.tensors if len(t.shape) == 2]
    assert weights and all(t.tensor_type.name == "F16" and not np.asarray(t.data).any() for t in weights)
    last = max(gguf.tensors, key=lambda t: t.data_offset)
    assert path.stat().st_size >= last.data_offset + last.n_bytes  # every tensor's bytes lie in the file
    assert path.stat().st_blocks * 512 < path.stat().st_size // 4  # ... as a hole: nothing of the data is written


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_M"])
def test_dry_run_of_the_skeleton_is_llama_quantizes_file_on_smollm2(mix, smollm2_path, smollm2_gguf, tmp_path):
    """The types read from llama.cpp's dry run on strata's skeleton of the HF checkpoint are those of the file
    llama-quantize writes from the model's own GGUF (the tool where built, else its code through the bindings)."""
    pytest.importorskip("llama_cpp")
    import subprocess

    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.formats.gguf import mix_types

    dst = tmp_path / f"smol-{mix}.gguf"
    tool = Path.home() / ".cache/strata/llama.cpp/bin/llama-quantize"
    if tool.exists():
        cmd = [str(tool), "--allow-requantize", str(smollm2_gguf), str(dst), mix, "2"]
        subprocess.run(cmd, check=True, capture_output=True)
    else:
        _llama_quantize(smollm2_gguf, dst, mix)
    real = _file_types(dst)
    assert mix_types(open_checkpoint(smollm2_path), mix) == real
    assert {"Q5_0", "Q8_0"} <= set(real.values())  # 576-wide rows fall back: the choice is not the base type


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_dry_run_agrees_with_the_rules_on_every_mix(family, tmp_path):
    """llama.cpp's dry run and the transcribed rules give every tensor the same type, for every mix."""
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.formats.gguf import dry_run_types, write_skeleton

    reader = open_checkpoint(fixtures.resolve(f"fixture:{family}"))
    cfg = reader.config
    model = ModelShape(cfg["num_hidden_layers"], cfg["num_attention_heads"] // cfg["num_key_value_heads"])
    skeleton = write_skeleton(reader, tmp_path / "skeleton.gguf")
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in GGUFReader(skeleton).tensors}
    for mix in sorted(MIXES):
        types = dry_run_types(skeleton, mix)
        assert set(types) == set(shapes)
        tied = "output.weight" not in types
        for name, got in types.items():
            want = tensor_type(mix, name, shapes[name], model, tied=tied) or "F32"
            assert got == want, f"{family} {mix}: {name} {shapes[name]} is {got}, rules say {want}"
