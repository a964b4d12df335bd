"""A GGUF mix of strata's own: a probe run records every linear's sensitivity on llama.cpp's types
(``quant.sensitivity_types``); ``strata plan RUN --gguf-mix MIX`` chooses each linear's type at the byte size
llama.cpp's MIX gives the linears (a knapsack over exact GGUF bytes); the planned run solves those types
(``output.gguf_types`` over the mix) from the probe's kept statistics, and the file is no larger than
llama.cpp's. Refusals before block 0: a key that matches nothing, a type that cannot hold a linear's rows,
per-linear types without a mix solved in the run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from gguf import GGUFReader

from strata_quant.pipeline.checkpoint import open_checkpoint
from strata_quant.pipeline.config import ConfigError, parse_config
from strata_quant.pipeline.plan import gguf_bytes, plan_gguf_types
from strata_quant.pipeline.run import fingerprint_parts
from strata_quant.pipeline.store import sha256_bytes
from strata_quant.workers.ggml import gptq_ggml, rtn_ggml
from strata_quant.workers.mixed import SENSITIVITY_MEASURE, ggml_sensitivity, hessian_error

TYPES = ["Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _config(tmp_path, model, **sections) -> dict:
    cfg = {
        "name": "probe",
        "model": str(model),
        "calibration": {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 64},
        "quant": {"method": "gptq", "bits": 4, "group_size": -1, "sensitivity_types": TYPES},
        "run": {"workers": 2, "batch_size": 4, "store": str(tmp_path / "store"), "keep_statistics": True},
        "output": {"dir": str(tmp_path / "out"), "formats": ["gguf"], "gguf_type": "Q4_K_M"},
        "eval": None,
    }
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values}
    return cfg


def test_ggml_sensitivity_is_the_weighted_error_of_importance_rounding_on_each_type():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 512, generator=g) * 0.05
    x = torch.randn(700, 512, generator=g) * torch.linspace(0.2, 3.0, 512)
    h = 2 * x.t() @ x / 700
    s = ggml_sensitivity(w, h, ["Q4_0", "Q4_K", "Q6_K", "Q8_0", "Q4_K"], 2.0)
    assert list(s) == ["Q4_0", "Q4_K", "Q6_K", "Q8_0"]  # each once, in the order asked
    for t, v in s.items():
        assert v == pytest.approx(hessian_error(w, rtn_ggml(w, t, torch.diag(h)).dequantize(), h) / 2.0, rel=1e-9)
    assert s["Q8_0"] < s["Q6_K"] < s["Q4_K"] < s["Q4_0"]
    rows = torch.linspace(0.5, 2.0, 16)
    weighted = ggml_sensitivity(w, h, ["Q4_K"], 2.0, row_weight=rows)["Q4_K"]
    assert weighted != pytest.approx(s["Q4_K"])  # the rows' Fisher weights count
    # a tall linear: the sum over its rows estimated from evenly spaced rows, N/n times their sum
    sampled = ggml_sensitivity(w, h, ["Q4_K"], 2.0, max_rows=4)["Q4_K"]
    rows4 = torch.linspace(0, 15, 4).round().long()
    assert sampled == pytest.approx(s_rows(w[rows4], h) * 16 / 4 / 2.0, rel=1e-9)
    # an estimate, not the sum: i.i.d. rows differ in error by a few per cent, so 4 of 16 land within 10 %
    assert sampled == pytest.approx(s["Q4_K"], rel=0.1)
    # solved on H, weighed by another H' (the probe's H past the sink position)
    other = 2 * x[100:].t() @ x[100:] / 600
    measured = ggml_sensitivity(w, h, ["Q4_K"], 2.0, measure=other)["Q4_K"]
    assert measured == pytest.approx(hessian_error(w, rtn_ggml(w, "Q4_K", torch.diag(h)).dequantize(), other) / 2.0)
    # rows of 96 values: no K type (block 256) holds them, the legacy types do
    short = ggml_sensitivity(w[:, :96], h[:96, :96], ["Q4_K", "Q4_0", "Q8_0"], 1.0)
    assert set(short) == {"Q4_0", "Q8_0"}
    with pytest.raises(ValueError, match="residual scale"):
        ggml_sensitivity(w, h, ["Q4_0"], 0.0)


def test_ggml_sensitivity_by_gptq_is_the_weighted_error_of_the_runs_own_solve_on_each_type():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 512, generator=g) * 0.05
    x = torch.randn(900, 512, generator=g) @ (torch.eye(512) + 0.3 * torch.randn(512, 512, generator=g) / 512**0.5)
    h = 2 * x.t() @ x / 900  # correlated inputs: GPTQ's feedback has something to recover
    opts = {"damp": 0.01, "diag_shrink": 0.3}
    s = ggml_sensitivity(w, h, ["Q4_0", "Q3_K", "Q6_K"], 2.0, method="gptq", options=opts)
    rtn = ggml_sensitivity(w, h, ["Q4_0", "Q3_K", "Q6_K"], 2.0)
    for t, v in s.items():
        solved = gptq_ggml(w, h, t, damp=0.01, diag_shrink=0.3).dequantize()
        assert v == pytest.approx(hessian_error(w, solved, h) / 2.0, rel=1e-9)
        assert v < rtn[t]  # the solve's error, below rounding's on the same grid
    # GPTQ's rows are independent given H: the sampled rows' solve is the full solve's rows
    rows4 = torch.linspace(0, 15, 4).round().long()
    sampled = ggml_sensitivity(w, h, ["Q4_0"], 2.0, method="gptq", options=opts, max_rows=4)["Q4_0"]
    full = gptq_ggml(w, h, "Q4_0", damp=0.01, diag_shrink=0.3).dequantize()
    assert sampled == pytest.approx(hessian_error(w[rows4], full[rows4], h) * 16 / 4 / 2.0, rel=1e-6)
    with pytest.raises(ValueError, match="ggml sensitivity by method 'awq'"):
        ggml_sensitivity(w, h, ["Q4_0"], 1.0, method="awq")


def s_rows(w, h) -> float:
    return hessian_error(w, rtn_ggml(w, "Q4_K", torch.diag(h)).dequantize(), h)


def _entry(shape, sens):
    return {"shape": list(shape), "sensitivity": {"4": 1.0, **sens}}  # a width's key is ignored by the type plan


def test_type_plan_moves_bytes_to_the_sensitive_linears_within_the_mix_size():
    entries = {
        "a": _entry((256, 512), {"Q4_K": 10.0, "Q5_K": 2.0, "Q6_K": 1.0, "Q3_K": 40.0}),  # sensitive
        "b": _entry((256, 512), {"Q4_K": 0.2, "Q5_K": 0.15, "Q6_K": 0.1, "Q3_K": 0.3}),  # not
        "c": _entry((256, 512), {"Q4_K": 0.2, "Q5_K": 0.15, "Q6_K": 0.1, "Q3_K": 0.3}),
    }
    mix = {"a": "Q4_K", "b": "Q4_K", "c": "Q4_K"}
    plan = plan_gguf_types(entries, "Q4_K_M", mix)
    assert plan.budget_bytes == 3 * gguf_bytes("Q4_K", 256, 512)
    assert plan.stored_bytes <= plan.budget_bytes
    assert plan.stored_bytes == sum(gguf_bytes(t, 256, 512) for t in plan.types.values())
    assert plan.types["a"] in ("Q5_K", "Q6_K") and plan.types["b"] == plan.types["c"] == "Q3_K"
    assert plan.sensitivity < plan.mix_sensitivity == pytest.approx(10.4)
    assert plan.overrides == {n: t for n, t in plan.types.items() if t != "Q4_K"} and "differ" in plan.summary()
    # the mix's own types are the answer when nothing is gained by moving bytes
    flat = {n: _entry((256, 512), {"Q4_K": 1.0, "Q5_K": 0.9, "Q3_K": 1.5}) for n in "abc"}
    assert plan_gguf_types(flat, "Q4_K_M", mix).overrides == {}
    with pytest.raises(ValueError, match="no choice of the recorded types fits"):
        plan_gguf_types(entries, "Q4_K_M", mix, candidates=["Q6_K"])  # all Q6_K is larger than the mix
    with pytest.raises(ValueError, match=r"none of the candidates \['Q4_0'\] holds its rows"):
        plan_gguf_types(entries, "Q4_K_M", mix, candidates=["Q4_0"])
    with pytest.raises(ValueError, match="probe with quant.sensitivity_types"):
        plan_gguf_types({"a": {"shape": [256, 512], "sensitivity": {"4": 1.0}}}, "Q4_K_M", {"a": "Q4_K"})
    with pytest.raises(ValueError, match="cannot hold rows of 96"):
        gguf_bytes("Q4_K", 8, 96)


def test_per_linear_types_need_a_mix_solved_in_the_run(tmp_path, tiny_model_path):
    cfg = _config(tmp_path, tiny_model_path)
    cfg["output"]["gguf_types"] = {"down_proj": "Q6_K"}
    assert parse_config(cfg).output.gguf_types == {"down_proj": "Q6_K"}
    for output in ({"gguf_type": "auto"}, {"gguf_type": "Q4_0"}):
        with pytest.raises(ConfigError, match="need gguf output of a mix solved in the run"):
            parse_config({**cfg, "output": {**cfg["output"], **output}})
    with pytest.raises(ConfigError, match="need gguf output of a mix solved in the run"):
        parse_config({**cfg, "quant": {**cfg["quant"], "method": "rtn"}})
    with pytest.raises(ConfigError, match="Input should be"):  # a type strata has no grid for
        parse_config({**cfg, "output": {**cfg["output"], "gguf_types": {"down_proj": "IQ2_XS"}}})
    with pytest.raises(ConfigError, match="sensitivity probe .* needs a forward"):
        parse_config({**cfg, "calibration": {**cfg["calibration"], "statistics": "some-run"}})


def test_refine_passes_need_a_mix_solved_in_the_run(tmp_path, tiny_model_path):
    cfg = _config(tmp_path, tiny_model_path)
    cfg["quant"]["refine_passes"] = 2
    assert parse_config(cfg).quant.refine_passes == 2
    for output in ({"gguf_type": "auto"}, {"gguf_type": "Q4_0"}, {"formats": ["gptq"]}):
        with pytest.raises(ConfigError, match="refine_passes refines codes on llama.cpp's grids"):
            parse_config({**cfg, "output": {**cfg["output"], **output}})
    # part of the solve's fingerprint when set; a run without it keeps the fingerprint it had before the option:
    # the hash of the solve's settings with no refine_passes among them
    reader, ids = open_checkpoint(tiny_model_path), torch.zeros(2, 8, dtype=torch.long)
    configs = {n: parse_config({**cfg, "quant": {**cfg["quant"], "refine_passes": n}}) for n in (0, 1, 2)}
    parts = {n: fingerprint_parts(c, reader, ids) for n, c in configs.items()}
    assert len({p["solve"] for p in parts.values()}) == 3
    quant = configs[0].quant.model_dump()
    del quant["allow_partial_group"], quant["moe"]["max_expert_stats"], quant["refine_passes"]
    solve = {"quant": quant, "propagate": "quantized", "hessian_dtype": "float64", "keep_statistics": True,
             "sensitivity_measure": SENSITIVITY_MEASURE}  # fmt: skip
    assert parts[0]["solve"] == sha256_bytes(json.dumps(solve, sort_keys=True).encode())


def test_plan_time_refusals_of_per_linear_types(tmp_path):
    """Before block 0: a key that matches no linear; a type whose block does not divide the rows (96 values
    take Q5_0 in llama.cpp's Q4_K_M, never Q4_K)."""
    pytest.importorskip("llama_cpp")
    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.run import prepare

    model = fixtures.synthetic_llama(tmp_path / "m96", hidden=96, intermediate=192, layers=1, heads=4, kv_heads=2)
    cfg = _config(tmp_path, model)
    cfg["output"]["gguf_types"] = {"model.layers.0.self_attn.q_proj": "Q8_0"}
    assert prepare(parse_config(cfg))[3].ggml_types["model.layers.0.self_attn.q_proj"] == "Q8_0"
    cfg["output"]["gguf_types"] = {r"\.q_proj$": "Q4_K"}  # a regex; a plain dotted name is one linear
    with pytest.raises(ConfigError, match=r"q_proj cannot be Q4_K: its rows of 96 values .* block of 256"):
        prepare(parse_config(cfg))
    cfg["output"]["gguf_types"] = {"q_proj": "Q8_0"}  # a plain name is the whole name: a typo here
    with pytest.raises(ConfigError, match="'q_proj' matches no quantized linear"):
        prepare(parse_config(cfg))


def test_another_mix_under_the_same_name_is_a_new_run_not_a_resume(tmp_path):
    """The per-linear types are part of what a run's results depend on: a run of the same name, store and
    calibration with other types gets a run of its own instead of resuming the first one's results."""
    pytest.importorskip("llama_cpp")
    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.run import plan_run

    model = fixtures.synthetic_llama(tmp_path / "m256", hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2)
    cfg = _config(tmp_path, model, quant={"sensitivity_types": []}, run={"keep_statistics": False})
    ids = {plan_run(parse_config(cfg)).run_id}
    ids.add(plan_run(parse_config(cfg)).run_id)  # the same config: the same run
    assert len(ids) == 1
    cfg["output"]["gguf_types"] = {"model.layers.0.mlp.down_proj": "Q8_0"}
    ids.add(plan_run(parse_config(cfg)).run_id)
    cfg["output"] |= {"gguf_types": {}, "gguf_type": "Q5_K_M"}
    ids.add(plan_run(parse_config(cfg)).run_id)
    assert len(ids) == 3


def test_a_probe_under_another_sensitivity_measure_is_a_new_run(tmp_path, monkeypatch):
    """A probe's records depend on the measure's definition: a probe begun under another one is not resumed
    into a record whose blocks were measured two ways; a run that probes nothing keeps its run id."""
    pytest.importorskip("llama_cpp")
    from strata_quant.pipeline.run import plan_run
    from strata_quant.workers import mixed

    model = fixtures_llama(tmp_path)
    probe = _config(tmp_path, model)
    plain = _config(tmp_path, model, quant={"sensitivity_types": []})
    before = plan_run(parse_config(probe)).run_id, plan_run(parse_config(plain)).run_id
    monkeypatch.setattr(mixed, "SENSITIVITY_MEASURE", "another measure")
    after = plan_run(parse_config(probe)).run_id, plan_run(parse_config(plain)).run_id
    assert after[0] != before[0] and after[1] == before[1]


def fixtures_llama(tmp_path):
    from strata_quant.pipeline import fixtures

    return fixtures.synthetic_llama(tmp_path / "m256", hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def k_model(tmp_path_factory):
    """A random Llama whose rows are multiples of 256 (every K type holds them): 2 blocks, 256 wide, FFN 512."""
    from strata_quant.pipeline import fixtures

    root = tmp_path_factory.mktemp("own-mix-model")
    return fixtures.synthetic_llama(root / "llama256", hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)


def test_own_mix_from_the_probe_is_no_larger_than_llama_cpps_and_solved_from_kept_statistics(
    k_model, tmp_path, ray_session
):
    pytest.importorskip("llama_cpp")
    import yaml

    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.cli import cmd_plan
    from strata_quant.pipeline.formats.gguf import mix_types
    from strata_quant.pipeline.job import run_full_job

    probe = run_full_job(parse_config(_config(tmp_path, k_model)), progress=False)
    (check,) = probe["checks"]
    assert check["bit_exact_linears"] == 14  # the probe is itself llama.cpp's Q4_K_M, solved
    llama_file = next((tmp_path / "out").glob("*.gguf"))
    planned = tmp_path / "own.yaml"
    args = argparse.Namespace(store=str(tmp_path / "store"), run_id=probe["run_id"], gguf_mix="Q4_K_M",
                              candidates=None, out=str(planned), name="own", target_bpw=None, match_bits=None)  # fmt: skip
    assert cmd_plan(args) == 0
    data = yaml.safe_load(planned.read_text())
    own = data["output"]["gguf_types"]
    assert own and set(own.values()) <= set(TYPES)  # random weights: some linear is worth another type
    assert data["calibration"]["statistics"] == probe["run_id"] and data["quant"]["sensitivity_types"] == []
    assert "strata plan --gguf-mix Q4_K_M" in planned.read_text().splitlines()[0]

    data["output"]["dir"] = str(tmp_path / "own-out")
    report = run_full_job(parse_config(data), progress=False)
    (check,) = report["checks"]
    assert check["bit_exact_linears"] == check["quantized_linears"] == 14, check
    assert report["solved_mix"] == f"Q4_K_M, {len(own)} linear type(s) of strata's own"
    path = next((tmp_path / "own-out").glob("*.gguf"))
    file_types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    want = mix_types(open_checkpoint(k_model), "Q4_K_M")
    changed = {g for g in want if file_types[g] != want[g]}
    assert changed and all(g.startswith("blk.") for g in changed)  # embedding / head keep the mix's types
    assert len(changed) == len(own)
    ours, theirs = GGUFReader(path), GGUFReader(llama_file)
    assert path.stat().st_size - ours.data_offset <= llama_file.stat().st_size - theirs.data_offset
    assert "llama.cpp" in check["reader"] and check["llamacpp"]["top1_agreement"] >= 0.9, check["llamacpp"]
