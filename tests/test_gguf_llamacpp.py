"""strata's GGUF files in llama.cpp itself (llama-cpp-python), against transformers carrying the solver's weights.

* The tiny model (sym 4-bit → Q4_0, asym 4-bit → Q5_0, both exact) and SmolLM2 (Q4_0) load in llama.cpp; its
  logits on a token sequence agree with the transformers model that holds the solver's dequantized weights
  (fp32): top-1 agreement ≥ 0.9 (tiny, random weights, near-ties) / ≥ 0.95 (SmolLM2) and mean |Δ| well under
  the logit std. A wrong Q/K permutation, nibble order or scale would break both.
* llama.cpp tokenizes like the HF tokenizer from our tokenizer metadata (SmolLM2: pre "smollm").
* Q4_K_M is a named fallback: re-quantized by llama.cpp from an F16 GGUF of the dequantized solver output,
  marked in the file (strata.requantized / strata.source_type) and measured against the solver's weights.
* SmolLM2 Q4_0 perplexity on Persuasion windows in llama.cpp vs in transformers.

Numbers are printed (run with -s to see them).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from strata_quant.pipeline.assemble import assemble_gguf
from strata_quant.pipeline.checkpoint import CheckpointReader
from strata_quant.pipeline.formats.gguf import read_metadata
from strata_quant.pipeline.verify import (
    FLIP_MARGIN_LIMIT,
    VerifyError,
    check_llamacpp,
    compare_logits,
    llamacpp_disagreements,
    llamacpp_logits,
    llamacpp_perplexity,
    load_llamacpp,
    verify_gguf,
)
from strata_quant.workers.result import QuantSpec
from tests.test_gguf_format import stored_results

pytest.importorskip("llama_cpp")

SENTENCE = "Anne Elliot walked to Uppercross, 12 miles — and wrote: “It's done!”"


def _dense(model_path: Path, results: dict) -> torch.nn.Module:
    """The fp32 checkpoint with every quantized linear replaced by the solver's dequantized weight."""
    from strata_quant.pipeline.eval import load_reference, with_weights

    return with_weights(load_reference(model_path), {k: r.dequantize() for k, r in results.items()})


def _ids(model_path: Path, n: int) -> list[int]:
    from transformers import AutoTokenizer

    from strata_quant.pipeline.calibration import load_text

    tok = AutoTokenizer.from_pretrained(model_path)
    text = load_text("fixture:austen/persuasion")
    return tok.encode(text[20000:30000], add_special_tokens=False)[:n]


def _against_dense(path: Path, dense: torch.nn.Module, ids: list[int]) -> dict:
    llm = load_llamacpp(path, n_ctx=len(ids))
    got = llamacpp_logits(llm, ids)
    del llm
    with torch.no_grad():
        want = dense(input_ids=torch.tensor([ids])).logits[0]
    return compare_logits(got, want)


def test_llamacpp_rules_leave_position_0_out_of_the_flip_margin_only() -> None:
    """A far flip at the passage's first position passes, the same flip one position later is refused, and a
    shift of every logit breaks the mean rule wherever the flips are."""
    torch.manual_seed(0)
    want = torch.randn(6, 50)
    std = float(want.std())

    def flipped(pos: int) -> torch.Tensor:
        got = want.clone()  # llama.cpp's pick at pos: a token 1 std below transformers' best
        low = int((want[pos].max() - want[pos] - std).abs().argmin())
        got[pos, low] = want[pos].max() + 0.01
        return got

    first, broken = llamacpp_disagreements(flipped(0), want)
    assert not broken and first["top1_flip_margin"] > FLIP_MARGIN_LIMIT * std, first
    assert first["top1_flip_margin_from_1"] == 0.0
    later, broken = llamacpp_disagreements(flipped(3), want)
    assert later["top1_flip_margin_from_1"] > FLIP_MARGIN_LIMIT * std and len(broken) == 1
    assert broken[0].startswith("a top-1 flip"), broken
    _, broken = llamacpp_disagreements(want + 0.2 * std * torch.randn_like(want).sign(), want)
    assert broken and broken[0].startswith("mean"), broken


# ------------------------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def tiny(tiny_model_path, tmp_path_factory):
    reader = CheckpointReader(tiny_model_path)
    root = tmp_path_factory.mktemp("tiny-llamacpp")
    out = {"reader": reader, "root": root}
    for sym in (True, False):
        source, results = stored_results(reader, root / f"store-{sym}", QuantSpec(4, 32, sym), extreme_zeros=True)
        out[sym] = (source, results, _dense(tiny_model_path, results))
    return out


@pytest.mark.parametrize("sym,gguf_type", [(True, "Q4_0"), (False, "Q5_0")])
def test_tiny_exact_gguf_in_llamacpp_matches_the_solver(tiny, sym: bool, gguf_type: str) -> None:
    source, _, dense = tiny[sym]
    path = assemble_gguf(tiny["reader"], source, tiny["root"] / f"tiny-{gguf_type}.gguf", tokenizer_pre="smollm")
    assert read_metadata(path)["strata.target_type"] == gguf_type
    stats = _against_dense(path, dense, _ids(tiny["reader"].path, 96))
    print(f"\ntiny {gguf_type} llama.cpp vs transformers(solver weights): {stats}")
    assert stats["top1_agreement"] >= 0.9, stats
    # random weights give near-uniform attention, so the bound is tight: a file without the Q/K permutation
    # lands at ~0.017 · std (test_a_broken_layout_fails_the_llamacpp_check), a correct one at ~0.007 · std
    assert stats["mean_abs_diff"] <= 0.01 * stats["logit_std"], stats


def test_tiny_verify_gguf_with_llamacpp_and_kquant_fallback(tiny) -> None:
    source, results, dense = tiny[True]
    path = assemble_gguf(tiny["reader"], source, tiny["root"] / "tiny-Q4_K_M.gguf", gguf_type="Q4_K_M")
    meta = read_metadata(path)
    assert meta["strata.requantized"] is True and meta["strata.carry"] == "requantized"
    assert meta["strata.source_type"].startswith("F16") and meta["strata.target_type"] == "Q4_K_M"
    summary, _ = verify_gguf(path, tiny["reader"], source, llamacpp=True)
    print(f"\ntiny Q4_K_M (re-quantized): {summary}")
    assert summary["requantized"] and summary["bit_exact_linears"] == 0
    # tiny widths (128, 352) are not multiples of 256: llama.cpp falls back to legacy types, and says so
    assert set(summary["linear_types"]) <= {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"}
    assert 0 < summary["weight_error"]["rel_rms"] < 0.2
    assert summary["llamacpp"]["tokenizer_matches"] and summary["llamacpp"]["top1_agreement"] >= 0.9


def _without_qk_permutation(reader, source, path: Path, **kw) -> Path:
    """The GGUF with Q/K rows left in HF order (no rotary permutation): one layout error."""
    import strata_quant.pipeline.formats.gguf as gguf_format

    real = gguf_format.permute_qk_result
    gguf_format.permute_qk_result = lambda result, n_head: result
    try:
        return assemble_gguf(reader, source, path, **kw)
    finally:
        gguf_format.permute_qk_result = real


def test_a_broken_layout_fails_the_llamacpp_check(tiny, tmp_path: Path) -> None:
    """Q rows left in HF order (no rotary permutation): llama.cpp's logits no longer match."""
    source, _, dense = tiny[True]
    path = _without_qk_permutation(tiny["reader"], source, tmp_path / "broken.gguf")
    stats = _against_dense(path, dense, _ids(tiny["reader"].path, 96))
    print(f"\ntiny Q4_0 without the Q/K permutation: {stats}")
    assert stats["mean_abs_diff"] > 0.01 * stats["logit_std"] or stats["top1_agreement"] < 0.9


# ------------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smol(smollm2_path, tmp_path_factory):
    reader = CheckpointReader(smollm2_path)
    root = tmp_path_factory.mktemp("smol-llamacpp")
    source, results = stored_results(reader, root / "store", QuantSpec(4, 64, True))
    path = assemble_gguf(reader, source, root / "smol-Q4_0.gguf", tokenizer_pre="smollm", name="smol")
    return {"reader": reader, "root": root, "source": source, "results": results, "path": path}


@pytest.mark.slow
def test_smollm2_q4_0_logits_tokenizer_and_perplexity_in_llamacpp(smol) -> None:
    from transformers import AutoTokenizer

    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream
    from strata_quant.pipeline.eval import evaluate, load_reference

    reader, path = smol["reader"], smol["path"]
    hf = AutoTokenizer.from_pretrained(reader.path)
    llm = load_llamacpp(path, n_ctx=256)
    for text in (SENTENCE, "It is a truth universally acknowledged. <|im_start|>user\nhi<|im_end|>"):
        want = hf.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    del llm

    dense = _dense(reader.path, smol["results"])
    stats = _against_dense(path, dense, _ids(reader.path, 128))
    print(f"\nSmolLM2 Q4_0 llama.cpp vs transformers(solver weights), 128 tokens: {stats}")
    assert stats["top1_agreement"] >= 0.95, stats
    assert stats["mean_abs_diff"] <= 0.05 * stats["logit_std"], stats

    windows = eval_windows(tokenize_stream(hf, load_text("fixture:austen/persuasion")), 4, 256)
    cpp = llamacpp_perplexity(path, windows)
    rows = evaluate({"fp16": load_reference(reader.path), "strata Q4_0": dense}, windows, reference="fp16")
    hf_ppl = rows["strata Q4_0"]["ppl"]
    print(
        f"SmolLM2 Q4_0 perplexity, Persuasion 4 × 256: llama.cpp {cpp['ppl']:.3f}, transformers {hf_ppl:.3f} "
        f"(fp16 reference {rows['fp16']['ppl']:.3f})"
    )
    assert abs(math.log(cpp["ppl"] / hf_ppl)) < 0.02  # within 2%


@pytest.mark.slow
def test_smollm2_q4_k_m_is_a_marked_measured_fallback(smol) -> None:
    reader, source = smol["reader"], smol["source"]
    path = assemble_gguf(reader, source, smol["root"] / "smol-Q4_K_M.gguf", gguf_type="Q4_K_M", tokenizer_pre="smollm")
    summary, _ = verify_gguf(path, reader, source, llamacpp=True)
    print(f"\nSmolLM2 Q4_K_M re-quantized from the Q4_0 solver output: {summary}")
    assert summary["requantized"] and read_metadata(path)["strata.requantized"] is True
    assert "Q4_K" in summary["linear_types"] or "Q6_K" in summary["linear_types"]
    assert summary["weight_error"]["rel_rms"] < 0.2
    # llama.cpp's 8-bit activations flip near ties (which ones depends on the CPU): each flip is one
    lc = summary["llamacpp"]
    assert lc["top1_flip_margin"] <= 0.1 * lc["logit_std"] and lc["top1_agreement"] >= 0.75, lc


@pytest.mark.slow
def test_smollm2_without_the_qk_permutation_fails_verifys_check(smol) -> None:
    """verify's llama.cpp check, whose flip limit leaves room for 8-bit rounding, still refuses a real model's
    file with one layout error (Q/K rows in HF order): the mean |Δ| moves, not just a tail."""
    reader = smol["reader"]
    path = _without_qk_permutation(reader, smol["source"], smol["root"] / "broken.gguf", tokenizer_pre="smollm")
    # the mean rule alone refuses it: the flip margin skips position 0, the mean does not
    with pytest.raises(VerifyError, match=r"mean \|Δ\| [0-9.]+ std > 0\.1") as err:
        check_llamacpp(path, _dense(reader.path, smol["results"]), reader.path)
    print(f"\nSmolLM2 Q4_0 without the Q/K permutation: {err.value}")
