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


def test_quant_overrides_parsed_and_checked_before_work(tmp_path, capsys):
    from benchmarks import peers

    q = peers.parse_quant(["diag_shrink=0.2", "mse_weight=hessian", "act_order=false"])
    assert q == {"diag_shrink": 0.2, "mse_weight": "hessian", "act_order": False}
    assert peers.quant_tag(q) == "diag_shrink0.2-mse_weighthessian-act_orderFalse"
    argv = ["tiny-qwen2", "--skip", "strata,gptqmodel", "--calib-windows", "2", "--eval-windows", "2"]
    for extra, word in (
        (["--quant", "diag_shrink=0.2"], "--out"),  # never over the stored default-solver JSON
        (["--quant", "diag_shrink=1.5", "--out", str(tmp_path / "x.json")], "diag_shrink"),
        (["--quant", "no_such_option=1", "--out", str(tmp_path / "x.json")], "no_such_option"),
    ):
        with pytest.raises(SystemExit):
            family_peers.main([*argv, *extra])
        assert word in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def _stored(ids="a" * 64, ppl=10.0):
    texts = [{"label": "A", "sha256": "t"}]
    row = {"ppl": 11.0, "ppl_increase": 0.1, "kld": 0.1, "top1": 0.9}
    scores = {"A": {"fp16": {"ppl": ppl}, "GPTQModel GPTQ": row}}
    return {"calibration_ids_sha256": ids, "eval_windows": 8, "texts": texts, "grid": "W4 g128 sym", "scores": scores}


def test_peers_from_takes_rows_only_when_comparable():
    result = _stored()
    result["scores"] = {"A": {"fp16": {"ppl": 10.0}, "strata GPTQ": {"ppl": 10.5}}}
    result["meta"] = {}
    family_peers.adopt_rows(result, {**_stored(), "meta": {"GPTQModel GPTQ": {"tool": "gptqmodel"}}}, "s.json")
    assert result["scores"]["A"]["GPTQModel GPTQ"]["ppl"] == 11.0
    assert result["scores"]["A"]["strata GPTQ"]["ppl"] == 10.5  # the row run here is kept
    assert result["meta"]["GPTQModel GPTQ"]["from"] == "s.json"
    for other in (_stored(ids="b" * 64), _stored(ppl=10.1), {**_stored(), "eval_prefix": [2]}):  # BOS-first windows
        fresh = {**_stored(), "meta": {}}
        fresh["scores"] = {"A": {"fp16": {"ppl": 10.0}}}
        with pytest.raises(SystemExit, match="not comparable"):
            family_peers.adopt_rows(fresh, other, "s.json")
        assert set(fresh["scores"]["A"]) == {"fp16"}


def test_calibration_text_gives_both_tools_the_runs_own_ids(tiny_result, tmp_path):
    """--calibration: the ids file GPTQModel reads holds the very windows strata's run calibrates on
    (pipeline.run.prepare), recorded as that text, refused without --out or when it cannot be read."""
    import torch
    from safetensors.torch import load_file

    from benchmarks import peers
    from strata_quant.pipeline.config import load_config
    from strata_quant.pipeline.run import prepare

    mix = "fixture:calib-mix"
    out = tmp_path / "mix.json"
    argv = ["tiny-qwen2", "--skip", "strata,gptqmodel", "--calib-windows", "2", "--eval-windows", "2"]
    argv += ["--group-size", "64", "--threads", "1"]
    for extra in (["--calibration", mix], ["--calibration", "fixture:no-such-text", "--out", str(out)]):
        with pytest.raises(SystemExit):
            family_peers.main([*argv, *extra])
    assert not out.exists()
    mixed = family_peers.main([*argv, "--calibration", mix, "--out", str(out)])
    emma = tiny_result[1]
    assert (mixed["calibration"]["text"], emma["calibration"]["text"]) == (mix, "fixture:austen/emma")
    assert mixed["calibration_ids_sha256"] != emma["calibration_ids_sha256"]
    model_dir = fixtures.resolve("fixture:tiny-qwen2")
    ids = peers.calibration_ids(model_dir, 2, f"-{model_dir.name}", mix)
    assert family_peers.sha256(ids) == mixed["calibration_ids_sha256"] and ids.name.startswith("calib-calib-mix-")
    cfg = load_config(
        family_peers.ROOT / peers.STRATA_CONFIGS["gptq"],
        {"model": "fixture:tiny-qwen2", "calibration.source": mix, "calibration.num_samples": 2,
         "calibration.seq_len": peers.SEQ_LEN, "quant.group_size": 64, "output.formats": [], "eval": None},
    )  # fmt: skip
    assert torch.equal(load_file(str(ids))["input_ids"], prepare(cfg)[1])
