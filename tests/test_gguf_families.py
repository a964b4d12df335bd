"""GGUF of every dense family strata writes, in both readers: llama.cpp (llama-cpp-python) and transformers.

Each family is a tiny random model built from transformers' own config class (widths multiples of 64), saved as an
fp16 checkpoint with SmolLM2's byte-level BPE tokenizer, quantized by RTN (sym 4-bit, group 32) into a store as
pipeline.run records results, assembled with :func:`assemble_gguf` and read back:

* transformers (``gguf_file=``): every linear bit for bit the solver's result, every other tensor the checkpoint's
  (:func:`verify_gguf`), and its logits on 96 Persuasion tokens against the checkpoint model carrying the solver's
  dequantized weights ("dense");
* llama.cpp: logits on the same tokens against the dense model, and top-1 agreement with transformers.

Families: Llama with llama3 rope and attention biases (permuted with their rows, rope_freqs tensor), Llama with
attention and MLP biases (``mlp_bias``), Mistral,
Qwen2 (q/k/v biases, tied embeddings) and Qwen2 with yarn rope, Qwen3 (q/k norms, head_dim ≠ hidden / heads),
Gemma 3 (four norms, +1 norm convention, head_dim 256, sliding window 16 on one of two layers, tied output) and
Phi-3 (fused qkv_proj / gate_up_proj) with and without longrope. Numbers are printed (run with -s).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from strata_quant.pipeline.assemble import AssembleError, assemble_gguf
from strata_quant.pipeline.checkpoint import CheckpointReader
from strata_quant.pipeline.formats.gguf import GGUFError, check_gguf, llama3_rope_factors
from strata_quant.pipeline.verify import compare_logits, llamacpp_logits, load_llamacpp, verify_gguf
from strata_quant.workers.result import QuantSpec
from tests.test_gguf_format import stored_results

pytest.importorskip("llama_cpp")

N_TOKENS = 96
_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 256}


def _configs(vocab: int) -> dict:
    """Family → (transformers config class name, its arguments)."""
    small = {**_SMALL, "vocab_size": vocab}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    longrope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "long_factor": [1.0 + 0.5 * i for i in range(8)],
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
    }
    gemma3 = {
        **small,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 16,
    }
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    return {
        "llama3": ("LlamaConfig", {**small, **heads, "rope_parameters": llama3}),
        "llama-bias": ("LlamaConfig", {**small, **heads, "attention_bias": True}),
        # llama.cpp's llama arch reads optional ffn_{gate,up,down}.bias (TENSOR_NOT_REQUIRED, models/llama.cpp)
        "llama-mlp-bias": ("LlamaConfig", {**small, **heads, "attention_bias": True, "mlp_bias": True}),
        "mistral": ("MistralConfig", {**small, **heads, "head_dim": 16, "sliding_window": None}),
        "qwen2": ("Qwen2Config", {**small, **heads, "tie_word_embeddings": True}),
        "qwen2-yarn": ("Qwen2Config", {**small, **heads, "tie_word_embeddings": True, "rope_parameters": yarn}),
        # head_dim ≠ hidden / heads and ≠ Qwen3Config's default 128, which transformers' GGUF loader would take
        # without eval.transformers_config
        "qwen3": ("Qwen3Config", {**small, **heads, "head_dim": 32}),
        # two layers: both sliding (transformers' default pattern), and one of each (written per layer for llama.cpp)
        "gemma3": ("Gemma3TextConfig", gemma3),
        "gemma3-mixed": ("Gemma3TextConfig", {**gemma3, "layer_types": ["sliding_attention", "full_attention"]}),
        "phi3": ("Phi3Config", {**small, **heads, "original_max_position_embeddings": 256, "pad_token_id": 0}),
        "phi3-longrope": (
            "Phi3Config",
            {**small, **heads, "original_max_position_embeddings": 64, "pad_token_id": 0, "rope_parameters": longrope},
        ),
    }


def _build(family: str, tokenizer, folder: Path) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline.fixtures import _save_fp16

    cls_name, kwargs = _configs(len(tokenizer))[family]
    config = getattr(transformers, cls_name)(
        **kwargs, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones (Gemma: around 0, its weights are 1 + w)
                p.copy_((0.0 if family.startswith("gemma3") else 1.0) + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):  # zero at init: random, so a bias left out of the Q/K order would show
                p.copy_(0.2 * torch.randn_like(p))
    _save_fp16(model, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def ids(tokenizer) -> list[int]:
    from strata_quant.pipeline.calibration import load_text

    return tokenizer.encode(load_text("fixture:austen/persuasion")[20000:30000], add_special_tokens=False)[:N_TOKENS]


#: transformers' GGUF loader builds these from the file alone but reads no rope scaling (no rope-scaling key, nor the
#: rope_freqs / rope_factors tensors) and no per-layer sliding-window pattern (it assumes Gemma 3's every-6th-global):
#: its model differs from the checkpoint's, so only llama.cpp is compared with the checkpoint
HF_GGUF_LOSSY = {"llama3", "qwen2-yarn", "phi3-longrope", "gemma3-mixed"}
#: transformers' GGUF loader cannot build these: its llama config has no attention_bias nor mlp_bias
HF_GGUF_CANNOT = {"llama-bias", "llama-mlp-bias"}


@pytest.mark.parametrize("family", list(_configs(1)))
def test_family_gguf_in_llamacpp_and_transformers(family: str, tokenizer, ids, tmp_path: Path) -> None:
    from strata_quant.pipeline.eval import load_reference, with_weights

    folder = _build(family, tokenizer, tmp_path / family)
    # general.name steers both readers (llama.cpp: "phi3" means Phi-3's own tokenizer; transformers: "mistral")
    reader = CheckpointReader(folder)
    source, results = stored_results(reader, tmp_path / "store", QuantSpec(4, 32, True))
    path = assemble_gguf(reader, source, tmp_path / f"{family}.gguf", tokenizer_pre="smollm", name="tiny")
    if family not in HF_GGUF_CANNOT:
        summary, hf_gguf = verify_gguf(path, reader, source)
        assert summary["bit_exact_linears"] == summary["quantized_linears"] == len(results) > 0
        assert summary["linear_types"] == {"Q4_0": len(results)}

    names = {t.name for t in GGUFReader(path).tensors}
    assert ("rope_freqs.weight" in names) is (family == "llama3")
    assert ("rope_factors_long.weight" in names) is (family == "phi3-longrope")
    mlp_biases = {f"blk.{i}.ffn_{p}.bias" for i in range(2) for p in ("gate", "up", "down")}
    assert (mlp_biases <= names) is (family == "llama-mlp-bias")
    dense = with_weights(load_reference(folder), {k: r.dequantize() for k, r in results.items()})
    x = torch.tensor([ids])
    with torch.no_grad():
        want = dense(input_ids=x).logits[0]
    llm = load_llamacpp(path, n_ctx=len(ids))
    cpp = llamacpp_logits(llm, ids)
    del llm
    cpp_dense = compare_logits(cpp, want)
    line = (
        f"\n{family} (Q4_0 ×{len(results)}, {N_TOKENS} tokens): llama.cpp vs dense top-1 "
        f"{cpp_dense['top1_agreement']:.3f}, mean |Δ| {cpp_dense['mean_abs_diff']:.3g} (std {cpp_dense['logit_std']:.3g})"
    )
    if family not in HF_GGUF_CANNOT:
        with torch.no_grad():
            hf = hf_gguf(input_ids=x).logits[0]
        hf_dense, cpp_hf = compare_logits(hf, want), compare_logits(cpp, hf)
        line += (
            f"; llama.cpp vs transformers(GGUF) top-1 {cpp_hf['top1_agreement']:.3f}, "
            f"transformers(GGUF) vs dense max |Δ| {hf_dense['max_abs_diff']:.3g}"
        )
    print(line)
    # llama.cpp computes the model the checkpoint describes, from the file alone
    assert cpp_dense["top1_agreement"] >= 0.95, cpp_dense
    # Gemma 3 (head_dim 256) has the widest dot products, which llama.cpp takes over activations rounded to Q8_0
    bound = 0.02 if family.startswith("gemma3") else 0.01
    assert cpp_dense["mean_abs_diff"] <= bound * cpp_dense["logit_std"], cpp_dense
    if family not in HF_GGUF_LOSSY | HF_GGUF_CANNOT:
        assert hf_dense["max_abs_diff"] <= 1e-3 * hf_dense["logit_std"], hf_dense
        assert cpp_hf["top1_agreement"] >= 0.95, cpp_hf


def test_eval_of_a_gemma3_gguf_reads_its_norms_as_the_model_takes_them(tokenizer, ids, tmp_path: Path) -> None:
    """The run's eval of a GGUF (pipeline.layerwise.gguf_file, block by block) scores the model the file holds:
    Gemma 3's file stores its norms as 1 + w, which the eval takes back to w, so the streamed GGUF scores as the
    whole checkpoint carrying the same results (read as the file stores them, each norm 1 off, it is noise)."""
    from strata_quant.pipeline import layerwise
    from strata_quant.pipeline.eval import EvalWindows, evaluate, load_reference, with_weights

    folder = _build("gemma3", tokenizer, tmp_path / "gemma3")
    reader = CheckpointReader(folder)
    source, results = stored_results(reader, tmp_path / "store", QuantSpec(4, 32, True))
    path = assemble_gguf(reader, source, tmp_path / "gemma3.gguf", tokenizer_pre="smollm", name="tiny")
    windows = EvalWindows.from_tensor(torch.tensor([ids[:48], ids[48:96]]))
    ref = load_reference(folder)
    dense = with_weights(ref, {k: r.dequantize() for k, r in results.items()})
    whole = evaluate({"ref": ref, "gguf": dense}, windows, reference="ref")
    variants = {"ref": layerwise.reference(), "gguf": layerwise.gguf_file(path, reader.config)}
    streamed = evaluate(layerwise.layerwise_models(reader, source.store, windows, variants), windows, reference="ref")
    print(f"\ngemma3 GGUF streamed: {streamed['gguf']}; whole: {whole['gguf']}")
    assert whole["gguf"]["kld"] > 0
    assert streamed["gguf"]["ppl"] == pytest.approx(whole["gguf"]["ppl"], rel=1e-3)
    assert streamed["gguf"]["kld"] == pytest.approx(whole["gguf"]["kld"], rel=1e-2, abs=1e-5)


def test_llamacpp_check_starts_the_passage_as_the_tokenizer_starts_a_prompt(tokenizer, tmp_path: Path) -> None:
    """verify's llama.cpp check runs the passage as the model is prompted: with a tokenizer that puts BOS first
    (Gemma's), the compared positions are BOS then the passage; the checkpoint-equal file passes."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from strata_quant.pipeline.eval import load_reference, with_weights
    from strata_quant.pipeline.prompts import LLAMACPP_PASSAGE
    from strata_quant.pipeline.verify import check_llamacpp

    folder = _build("gemma3", tokenizer, tmp_path / "gemma3")
    with_bos = AutoTokenizer.from_pretrained(folder)  # SmolLM2's, putting its BOS first as Gemma's does
    bos = with_bos.bos_token
    with_bos._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, with_bos.bos_token_id)]
    )
    with_bos.save_pretrained(folder)
    reader = CheckpointReader(folder)
    source, results = stored_results(reader, tmp_path / "store", QuantSpec(4, 32, True))
    path = assemble_gguf(reader, source, tmp_path / "gemma3.gguf", tokenizer_pre="smollm", name="tiny")
    dense = with_weights(load_reference(folder), {k: r.dequantize() for k, r in results.items()})
    out = check_llamacpp(path, dense, folder)
    passage = len(tokenizer.encode(LLAMACPP_PASSAGE, add_special_tokens=False))
    assert AutoTokenizer.from_pretrained(folder)("a")["input_ids"][0] == with_bos.bos_token_id
    assert out["tokens"] == passage + 1, out


def test_gemma3_norms_without_the_shift_fail_in_llamacpp(tokenizer, ids, tmp_path: Path, monkeypatch) -> None:
    """Gemma's norms written as stored (w, not 1 + w): llama.cpp computes another model, and the check sees it."""
    import strata_quant.pipeline.formats.gguf as gguf_format
    from strata_quant.pipeline.eval import load_reference, with_weights

    folder = _build("gemma3", tokenizer, tmp_path / "gemma3")
    monkeypatch.setattr(gguf_format.GGUFLayout, "norm_shift", lambda self, name: 0.0)
    reader = CheckpointReader(folder)
    source, results = stored_results(reader, tmp_path / "store", QuantSpec(4, 32, True))
    path = assemble_gguf(reader, source, tmp_path / "broken.gguf", tokenizer_pre="smollm", name="tiny")
    dense = with_weights(load_reference(folder), {k: r.dequantize() for k, r in results.items()})
    with torch.no_grad():
        want = dense(input_ids=torch.tensor([ids])).logits[0]
    llm = load_llamacpp(path, n_ctx=len(ids))
    stats = compare_logits(llamacpp_logits(llm, ids), want)
    del llm
    print(f"\ngemma3 without the +1 norm shift: {stats}")
    assert stats["mean_abs_diff"] > 0.1 * stats["logit_std"] and stats["top1_agreement"] < 0.5, stats


# ------------------------------------------------------------------------------------------------ rope, refusals


def test_llama3_rope_freqs_equal_transformers_own_llama3_frequencies() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = _configs(1)["llama3"][1]["rope_parameters"]
    config = LlamaConfig(**_SMALL, num_attention_heads=4, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    factors = torch.from_numpy(llama3_rope_factors(config.to_dict()))
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == 8.0  # both ends of the ramp
    torch.testing.assert_close(base / factors, scaled, rtol=1e-6, atol=0)


def _cfg(arch: str, **kw) -> dict:
    return {
        "architectures": [arch],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "vocab_size": 320,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        **kw,
    }


@pytest.mark.parametrize(
    "config,match",
    [
        (_cfg("Gemma2ForCausalLM"), "no GGUF layout for architecture \\['Gemma2ForCausalLM'\\]"),
        (_cfg("GPTNeoXForCausalLM"), "GPTNeoXForCausalLM"),
        (_cfg("LlamaForCausalLM", rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
        (_cfg("Qwen2ForCausalLM", rope_parameters={"rope_type": "llama3", "factor": 8.0}), "rope type 'llama3'"),
        (_cfg("LlamaForCausalLM", rope_parameters={"rope_type": "longrope"}), "rope type 'longrope'"),
        (_cfg("LlamaForCausalLM", rope_parameters={"rope_type": "yarn", "factor": 4.0}), "original_max_position"),
        (_cfg("LlamaForCausalLM", rope_parameters={"rope_type": "linear"}), "needs a factor"),
        (
            _cfg(
                "Phi3ForCausalLM",
                original_max_position_embeddings=64,
                rope_parameters={"rope_type": "longrope", "long_factor": [1.0], "short_factor": [1.0]},
            ),
            "long_factor of 8 values",
        ),
        (
            _cfg("Qwen2ForCausalLM", sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
            "sliding-window layers",
        ),
        (_cfg("Gemma3ForCausalLM", head_dim=32, query_pre_attn_scalar=16), "query_pre_attn_scalar"),
        (_cfg("Gemma3ForCausalLM", head_dim=32, attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    ],
)
def test_check_gguf_refuses_what_llamacpp_cannot_read(config: dict, match: str) -> None:
    with pytest.raises(GGUFError, match=match):
        check_gguf(config)


def test_check_gguf_names_every_tensor_or_refuses() -> None:
    config = _cfg("Qwen2ForCausalLM")
    names = ["model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.bias", "model.layers.0.rotary_emb.inv_freq"]
    layout = check_gguf(config, names)
    assert layout.arch == "qwen2" and layout.name(names[1]) == "blk.1.attn_k.bias" and layout.qk_heads(names[1]) is None
    with pytest.raises(GGUFError, match="no GGUF name for 1 tensor.*model.layers.0.mlp.experts.gate.weight"):
        check_gguf(config, [*names, "model.layers.0.mlp.experts.gate.weight"])


def test_check_gguf_refuses_a_tokenizer_llamacpp_cannot_get(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0)).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(GGUFError, match="GGUF tokenizer: .*SentencePiece"):
        check_gguf(_cfg("LlamaForCausalLM"), tokenizer_dir=tmp_path)


def test_assembly_refuses_an_unknown_family_before_writing(tiny_model_path, tmp_path: Path) -> None:
    reader = CheckpointReader(tiny_model_path)
    source, _ = stored_results(reader, tmp_path / "store", QuantSpec(4, 32, True))
    reader.config = {**reader.config, "architectures": ["Gemma2ForCausalLM"]}
    with pytest.raises(AssembleError, match="no GGUF layout"):
        assemble_gguf(reader, source, tmp_path / "out.gguf")
    assert not any(p.suffix == ".gguf" or ".tmp" in p.name for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ through the run


def test_run_refuses_a_rope_type_without_gguf_form_before_block_0(tmp_path, tiny_model_path, capsys) -> None:
    import json

    from tests.test_bad_input import assert_nothing_complete, run_cli, tiny_dict

    folder = tmp_path / "model"
    folder.mkdir()
    for f in Path(tiny_model_path).iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((Path(tiny_model_path) / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    cfg = tiny_dict(tmp_path, str(folder), output={"formats": ["gptq", "gguf"]})
    msg = run_cli(tmp_path, cfg, capsys)
    assert "rope type 'dynamic' of LlamaForCausalLM has no GGUF form" in msg
    assert_nothing_complete(tmp_path)


def test_run_refuses_a_family_without_gguf_layout_before_block_0(
    tmp_path, tiny_model_path, capsys, monkeypatch
) -> None:
    from strata_quant.pipeline.formats import gguf as gguf_format
    from tests.test_bad_input import assert_nothing_complete, run_cli, tiny_dict

    # a family the run takes (the block tracing accepts it) while the GGUF writer has no layout for it
    monkeypatch.delitem(gguf_format.FAMILIES, "LlamaForCausalLM")
    msg = run_cli(tmp_path, tiny_dict(tmp_path, str(tiny_model_path), output={"formats": ["gguf"]}), capsys)
    assert "no GGUF layout for architecture ['LlamaForCausalLM']" in msg
    assert_nothing_complete(tmp_path)


# ------------------------------------------------------------------------------------------------ tokenizers


def test_sentencepiece_style_bpe_tokenizes_in_llamacpp_as_in_transformers(tmp_path: Path) -> None:
    """A byte-fallback BPE with ▁ for spaces (Gemma's kind) is written as llama.cpp's "llama" (SentencePiece)
    vocabulary: scores from the merge order, <0xNN> tokens as bytes; llama.cpp tokenizes as transformers does."""
    from llama_cpp import Llama
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from strata_quant.pipeline.formats.gguf import GGUFStreamWriter, tokenizer_metadata
    from tests.test_gguf_format import _corpus

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator(
        _corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    meta = tokenizer_metadata(str(tmp_path))
    assert meta["model"] == "llama" and "merges" not in meta and meta["add_space_prefix"] is False
    assert meta["token_types"][specials.index("<0x41>")] == 6 and meta["token_types"][3] == 2  # BYTE, UNKNOWN

    config = {**_cfg("LlamaForCausalLM"), "vocab_size": len(meta["tokens"])}
    with GGUFStreamWriter(tmp_path / "vocab.gguf", config, str(tmp_path), name="tiny") as w:
        w.write_header()
    llm = Llama(model_path=str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("the quick brown fox jumps over 12345 lazy dogs!", "  two  spaces, 日本語 and “quotes”\n\tend"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf.encode(text, add_special_tokens=False)
