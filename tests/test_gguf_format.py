"""GGUF export checked with the real readers: gguf-py's dequantizer and transformers' GGUF loading."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from strata_quant.pipeline.formats.gguf import (
    GGUFStreamWriter,
    encode_q4_0,
    encode_q4_1,
    encode_q5_0,
    encode_q8_0,
    exact_type,
    hf_to_gguf_name,
    permute_qk_result,
    permute_qk_rows,
    resolve_type,
    tokenizer_metadata,
    write_gguf,
)
from strata_quant.workers.result import QuantizedLinear, QuantSpec
from strata_quant.workers.rtn import rtn_quantize

Q4_0 = GGMLQuantizationType.Q4_0
Q8_0 = GGMLQuantizationType.Q8_0


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def _gguf_dequant(blocks: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(dequantize(blocks, qtype)))


# ----------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("k,group", [(64, 32), (96, 64), (96, -1), (128, 128)])
def test_q4_0_round_trip_is_exact(k: int, group: int) -> None:
    result = rtn_quantize(_weight(24, k), QuantSpec(4, group, True))
    blocks = encode_q4_0(result)
    assert blocks.dtype == np.uint8 and blocks.shape == (24, k // 32 * 18)
    out = _gguf_dequant(blocks, Q4_0)
    assert out.shape == (24, k)
    assert torch.equal(out, result.dequantize())


@pytest.mark.parametrize("k,group", [(64, 32), (96, 64), (96, -1)])
def test_q8_0_round_trip_is_exact(k: int, group: int) -> None:
    result = rtn_quantize(_weight(16, k, seed=1), QuantSpec(8, group, True))
    blocks = encode_q8_0(result)
    assert blocks.dtype == np.uint8 and blocks.shape == (16, k // 32 * 34)
    assert torch.equal(_gguf_dequant(blocks, Q8_0), result.dequantize())


def test_q4_0_nibble_layout() -> None:
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    result = QuantizedLinear(
        spec=QuantSpec(4, 32, True),
        codes=codes,
        scales=torch.tensor([[0.5]], dtype=torch.float16),
        zeros=torch.full((1, 1), 8, dtype=torch.uint8),
        g_idx=torch.zeros(32, dtype=torch.int32),
    )
    blocks = encode_q4_0(result)
    assert blocks[0, :2].view(np.float16)[0] == np.float16(0.5)
    assert list(blocks[0, 2:]) == [j | (j << 4) for j in range(16)]  # q[j] low, q[j + 16] high


def _sym4(k: int = 64, group: int = 32) -> QuantizedLinear:
    return rtn_quantize(_weight(8, k), QuantSpec(4, group, True))


@pytest.mark.parametrize(
    "make,encoder,match",
    [
        (lambda: rtn_quantize(_weight(8, 64), QuantSpec(4, 32, False)), encode_q4_0, "asymmetric"),
        (lambda: rtn_quantize(_weight(8, 64), QuantSpec(8, 32, True)), encode_q4_0, "4-bit"),
        (lambda: rtn_quantize(_weight(8, 64), QuantSpec(8, 32, False)), encode_q8_0, "8-bit"),
        (lambda: rtn_quantize(_weight(8, 64), QuantSpec(8, 32, False)), encode_q5_0, "8-bit"),
        (lambda: rtn_quantize(_weight(8, 64), QuantSpec(8, 32, True)), encode_q4_1, "8-bit"),
        (lambda: rtn_quantize(_weight(8, 64), QuantSpec(4, 16, True)), encode_q4_0, "multiple of 32"),
        (lambda: rtn_quantize(_weight(8, 80), QuantSpec(4, -1, True)), encode_q4_0, "K=80"),
        (lambda: rtn_quantize(_weight(8, 80), QuantSpec(8, 32, True)), encode_q8_0, "K=80"),
    ],
)
def test_encoders_reject_inexact(make, encoder, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encoder(make())


def test_encoders_reject_shuffled_g_idx() -> None:
    result = _sym4(64, 32)
    result.g_idx = torch.tensor([0, 1] * 32, dtype=torch.int32)  # act-order without static groups
    with pytest.raises(ValueError, match="g_idx"):
        encode_q4_0(result)


def test_encoders_reject_non_symmetric_zero() -> None:
    result = _sym4()
    result.zeros[0, 0] = 7
    with pytest.raises(ValueError, match="zero"):
        encode_q4_0(result)


def _asym(bits: int = 4, k: int = 96, group: int = 32, seed: int = 3) -> QuantizedLinear:
    """An asymmetric result whose zero points include both ends of the range (0 and 2^b − 1)."""
    result = rtn_quantize(_weight(16, k, seed=seed), QuantSpec(bits, group, False))
    zeros = result.zeros.clone()
    zeros[0, :], zeros[1, :] = 0, result.spec.maxq
    result.zeros = zeros
    return result


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, -1), (3, 32), (2, 64)])
def test_asymmetric_results_are_exact_in_q5_0_and_q8_0(bits: int, group: int) -> None:
    result = _asym(bits, 128 if group == 64 else 96, group)
    q5 = encode_q5_0(result)
    assert q5.shape == (16, result.shape[1] // 32 * 22)
    assert torch.equal(_gguf_dequant(q5, GGMLQuantizationType.Q5_0), result.dequantize())
    assert torch.equal(_gguf_dequant(encode_q8_0(result), Q8_0), result.dequantize())


def test_symmetric_low_bit_results_are_exact_in_q4_0_and_q8_0() -> None:
    for bits in (2, 3, 4):
        result = rtn_quantize(_weight(8, 64, seed=bits), QuantSpec(bits, 32, True))
        assert torch.equal(_gguf_dequant(encode_q4_0(result), Q4_0), result.dequantize())
        assert torch.equal(_gguf_dequant(encode_q8_0(result), Q8_0), result.dequantize())


def test_q5_0_bit_layout_by_hand() -> None:
    # one block: codes 0..15 twice, zero 0 → q5 = q + 16: every fifth bit set, nibbles as Q4_0
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    result = QuantizedLinear(
        spec=QuantSpec(4, 32, False),
        codes=codes,
        scales=torch.tensor([[0.25]], dtype=torch.float16),
        zeros=torch.tensor([[0]], dtype=torch.uint8),
        g_idx=torch.zeros(32, dtype=torch.int32),
    )
    block = encode_q5_0(result)[0]
    assert block[:2].view(np.float16)[0] == np.float16(0.25)
    assert block[2:6].view("<u4")[0] == 0xFFFFFFFF
    assert list(block[6:]) == [j | (j << 4) for j in range(16)]
    result.zeros[0, 0] = 15  # q5 = q + 1: fifth bit set for no value, value 15 → 16 sets bit 15 and bit 31
    block = encode_q5_0(result)[0]
    assert block[2:6].view("<u4")[0] == (1 << 15) | (1 << 31)


def test_q4_1_is_nearly_exact_and_measured() -> None:
    result = _asym(4, 96, 32)
    blocks = encode_q4_1(result)
    assert blocks.shape == (16, 3 * 20)
    got = _gguf_dequant(blocks, GGMLQuantizationType.Q4_1)
    want = result.dequantize()
    err = (got - want).abs()
    offset = (result.scales.float() * result.zeros.float()).abs().max()
    assert float(err.max()) <= 2.0**-10 * float(offset)  # only the fp16 rounding of m = −scale·z
    assert torch.equal(got[0], want[0])  # zero point 0: m = 0 exactly
    # the same integers: d and the codes are the solver's
    assert np.array_equal(blocks.reshape(16, 3, 20)[..., :2].view(np.float16)[..., 0], result.scales.numpy())


def test_exact_and_resolved_types() -> None:
    assert exact_type(4, True) == "Q4_0" and exact_type(4, False) == "Q5_0"
    assert exact_type(8, True) == "Q8_0" and exact_type(8, False) is None
    assert exact_type(3, False) == "Q5_0" and exact_type(2, True) == "Q4_0"
    assert resolve_type("auto", 4, False) == ("Q5_0", "exact")
    assert resolve_type("Q8_0", 4, False) == ("Q8_0", "exact")
    assert resolve_type("Q4_1", 4, False) == ("Q4_1", "nearly")
    assert resolve_type("Q4_0", 4, False) == ("Q4_0", "requantized")
    assert resolve_type("Q4_K_M", 4, True) == ("Q4_K_M", "requantized")
    with pytest.raises(ValueError, match="asymmetric 8-bit"):
        resolve_type("auto", 8, False)
    with pytest.raises(ValueError, match="unknown"):
        resolve_type("Q3_X", 4, True)


# ----------------------------------------------------------------------------------------------- names / permutation


def test_hf_to_gguf_name() -> None:
    assert hf_to_gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert hf_to_gguf_name("model.norm.weight") == "output_norm.weight"
    assert hf_to_gguf_name("lm_head.weight") == "output.weight"
    assert hf_to_gguf_name("model.layers.0.input_layernorm.weight") == "blk.0.attn_norm.weight"
    assert hf_to_gguf_name("model.layers.12.self_attn.q_proj.weight") == "blk.12.attn_q.weight"
    assert hf_to_gguf_name("model.layers.1.self_attn.k_proj.weight") == "blk.1.attn_k.weight"
    assert hf_to_gguf_name("model.layers.1.self_attn.v_proj.weight") == "blk.1.attn_v.weight"
    assert hf_to_gguf_name("model.layers.1.self_attn.o_proj.weight") == "blk.1.attn_output.weight"
    assert hf_to_gguf_name("model.layers.3.post_attention_layernorm.weight") == "blk.3.ffn_norm.weight"
    assert hf_to_gguf_name("model.layers.3.mlp.gate_proj.weight") == "blk.3.ffn_gate.weight"
    assert hf_to_gguf_name("model.layers.3.mlp.up_proj.weight") == "blk.3.ffn_up.weight"
    assert hf_to_gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert hf_to_gguf_name("model.layers.3.self_attn.rotary_emb.inv_freq") is None
    assert hf_to_gguf_name("model.layers.x.mlp.up_proj.weight") is None
    assert hf_to_gguf_name("something.else") is None


def test_permute_qk_rows_hand_built() -> None:
    # 2 heads of D = 4 rows: per head, rows [a0 a1 b0 b1] (two halves) interleave to [a0 b0 a1 b1]
    t = torch.arange(8).reshape(8, 1) * torch.tensor([[1, 10]])
    out = permute_qk_rows(t, 2)
    assert out[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(out[:, 1], out[:, 0] * 10)
    assert permute_qk_rows(torch.arange(4), 1).tolist() == [0, 2, 1, 3]
    assert permute_qk_rows(np.arange(8), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ValueError):
        permute_qk_rows(torch.zeros(6, 2), 2)  # D = 3 is odd


def test_permuting_the_result_commutes_with_quantization() -> None:
    w = _weight(32, 64)
    result = rtn_quantize(w, QuantSpec(4, 32, True))
    permuted = permute_qk_result(result, 4)
    assert torch.equal(permuted.dequantize(), permute_qk_rows(result.dequantize(), 4))
    assert np.array_equal(encode_q4_0(permuted), permute_qk_rows(encode_q4_0(result), 4))
    assert torch.equal(rtn_quantize(permute_qk_rows(w, 4), QuantSpec(4, 32, True)).codes, permuted.codes)


# ----------------------------------------------------------------------------------------------- tokenizer

_WORDS = (
    "the quick brown fox jumps over lazy dog while seven wizards quietly hum old songs about rivers "
    "mountains stars and cheese; numbers like 12 345 and 6789 appear too, with punctuation! does it? yes."
).split()


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.add_tokens(["<think>"])  # a user-defined added token
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


def test_tokenizer_metadata(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    meta = tokenizer_metadata(str(tokenizer_dir))
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = hf.get_vocab()
    assert meta["model"] == "gpt2"
    assert len(meta["tokens"]) == len(vocab) == len(meta["token_types"])
    assert all(meta["tokens"][i] == t for t, i in vocab.items())
    assert meta["bos_token_id"] == vocab["<s>"] and meta["eos_token_id"] == vocab["</s>"]
    assert meta["token_types"][vocab["<s>"]] == 3 and meta["token_types"][vocab["<think>"]] == 4
    assert meta["token_types"][vocab["Ġrivers"]] == 1
    assert meta["merges"] and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in meta["merges"])
    assert meta["add_bos_token"] is False and meta["unk_token_id"] is None

    padded = tokenizer_metadata(str(tokenizer_dir), vocab_size=len(vocab) + 3)
    assert padded["tokens"][-1] == f"[PAD{len(vocab) + 2}]" and padded["token_types"][-1] == 5


def test_tokenizer_metadata_merges_both_spellings(tokenizer_dir: Path, tmp_path: Path) -> None:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    as_pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    as_strings = [" ".join(m) for m in as_pairs]
    results = []
    for spelling in (as_pairs, as_strings):
        d = tmp_path / f"tok{len(results)}"
        d.mkdir()
        for f in tokenizer_dir.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        data["model"]["merges"] = spelling
        (d / "tokenizer.json").write_text(json.dumps(data))
        results.append(tokenizer_metadata(str(d))["merges"])
    assert results[0] == results[1] == as_strings


def test_tokenizer_metadata_rejects_sentencepiece(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    unigram.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="SentencePiece"):
        tokenizer_metadata(str(tmp_path))

    sp_bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    sp_bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    sp_bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="SentencePiece"):
        tokenizer_metadata(str(tmp_path))


# ----------------------------------------------------------------------------------------------- full model


def _tiny_llama(vocab_size: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # norms: not all ones, so a mix-up would show
    return config, model


def _export(model, config, tokenizer_dir: Path, path: Path, untied_type: str = "Q8_0"):
    """Write the model; returns {hf name: expected float32 weight after loading}."""
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    state = {k: v for k, v in model.state_dict().items() if hf_to_gguf_name(k) is not None}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    plan = []  # (gguf name, type, torch shape, producer)
    expected = {}
    for hf_name, w in state.items():
        gguf_name = hf_to_gguf_name(hf_name)
        if w.ndim == 1:
            plan.append((gguf_name, "F32", tuple(w.shape), lambda w=w: w.float().numpy()))
            expected[hf_name] = w.float()
        elif hf_name == "model.embed_tokens.weight":
            plan.append((gguf_name, "F16", tuple(w.shape), lambda w=w: w.half().numpy()))
            expected[hf_name] = w.half().float()
        else:
            bits = 8 if (hf_name == "lm_head.weight" and untied_type == "Q8_0") else 4
            result = rtn_quantize(w, QuantSpec(bits, 32, True))
            expected[hf_name] = result.dequantize()
            heads = n_head if "q_proj" in hf_name else n_kv if "k_proj" in hf_name else None
            if heads is not None:
                result = permute_qk_result(result, heads)
            encoder = encode_q8_0 if bits == 8 else encode_q4_0
            plan.append((gguf_name, "Q8_0" if bits == 8 else "Q4_0", tuple(w.shape), lambda r=result, e=encoder: e(r)))

    produced = []

    def arrays():
        for _, _, _, make in plan:
            produced.append(1)
            yield make()

    write_gguf(
        str(path),
        config.to_dict(),
        str(tokenizer_dir),
        [(n, t, s) for n, t, s, _ in plan],
        arrays(),
        name="tiny-llama",
    )
    assert len(produced) == len(plan)
    return expected


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_loads_in_transformers(tokenizer_dir: Path, tmp_path: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config, model = _tiny_llama(len(hf_tok), tied)
    out_dir = tmp_path / "gguf"
    out_dir.mkdir()
    expected = _export(model, config, tokenizer_dir, out_dir / "tiny.gguf")

    # the real reader sees the layout and typed metadata llama.cpp expects
    reader = GGUFReader(out_dir / "tiny.gguf")
    names = [t.name for t in reader.tensors]
    assert ("output.weight" in names) is (not tied)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert q.tensor_type == GGMLQuantizationType.Q4_0 and list(q.shape) == [64, 64]
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert list(down.shape) == [128, 64]  # innermost (K) first
    assert next(t for t in reader.tensors if t.name == "output_norm.weight").tensor_type == GGMLQuantizationType.F32
    assert next(t for t in reader.tensors if t.name == "token_embd.weight").tensor_type == GGMLQuantizationType.F16
    assert all(t.data_offset % 32 == 0 for t in reader.tensors)
    f = reader.fields
    assert f["llama.attention.head_count_kv"].types[0].name == "UINT32"
    assert int(f["llama.attention.head_count_kv"].contents()) == 2
    assert f["llama.rope.freq_base"].types[0].name == "FLOAT32"
    assert int(f["llama.rope.dimension_count"].contents()) == 16
    assert int(f["general.quantization_version"].contents()) == 2
    assert f["tokenizer.ggml.model"].contents() == "gpt2"

    loaded = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file="tiny.gguf", dtype=torch.float32)
    assert loaded.config.num_key_value_heads == 2 and loaded.config.tie_word_embeddings is tied
    params = dict(loaded.named_parameters())
    for hf_name, want in expected.items():
        assert torch.equal(params[hf_name].detach(), want), hf_name
    if tied:
        assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)

    # same forward pass as the HF model holding the expected (dequantized) weights
    model.load_state_dict(expected, strict=False)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)

    gguf_tok = AutoTokenizer.from_pretrained(out_dir, gguf_file="tiny.gguf")
    for text in ["the quick brown fox jumps over 12345 lazy dogs!", "cheese, rivers and stars? <think> yes"]:
        assert gguf_tok.encode(text) == hf_tok.encode(text), text
    assert gguf_tok.bos_token == "<s>" and gguf_tok.eos_token == "</s>"


# ----------------------------------------------------------------------------------------------- streaming writer


def test_stream_writer_checks_order_and_sizes(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    w = GGUFStreamWriter(tmp_path / "x.gguf", config.to_dict(), None)
    assert w.add_tensor_info("a.weight", "Q4_0", (8, 64)) == 8 * 2 * 18
    assert w.add_tensor_info("b.weight", "F32", (64,)) == 256
    with pytest.raises(ValueError, match="bytes"):
        w.add_tensor_info("c.weight", "F16", (4, 4), nbytes=3)
    with pytest.raises(RuntimeError):
        w.write_data("a.weight", np.zeros((8, 36), np.uint8))
    w.write_header()
    with pytest.raises(ValueError, match="declaration order"):
        w.write_data("b.weight", np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="bytes"):
        w.write_data("a.weight", np.zeros((8, 35), np.uint8))
    w.write_data("a.weight", encode_q4_0(_sym4()))
    with pytest.raises(RuntimeError, match="missing"):
        w.close()


# ----------------------------------------------------------------------------------------------- assembled from a run


def stored_results(reader, root: Path, spec: QuantSpec, *, extreme_zeros: bool = False):
    """RTN results for every decoder linear, stored and recorded as pipeline.run does; (ResultSource, {linear:
    result}). With ``extreme_zeros`` an asymmetric result gets zero points 0 and 2^b − 1 on two rows."""
    from strata_quant.pipeline.assemble import ResultSource
    from strata_quant.pipeline.store import LocalStore, sha256_bytes
    from strata_quant.workers.records import result_to_bytes

    store = LocalStore(root)
    entries, results = [], {}
    for name in reader.tensor_names:
        linear, _, leaf = name.rpartition(".")
        if leaf != "weight" or ".layers." not in name or "norm" in linear:
            continue
        result = rtn_quantize(reader.load([name])[name].float(), spec)
        if extreme_zeros and not spec.sym:
            result.zeros[0, :], result.zeros[1, :] = 0, spec.maxq
        data = result_to_bytes(result)
        key = f"run/{linear}.safetensors"
        store.put_bytes(key, data)
        entries.append(
            {
                "name": linear,
                "key": key,
                "sha256": sha256_bytes(data),
                "bits": spec.bits,
                "group_size": spec.group_size,
                "sym": spec.sym,
            }
        )
        results[linear] = result
    return ResultSource(store, {0: {"results": entries}}), results


@pytest.fixture(scope="module")
def tiny_reader(tiny_model_path):
    from strata_quant.pipeline.checkpoint import CheckpointReader

    return CheckpointReader(tiny_model_path)


@pytest.fixture(scope="module")
def asym_source(tiny_reader, tmp_path_factory):
    return stored_results(tiny_reader, tmp_path_factory.mktemp("asym"), QuantSpec(4, 32, False), extreme_zeros=True)


@pytest.mark.parametrize("gguf_type,carry", [("auto", "exact"), ("Q8_0", "exact"), ("Q4_1", "nearly")])
def test_asymmetric_run_assembles_and_verifies_in_transformers(
    tiny_reader, asym_source, tmp_path: Path, gguf_type: str, carry: str
) -> None:
    from strata_quant.pipeline.assemble import assemble_gguf
    from strata_quant.pipeline.formats.gguf import read_metadata
    from strata_quant.pipeline.verify import verify_gguf

    source, results = asym_source
    path = assemble_gguf(tiny_reader, source, tmp_path / "tiny.gguf", gguf_type=gguf_type, tool_version="t")
    meta = read_metadata(path)
    want_type = "Q5_0" if gguf_type == "auto" else gguf_type
    assert meta["strata.carry"] == carry and meta["strata.requantized"] is False
    assert meta["strata.target_type"] == want_type and meta["strata.bits"] == 4 and meta["strata.sym"] is False
    summary, _ = verify_gguf(path, tiny_reader, source)
    assert summary["linear_types"] == {want_type: len(results)}
    assert summary["quantized_linears"] == len(results) == 21
    if carry == "exact":
        assert summary["bit_exact_linears"] == 21 and "weight_error" not in summary
    else:
        err = summary["weight_error"]
        assert 0 < err["max_abs"] < 1e-3 and err["rel_rms"] < 1e-3, err
        print(f"Q4_1 vs solver: max |Δ| {err['max_abs']:.3g}, mean |Δ| {err['mean_abs']:.3g}, rel {err['rel_rms']:.3g}")


def test_verify_catches_a_broken_exact_file(tiny_reader, asym_source, tmp_path: Path) -> None:
    """A Q5_0 file whose bytes disagree with the record (one code changed) fails verification."""
    from gguf import GGUFReader

    from strata_quant.pipeline.assemble import assemble_gguf
    from strata_quant.pipeline.verify import VerifyError, verify_gguf

    source, _ = asym_source
    path = assemble_gguf(tiny_reader, source, tmp_path / "tiny.gguf")
    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.1.ffn_up.weight")
    raw = bytearray(path.read_bytes())
    raw[int(t.data_offset) + 10] ^= 0x11  # two nibbles of the first block's codes
    path.write_bytes(bytes(raw))
    with pytest.raises(VerifyError, match="ffn|mlp.up_proj"):
        verify_gguf(path, tiny_reader, source)


def test_embedding_type_and_refusals(tiny_reader, asym_source, tmp_path: Path) -> None:
    from strata_quant.pipeline.assemble import AssembleError, assemble_gguf
    from strata_quant.pipeline.verify import verify_gguf

    source, _ = asym_source
    path = assemble_gguf(tiny_reader, source, tmp_path / "e.gguf", embedding_type="Q8_0")
    assert next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight").tensor_type == Q8_0
    summary, _ = verify_gguf(path, tiny_reader, source)
    assert summary["bit_exact_linears"] == 21
    emb = summary["quantized_other_tensors"]["model.embed_tokens.weight"]
    assert emb["type"] == "Q8_0" and emb["rel_rms"] < 0.01
    with pytest.raises(AssembleError, match="exists"):
        assemble_gguf(tiny_reader, source, path)
    src8, _ = stored_results(tiny_reader, tmp_path / "s8", QuantSpec(8, 32, False))
    with pytest.raises(AssembleError, match="asymmetric 8-bit"):
        assemble_gguf(tiny_reader, src8, tmp_path / "a8.gguf")
