"""Eval streamed block by block (pipeline.layerwise) gives the whole-model scores."""

from __future__ import annotations

import math

import pytest
import torch

from strata_quant.pipeline.eval import EvalWindows, evaluate, rtn_weights, with_weights
from strata_quant.pipeline.layerwise import layerwise_models, reference, rtn
from strata_quant.workers.result import QuantSpec
from tests.test_eval import rtn_run  # noqa: F401  (the tiny run record, its GGUF and GPTQ folder)


def windows_of(reader, count: int, context: int) -> EvalWindows:
    from transformers import AutoTokenizer

    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream

    tokenizer = AutoTokenizer.from_pretrained(reader.path)
    stream = tokenize_stream(tokenizer, load_text("fixture:austen/persuasion"))
    return EvalWindows.from_tensor(eval_windows(stream, count, context))


def assert_same_rows(streamed: dict, whole: dict) -> None:
    assert list(streamed) == list(whole)
    for name, row in whole.items():
        got = streamed[name]
        print(name, {k: (got[k], row[k]) for k in ("ppl", "kld", "kld_p99", "top1")})
        assert got["tokens"] == row["tokens"]
        assert math.isclose(got["ppl"], row["ppl"], rel_tol=1e-5), (name, got["ppl"], row["ppl"])
        for key in ("kld", "kld_p50", "kld_p90", "kld_p99", "kld_max"):
            assert math.isclose(got[key], row[key], rel_tol=1e-3, abs_tol=1e-6), (name, key, got[key], row[key])
        assert abs(got["top1"] - row["top1"]) <= 1 / row["tokens"], (name, got["top1"], row["top1"])


@pytest.mark.parametrize("model", ["smollm2", "tiny"])
def test_layerwise_scores_equal_the_whole_model(model, smollm2_path, tiny_model_path):
    from strata_quant.pipeline.checkpoint import open_checkpoint

    torch.set_num_threads(2)
    reader = open_checkpoint(smollm2_path if model == "smollm2" else tiny_model_path)
    windows = windows_of(reader, 4, 128)
    spec = QuantSpec(4, 64, True)
    ref = reader.reference_model()
    whole = evaluate({"ref": ref, "rtn": with_weights(ref, rtn_weights(ref, spec))}, windows, reference="ref")
    del ref
    heads = layerwise_models(reader, None, windows, {"ref": reference(), "rtn": rtn(spec)})
    assert_same_rows(evaluate(heads, windows, reference="ref"), whole)


def test_layerwise_results_and_gguf_equal_the_whole_models(rtn_run, tiny_model_path):  # noqa: F811
    """The run's stored results (fake-quant) and its Q4_0 GGUF, streamed, score as the whole reference
    carrying the results and as transformers' whole-model load of the GGUF."""
    from strata_quant.pipeline import layerwise
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.eval import load_gguf_transformers, results_weights

    torch.set_num_threads(2)
    reader = open_checkpoint(tiny_model_path)
    windows = windows_of(reader, 4, 64)
    ref = reader.reference_model()
    results = rtn_run["results"]
    whole = evaluate(
        {
            "ref": ref,
            "results": with_weights(ref, results_weights(results)),
            "gguf": load_gguf_transformers(rtn_run["gguf"]),
        },
        windows,
        reference="ref",
    )
    variants = {
        "ref": layerwise.reference(),
        "results": layerwise.stored_results(results),
        "gguf": layerwise.gguf_file(rtn_run["gguf"], reader.config),
    }
    heads = layerwise_models(reader, results.store, windows, variants)
    assert_same_rows(evaluate(heads, windows, reference="ref"), whole)
    assert whole["gguf"]["kld"] > 0  # the quantized rows are not the reference's
