"""The model card's line on how a GGUF carries the solver's result, per ``strata.carry``."""

from __future__ import annotations

from strata_quant.pipeline.modelcard import _carry_line


def test_a_solved_mix_is_not_called_re_quantized():
    check = {"format": "gguf", "gguf_type": "Q4_K_M", "carry": "solved", "linear_types": {"Q4_K": 16, "Q6_K": 14}}
    line = _carry_line(check)
    assert "re-quantized" not in line and "nan" not in line
    assert line.startswith("Q4_K_M: every linear solved by strata") and "Q4_K ×16, Q6_K ×14" in line


def test_a_re_quantized_file_says_so_with_its_error():
    check = {"format": "gguf", "gguf_type": "Q4_K_M", "carry": "requantized", "linear_types": {"Q4_K": 1},
             "weight_error": {"max_abs": 0.5, "mean_abs": 0.01, "rel_rms": 0.02}}  # fmt: skip
    line = _carry_line(check)
    assert "**re-quantized**" in line and "relative RMS 0.02" in line and "Q4_K ×1" in line
