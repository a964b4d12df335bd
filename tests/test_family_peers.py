"""benchmarks/family_peers.py on a tiny model: RTN scored on Persuasion and the code text, the
identities recorded, the table and the strata / GPTQModel ratio line."""

from __future__ import annotations

import json

import pytest

from benchmarks import family_peers
from strata_quant.pipeline import fixtures


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    if fixtures.cached("tiny-qwen2") is None or fixtures.cached("code/python-stdlib") is None:
        pytest.skip("fixtures not built (strata fixtures --families)")
    out = tmp_path_factory.mktemp("fam") / "r.json"
    argv = ["tiny-qwen2", "--skip", "strata,gptqmodel", "--calib-windows", "2", "--eval-windows", "2"]
    result = family_peers.main([*argv, "--group-size", "64", "--threads", "1", "--out", str(out)])
    return result, json.loads(out.read_text())


def test_tiny_rtn_on_two_texts(tiny_result):
    result, saved = tiny_result
    assert [t["label"] for t in saved["texts"]] == ["Persuasion", "python-stdlib"]
    stdlib = fixtures.text_path("code/python-stdlib")
    assert saved["texts"][1]["sha256"] == family_peers.sha256(stdlib)
    assert len(saved["calibration_ids_sha256"]) == 64
    for label in ("Persuasion", "python-stdlib"):
        rows = saved["scores"][label]
        assert set(rows) == {"fp16", "RTN"}
        assert rows["fp16"]["kld"] == 0.0 and rows["fp16"]["top1"] == 1.0
        assert rows["RTN"]["kld"] > 0 and rows["RTN"]["ppl"] != rows["fp16"]["ppl"]
    # the two texts are different windows: the reference scores them differently
    assert saved["scores"]["Persuasion"]["fp16"]["ppl"] != saved["scores"]["python-stdlib"]["fp16"]["ppl"]
    assert "| RTN |" in family_peers.render(result)


def test_ratio_line():
    result = {
        "texts": [{"label": "A"}, {"label": "B"}],
        "scores": {
            label: {
                "fp16": {"ppl": 10.0},
                "strata GPTQ": {"ppl": 10.0 + s, "ppl_increase": s / 10, "kld": 0.1, "top1": 0.9},
                "GPTQModel GPTQ": {"ppl": 10.0 + g, "ppl_increase": g / 10, "kld": 0.1, "top1": 0.9},
            }
            for label, s, g in (("A", 0.7, 1.0), ("B", 0.9, 1.0))
        },
    }
    text = family_peers.render(result)
    assert "A: strata Δppl / GPTQModel Δppl = 0.70 (meets" in text
    assert "B: strata Δppl / GPTQModel Δppl = 0.90 (does not meet" in text
    assert "| RTN | — | — | — | — | — | — | — | — |" in text
