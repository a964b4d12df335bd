"""A llama.cpp K mix solved in the run (output.gguf_type Q4_K_M … with method gptq): every linear solved by GPTQ on
the ggml type llama.cpp's own mix gives it (its quantize dry run, pipeline/formats/gguf_mix.py), stored as ggml
blocks, written byte for byte into the whole file llama.cpp lays out, verified bit for bit and loaded in llama.cpp.
Refusals at plan time: no llama-cpp-python, a linear llama.cpp leaves in F16, another output format beside it."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from gguf import GGUFReader

from strata_quant.pipeline.config import ConfigError, parse_config
from strata_quant.workers.ggml import GGMLQuantized, gptq_ggml
from strata_quant.workers.methods import Part, quantize_parts
from strata_quant.workers.records import grid_fields, result_from_bytes, result_to_bytes
from strata_quant.workers.result import QuantSpec


def _config(tmp_path, model: str, mix: str = "Q4_K_M", formats=("gguf",), workers: int = 1):
    return parse_config(
        {
            "name": "mix",
            "model": model,
            "calibration": {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 64},
            "quant": {"method": "gptq", "bits": 4, "group_size": -1},  # the spec is unused: each type is its grid
            "run": {"workers": workers, "batch_size": 4, "store": str(tmp_path / "store")},
            "output": {"dir": str(tmp_path / "out"), "formats": list(formats), "gguf_type": mix},
            "eval": {"windows": 2, "seq_len": 64, "off_domain": None, "baselines": []},
        }
    )


@pytest.fixture(scope="module")
def k_model(tmp_path_factory):
    """A random Llama whose rows are multiples of 256 (K types, no fallback): 2 blocks, 256 wide, FFN 512."""
    from strata_quant.pipeline import fixtures

    root = tmp_path_factory.mktemp("k-model")
    return fixtures.synthetic_llama(root / "llama256", hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)


def test_ggml_result_round_trips_and_solves_by_part():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 512, generator=g) * 0.05
    x = torch.randn(600, 512, generator=g)
    h = 2 * x.t() @ x / 600
    parts = [Part("a", 8, QuantSpec(4, 32, True), ggml="Q4_K"), Part("b", 16, QuantSpec(4, 32, True), ggml="Q6_K")]
    a, b = quantize_parts("gptq", w, h, parts, {"damp": 0.01})
    assert isinstance(a, GGMLQuantized) and (a.grid.name, b.grid.name) == ("Q4_K", "Q6_K")
    assert torch.equal(a.dequantize(), gptq_ggml(w[:8], h, "Q4_K").dequantize())  # each part alone, same H
    back = result_from_bytes(result_to_bytes(b))
    assert torch.equal(back.dequantize(), b.dequantize()) and back.params == b.params
    assert grid_fields(a) == {"bits": 4, "group_size": 256, "sym": False, "kind": "ggml", "ggml_type": "Q4_K"}
    assert torch.equal(b.rows(3, 9).dequantize(), b.dequantize()[3:9])
    with pytest.raises(ValueError, match="solved by method gptq"):
        quantize_parts("rtn", w, h, parts, {})


def test_other_formats_beside_a_solved_mix_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"output.formats must be \[gguf\]"):
        _config(tmp_path, "fixture:tiny-llama", formats=("gptq", "gguf"))
    assert _config(tmp_path, "fixture:tiny-llama").output.gguf_type == "Q4_K_M"


def test_plan_refuses_without_llama_cpp(tmp_path, monkeypatch):
    from strata_quant.pipeline.run import prepare

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(ConfigError, match="need llama-cpp-python"):
        prepare(_config(tmp_path, "fixture:tiny-llama"))


def test_plan_refuses_a_linear_llama_cpp_leaves_in_f16(tmp_path):
    """Rows of 120 values: no ggml block divides them, llama.cpp's last fallback is F16; refused before block 0."""
    pytest.importorskip("llama_cpp")
    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.run import prepare

    model = fixtures.synthetic_llama(tmp_path / "odd", hidden=120, intermediate=160, layers=1, heads=4, kv_heads=2)
    with pytest.raises(ConfigError, match=r"type F16, which has no quantized grid"):
        prepare(_config(tmp_path, str(model)))


def test_plan_gives_every_linear_the_mix_type(k_model, tmp_path):
    pytest.importorskip("llama_cpp")
    from strata_quant.pipeline.run import prepare

    structure = prepare(_config(tmp_path, str(k_model)))[3]
    types = structure.ggml_types
    assert len(types) == 14
    # use_more_bits(i, 2): i ≥ 7·2/8, so layer 1's attn_v / ffn_down get Q6_K, layer 0's the base Q4_K
    assert types["model.layers.1.mlp.down_proj"] == types["model.layers.1.self_attn.v_proj"] == "Q6_K"
    assert types["model.layers.0.mlp.down_proj"] == types["model.layers.0.self_attn.q_proj"] == "Q4_K"


def _solved_run(tmp_path, model, workers: int):
    from strata_quant.pipeline.job import run_full_job

    report = run_full_job(_config(tmp_path, str(model), workers=workers), progress=False)
    (check,) = report["checks"]
    return report, check, next((tmp_path / "out").glob("*.gguf"))


def test_solved_q4_k_m_file_is_llama_cpps_layout_bit_exact_and_loads(k_model, tmp_path, ray_session):
    pytest.importorskip("llama_cpp")
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.formats.gguf import llama_quantize, mix_types, read_metadata, write_skeleton

    report, check, path = _solved_run(tmp_path, k_model, workers=2)
    assert check["bit_exact_linears"] == check["quantized_linears"] == 14, check
    assert check["carry"] == "solved" and set(check["linear_types"]) == {"Q4_K", "Q6_K"}
    file_types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert file_types == mix_types(open_checkpoint(k_model), "Q4_K_M")  # every tensor, embedding included
    assert file_types["token_embd.weight"] == "Q6_K"  # tied head, as llama.cpp's mix gives it
    assert "llama.cpp" in check["reader"] and check["llamacpp"]["top1_agreement"] >= 0.9, check["llamacpp"]
    meta = read_metadata(path)
    keys = {"strata.version", "strata.method", "strata.carry", "strata.target_type"}  # the rest the tensor types say
    assert meta["strata.carry"] == "solved" and set(meta) == keys
    assert report["solved_blocks"] == 2
    # against llama.cpp's own file of the mix (llama_model_quantize of the same model's F16 GGUF, the same header
    # writer): the same tensor data to the byte, and a header larger by the four strata keys alone
    ours = GGUFReader(path)
    name = ours.fields["general.name"].contents()
    skeleton = write_skeleton(open_checkpoint(k_model), tmp_path / "f16.gguf", str(k_model), name)
    llama_quantize(skeleton, tmp_path / "llama-Q4_K_M.gguf", "Q4_K_M", allow_requantize=True, nthread=1)
    theirs = GGUFReader(tmp_path / "llama-Q4_K_M.gguf")
    assert {t.name: t.tensor_type.name for t in theirs.tensors} == file_types
    data = path.stat().st_size - ours.data_offset
    assert data == (tmp_path / "llama-Q4_K_M.gguf").stat().st_size - theirs.data_offset
    assert set(ours.fields) - set(theirs.fields) == keys
    key_bytes = sum(p.nbytes for k in keys for p in ours.fields[k].parts)
    assert ours.data_offset - theirs.data_offset <= key_bytes + 31  # the rest is the data's 32-byte alignment


def test_mostly_q4_0_is_llama_cpps_q4_0_file_solved_in_the_run(k_model, tmp_path, ray_session):
    """MOSTLY_Q4_0 (llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_0): every tensor typed as llama.cpp's Q4_0 file, each linear
    solved by GPTQ on the Q4_0 grid with the shrunk Hessian and its codes refined (quant.refine_passes), bit-exact
    in the file; plain Q4_0 stays the solver's grid carried exactly."""
    pytest.importorskip("llama_cpp")
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.formats.gguf import mix_types, read_metadata
    from strata_quant.pipeline.job import run_full_job

    cfg = _config(tmp_path, str(k_model), mix="MOSTLY_Q4_0").model_dump()
    cfg["quant"]["diag_shrink"] = 0.3
    cfg["quant"]["refine_passes"] = 1
    report = run_full_job(parse_config(cfg), progress=False)
    (check,) = report["checks"]
    path = next((tmp_path / "out").glob("*.gguf"))
    assert path.name == "mix-MOSTLY_Q4_0.gguf"
    assert check["bit_exact_linears"] == check["quantized_linears"] == 14 and set(check["linear_types"]) == {"Q4_0"}
    file_types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert file_types == mix_types(open_checkpoint(k_model), "Q4_0")
    meta = read_metadata(path)
    assert meta["strata.target_type"] == "Q4_0" and meta["strata.carry"] == "solved"
    with pytest.raises(ConfigError, match="MOSTLY_Q4_0 is llama.cpp's file solved by GPTQ in the run: method gptq"):
        parse_config({**cfg, "quant": {"method": "rtn"}})


@pytest.mark.slow
def test_smollm2_q4_k_m_solved_in_the_run(smollm2_path, tmp_path, ray_session):
    """SmolLM2 (576 wide: llama.cpp's Q4_K_M falls back to Q5_0 / Q8_0 for most rows, Q4_K / Q6_K for ffn_down):
    every linear of the file is strata's solve, bit for bit, on the type llama-quantize gives it; llama.cpp loads
    the file and agrees with transformers reading it."""
    pytest.importorskip("llama_cpp")
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.formats.gguf import mix_types

    report, check, path = _solved_run(tmp_path, "fixture:smollm2-135m", workers=1)
    print(f"\nSmolLM2 Q4_K_M solved: {check}\nquality: {report['quality']['rows']}")
    assert check["bit_exact_linears"] == check["quantized_linears"] == 30 * 7, check
    assert set(check["linear_types"]) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}, check["linear_types"]
    file_types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert file_types == mix_types(open_checkpoint(smollm2_path), "Q4_K_M")
    # llama.cpp's K-quant and legacy dot products round the activations to 8 bits (Q8_K / Q8_0): its logits on
    # verify's short prompt (26 tokens) stay close to transformers' reading of the same file, near-ties aside
    lc = check["llamacpp"]
    assert lc["top1_agreement"] >= 0.9 and lc["mean_abs_diff"] <= 0.1 * lc["logit_std"], lc
    _same_perplexity_in_llamacpp_and_transformers(path, smollm2_path)


def _same_perplexity_in_llamacpp_and_transformers(path, model_path) -> None:
    """Persuasion, 4 × 256 tokens: llama.cpp's perplexity of the file within 2 % of transformers' of the same file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream
    from strata_quant.pipeline.eval import evaluate
    from strata_quant.pipeline.verify import llamacpp_perplexity

    tok = AutoTokenizer.from_pretrained(model_path)
    windows = eval_windows(tokenize_stream(tok, load_text("fixture:austen/persuasion")), 4, 256)
    cpp = llamacpp_perplexity(path, windows)["ppl"]
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    got = evaluate({"file": hf}, windows, reference="file")["file"]["ppl"]
    print(f"SmolLM2 Q4_K_M solved, Persuasion 4 × 256: llama.cpp {cpp:.3f}, transformers {got:.3f}")
    assert abs(math.log(cpp / got)) < 0.02
