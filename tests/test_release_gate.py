"""The release gate on the tiny model: output.max_ppl_increase fails run_full_job (artifacts and cards kept),
`strata verify --max-ppl-increase` exits non-zero when the artifact's held-out perplexity rises too much."""

from __future__ import annotations

import json

import pytest

from strata_quant.pipeline.cli import main
from strata_quant.pipeline.config import parse_config
from strata_quant.pipeline.job import run_full_job
from strata_quant.pipeline.verify import QualityGateError, gate_rows


def _cfg(tmp_path, **output):
    return parse_config(
        {
            "name": "gate",
            "model": "fixture:tiny-llama",
            "calibration": {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 64},
            "quant": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False},
            "run": {"workers": 1, "batch_size": 4, "store": str(tmp_path / "store")},
            "output": {"dir": str(tmp_path / "out"), "formats": ["gptq", "gguf"], **output},
            "eval": {"windows": 2, "seq_len": 64, "baselines": []},
        }
    )


def test_gate_rows() -> None:
    rows = {"fp16 (reference)": {"ppl_increase": 0.0}, "strata X": {"ppl_increase": 0.03}, "RTN": {"ppl_increase": 9}}
    assert gate_rows(rows, 0.05)["passed"] and not gate_rows(rows, 0.02)["passed"]
    assert gate_rows(rows, 0.02)["worst"] == "strata X"


def test_release_gate_pass_and_fail(tmp_path, tiny_model_path, emma_path, ray_session, capsys) -> None:
    report = run_full_job(_cfg(tmp_path, max_ppl_increase=1.0), progress=False)
    gate = report["gate"]
    assert gate["passed"]
    gguf = report["artifacts"]["gguf"]["path"]
    assert gguf.endswith("gate-Q5_0.gguf")  # asymmetric 4-bit → Q5_0, exact
    gguf_check = next(c for c in report["checks"] if c["format"] == "gguf")
    assert gguf_check["carry"] == "exact" and gguf_check["bit_exact_linears"] == 21
    card = (tmp_path / "out" / "gate-gptq" / "README.md").read_text()
    assert "| Bits | 4 |" in card and "fixture:austen/emma" in card and "8 × 64" in card and "## Quality" in card
    assert "vLLM: does not accept it (asymmetric" in card
    assert "GGUF" in (tmp_path / "out" / "gate-Q5_0.gguf.md").read_text()
    increase = gate["rows"][gate["worst"]]

    # the job fails when the gate is tighter than what it measured; the artifacts and report stay
    with pytest.raises(QualityGateError, match="quality gate FAILED") as err:
        run_full_job(_cfg(tmp_path, max_ppl_increase=increase - 0.001, overwrite=True), progress=False)
    assert err.value.report["gate"]["passed"] is False
    assert (tmp_path / "out" / "gate-gptq" / "config.json").is_file()
    assert json.loads((tmp_path / "out" / "gate-report.json").read_text())["gate"]["passed"] is False

    base = ["verify", gguf, "--run-id", report["run_id"], "--store", str(tmp_path / "store")]
    base += ["--eval-windows", "2", "--eval-seq-len", "64"]
    assert main([*base, "--max-ppl-increase", str(increase + 0.01)]) == 0
    assert "quality gate passed" in capsys.readouterr().out
    assert main([*base, "--max-ppl-increase", str(increase - 0.001)]) == 2
    assert "quality gate FAILED" in capsys.readouterr().err
