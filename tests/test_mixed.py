"""Mixed precision by sensitivity (issue #9): the recorded sensitivity, the exact stored-size budget,
the plan, and a planned run on real local Ray workers exported as GPTQ (``dynamic`` per-module
overrides, loaded by GPTQModel where its venv exists) and GGUF (per-tensor Q4_0 / Q8_0), verified."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from strata_quant.pipeline.config import ConfigError, parse_config
from strata_quant.pipeline.formats import gptq as gptq_format
from strata_quant.pipeline.overrides import bits_spec_overrides, override_pattern
from strata_quant.pipeline.plan import plan_bits, probe_entries
from strata_quant.workers.mixed import (
    channel_energy,
    choose_bits_by_cost,
    gptq_stored_bits,
    hessian_error,
    linear_sensitivity,
    output_fisher,
    residual_scale,
)
from strata_quant.workers.result import QuantSpec
from strata_quant.workers.rtn import rtn_quantize

REPO = Path(__file__).resolve().parents[1]
GPTQMODEL_PYTHON = REPO / ".venv-gptqmodel" / "bin" / "python"


# ------------------------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize("seed", range(8))
def test_choose_bits_by_cost_is_the_exact_optimum(seed) -> None:
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(6)]
    errors = {n: {b: rng.uniform(0.1, 10) * 4.0 ** (-b) for b in (3, 4, 8)} for n in names}
    params = {n: rng.choice([64, 96, 320]) for n in names}
    costs = {n: {b: params[n] * b + rng.randint(0, 40) for b in (3, 4, 8)} for n in names}
    budget = sum(costs[n][4] for n in names) + rng.randint(-50, 400)
    best = None
    for combo in itertools.product((3, 4, 8), repeat=len(names)):
        if sum(costs[n][b] for n, b in zip(names, combo)) <= budget:
            err = sum(errors[n][b] for n, b in zip(names, combo))
            best = err if best is None else min(best, err)
    choice = choose_bits_by_cost(errors, costs, budget)
    assert sum(costs[n][b] for n, b in choice.items()) <= budget
    assert sum(errors[n][b] for n, b in choice.items()) == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError):
        choose_bits_by_cost(errors, costs, sum(min(costs[n].values()) for n in names) - 1)


@pytest.mark.parametrize(("bits", "group"), [(3, 32), (4, 64), (8, 32), (4, -1)])
def test_gptq_stored_bits_is_the_packed_size(bits, group) -> None:
    result = rtn_quantize(torch.randn(96, 256), QuantSpec(bits, group, True))
    packed = gptq_format.pack_linear(result, "x")
    stored = sum(t.numel() * t.element_size() * 8 for t in packed.values())
    assert gptq_stored_bits(bits, 96, 256, group) == stored


def test_residual_scale_is_the_median_channel_and_sums_over_shards() -> None:
    h = torch.randn(4, 50, 64)
    h[..., 7] *= 1000.0  # a massive-activation channel: dominates ‖h‖², not the median
    whole = channel_energy([h])
    shards = channel_energy([h[:1]]) + channel_energy([h[1:3], h[3:]])
    assert torch.allclose(whole, shards, rtol=1e-12)
    assert whole[-1] == 200
    assert residual_scale(whole) == pytest.approx(float((h.reshape(-1, 64) ** 2).mean(0).median()), rel=1e-6)
    assert residual_scale(whole) < 2.0  # randn: ~1, the 10⁶ channel does not move it


def test_linear_sensitivity_is_the_scaled_hessian_error() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=gen)
    x = torch.randn(512, 128, generator=gen)
    h = 2 * x.T @ x / 512
    spec = QuantSpec(4, 32, True)
    s = linear_sensitivity(w, h, spec, [8, 3, 4], 2.5)
    assert list(s) == ["3", "4", "8"]
    assert s["3"] > s["4"] > s["8"] > 0
    want = hessian_error(w, rtn_quantize(w, QuantSpec(3, 32, True)).dequantize(), h) / 2.5
    assert s["3"] == pytest.approx(want, rel=1e-12)
    g = linear_sensitivity(w, h, spec, [3, 4], 2.5, method="gptq", options={"act_order": True})
    assert g["3"] < s["3"] and g["4"] < s["4"]  # GPTQ's error is what it minimises
    with pytest.raises(ValueError):
        linear_sensitivity(w, h, spec, [4], 0.0)


class _Block(nn.Module):
    """y = x + 3·b(a(x)): a's outputs reach y through b (J = 3·B), b's with gain 3 on every channel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 8, bias=False)
        self.b = nn.Linear(8, 16, bias=False)

    def forward(self, x, scale=1.0):
        return x + 3.0 * scale * self.b(self.a(x))


def test_output_fisher_estimates_the_block_jacobian_rows() -> None:
    torch.manual_seed(0)
    block = _Block()
    batches = [(torch.randn(4, 500, 16), {"scale": 1.0}) for _ in range(5)]
    probe = output_fisher(block, batches, ["a", "b"], seed=1)
    sums, energy = probe.fisher, probe.energy
    assert sums["b"][-1] == 10_000 and sums["a"][-1] == 10_000
    # ē's energy is of the block's outputs (the stream it writes), not of its inputs
    with torch.no_grad():
        outputs = [block(h, **kw) for h, kw in batches]
    assert torch.allclose(energy, channel_energy(outputs), rtol=1e-6)
    assert not torch.allclose(energy, channel_energy([h for h, _ in batches]), rtol=0.05)
    fb = sums["b"][:-1] / sums["b"][-1]
    assert torch.allclose(fb, torch.full((16,), 9.0, dtype=torch.float64), rtol=0.05)  # (3·I)ᵀ(3·I)
    want_a = 9.0 * (block.b.weight.double() ** 2).sum(0)  # diag((3B)ᵀ 3B)
    assert torch.allclose(sums["a"][:-1] / sums["a"][-1], want_a, rtol=0.05)
    again = output_fisher(block, batches, ["a", "b"], seed=1).fisher
    assert all(torch.equal(sums[n], again[n]) for n in sums)  # seeded: the same record on a rerun
    # the inputs' Gram past each sequence's first position (the attention sink), from the same forward
    tails = torch.cat([h[:, 1:].reshape(-1, 16) for h, _ in batches]).double()
    assert float(probe.rest_rows["a"]) == float(probe.rest_rows["b"]) == 5 * 4 * 499
    gram = tails.T @ tails  # summed in float32 by the probe: equal to 10⁻⁶ of its diagonal
    assert torch.allclose(probe.rest["a"], gram, rtol=1e-5, atol=1e-2)
    assert torch.allclose(probe.rest_hessian("a"), 2 * gram / tails.shape[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        mid = block.a(tails.float()).double()
    assert torch.allclose(probe.rest["b"], mid.T @ mid, rtol=1e-4, atol=1e-2)
    w = torch.randn(8, 16)
    h = torch.eye(16) * 2
    plain = linear_sensitivity(w, h, QuantSpec(4, 8, True), [4], 1.0)
    ones = linear_sensitivity(w, h, QuantSpec(4, 8, True), [4], 1.0, row_weight=torch.ones(8))
    assert plain["4"] == pytest.approx(ones["4"], rel=1e-12)
    doubled = linear_sensitivity(w, h, QuantSpec(4, 8, True), [4], 1.0, row_weight=torch.full((8,), 2.0))
    assert doubled["4"] == pytest.approx(2 * plain["4"], rel=1e-12)


class _Shared(nn.Module):
    """Two linears that read one input (as q/k/v do), then a third."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 8, bias=False)
        self.k = nn.Linear(16, 8, bias=False)
        self.o = nn.Linear(8, 16, bias=False)

    def forward(self, x):
        return x + self.o(self.q(x) * self.k(x))


def test_the_probe_sums_a_shared_input_once_and_leaves_out_each_sequences_first_position() -> None:
    torch.manual_seed(0)
    block = _Shared()
    batches = [(torch.randn(2, 30, 16), {}) for _ in range(3)]
    batches[0][0][:, 0] *= 500.0  # an outsized first position, as the attention sink's
    probe = output_fisher(block, batches, ["q", "k", "o"], seed=0)
    assert probe.rest["q"] is probe.rest["k"]  # one Gram for the input q and k share …
    assert len(probe.tensors()) == 3 + 1 + 2 + 2  # … and one all-reduce of it
    tails = torch.cat([h[:, 1:].reshape(-1, 16) for h, _ in batches]).double()
    assert torch.allclose(probe.rest["q"], tails.T @ tails, rtol=1e-5, atol=1e-3)  # the sink's rows are not in it
    assert float(probe.rest_rows["q"]) == 3 * 2 * 29
    # flattened tokens (a shared expert behind a router): no positions to tell apart, every row counts
    flat = output_fisher(block, [(torch.randn(40, 16), {})], ["q", "o"], seed=0)
    assert float(flat.rest_rows["q"]) == 40


def test_override_patterns() -> None:
    assert override_pattern("model.layers.1.mlp.down_proj") == r"^model\.layers\.1\.mlp\.down_proj$"
    assert override_pattern(r".*\.v_proj") == r".*\.v_proj"
    over = bits_spec_overrides({"model.layers.1.mlp.down_proj": 8, r"layers\.2\..*": 3})
    assert over == {r"^model\.layers\.1\.mlp\.down_proj$": {"bits": 8}, r"layers\.2\..*": {"bits": 3}}
    with pytest.raises(ConfigError, match="not a valid regex"):
        bits_spec_overrides({"layers.(": 8})
    assert gptq_format.dynamic_module_bits(
        {"dynamic": {gptq_format.dynamic_pattern("model.layers.11.mlp.down_proj"): {"bits": 8}}}
    ) == {"model.layers.11.mlp.down_proj": 8}


def test_plan_meets_the_budget_and_prefers_sensitive_linears() -> None:
    entries = {}
    for i in range(6):
        sens = 100.0 if i == 2 else 1.0
        entries[f"l{i}"] = {
            "shape": [64, 128],
            "group_size": 32,
            "sensitivity": {"3": sens * 8, "4": sens * 2, "8": sens * 0.01},
        }
    same = plan_bits(entries, base_bits=4, match_bits=4)
    assert same.stored_bits <= same.budget_bits == 6 * gptq_stored_bits(4, 64, 128, 32)
    assert same.bits["l2"] == 8 and sorted(same.bits.values()).count(3) == 4  # paid for by four 3-bit linears
    assert same.sensitivity < same.uniform_sensitivity[4]
    assert same.overrides == {n: b for n, b in same.bits.items() if b != 4}
    only48 = plan_bits(entries, base_bits=4, match_bits=4, candidates=[4, 8])
    assert set(only48.bits.values()) == {4}  # no room for an 8 without a 3
    g8 = plan_bits(entries, base_bits=4, match_bits=4, match_group=8, candidates=[4, 8])
    assert g8.budget_bits == 6 * gptq_stored_bits(4, 64, 128, 8) and g8.bits["l2"] == 8  # uniform g8 bytes
    with pytest.raises(ValueError, match="no sensitivity recorded at"):
        plan_bits(entries, base_bits=4, match_bits=4, candidates=[2, 4])
    with pytest.raises(ValueError, match="no assignment fits"):
        plan_bits(entries, base_bits=4, target_bpw=2.0)


def test_bits_overrides_config_checks(tmp_path) -> None:
    base = {
        "model": "fixture:tiny-llama",
        "calibration": {"source": "fixture:austen/emma"},
        "quant": {"method": "gptq", "group_size": 32, "bits_overrides": {"model.layers.0.mlp.down_proj": 8}},
    }
    parse_config(base)
    with pytest.raises(ConfigError, match="export as gptq / gguf only"):
        parse_config({**base, "output": {"formats": ["awq"]}})
    with pytest.raises(ConfigError, match="method gptq or rtn"):
        parse_config({**base, "quant": {**base["quant"], "method": "awq"}, "output": {"formats": ["gptq"]}})
    with pytest.raises(ConfigError, match="bits_overrides"):
        parse_config({**base, "quant": {**base["quant"], "bits_overrides": {"x": 5}}})


# ------------------------------------------------------------------------ probe → plan → run (real Ray)


def _config(tmp: Path, quant: dict, formats: list[str], name: str) -> dict:
    return {
        "name": name,
        "model": "fixture:tiny-llama",
        "calibration": {"source": "fixture:austen/emma", "num_samples": 16, "seq_len": 64},
        "quant": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, **quant},
        "run": {"workers": 2, "batch_size": 4, "store": str(tmp / "store")},
        "output": {"dir": str(tmp / "out"), "formats": formats, "overwrite": True},
        "eval": None,
    }


@pytest.fixture(scope="module")
def planned(tmp_path_factory, tiny_model_path, emma_path, ray_session):
    from strata_quant.pipeline.cli import main as cli
    from strata_quant.pipeline.config import load_config
    from strata_quant.pipeline.job import run_full_job
    from strata_quant.pipeline.run import run_job
    from strata_quant.pipeline.store import open_store

    tmp = tmp_path_factory.mktemp("mixed")
    probe = run_job(parse_config(_config(tmp, {"sensitivity_bits": [4, 8]}, [], "probe")), progress=False)
    config, entries = probe_entries(open_store(str(tmp / "store")), probe.run_id)
    weights = sum(e["shape"][0] * e["shape"][1] for e in entries.values())
    uniform4 = sum(gptq_stored_bits(4, *e["shape"], 32) for e in entries.values()) / weights
    target = f"{uniform4 + 1.0:.6f}"  # room for about a quarter of the weights at 8 bits
    cfg_path = tmp / "planned.yaml"
    store = str(tmp / "store")
    assert (
        cli(["plan", probe.run_id, "--store", store, "--target-bpw", target, "--out", str(cfg_path), "--name", "mixed"])
        == 0
    )
    plan = plan_bits(entries, base_bits=4, target_bpw=float(target))  # what the command planned
    cfg = load_config(cfg_path, {"output.formats": ["gptq", "gguf"], "output.dir": str(tmp / "out")})
    assert dict(cfg.quant.bits_overrides) == plan.overrides and cfg.quant.sensitivity_bits == []
    report = run_full_job(cfg, progress=False)
    return tmp, entries, plan, report


def _records(tmp: Path, run_id: str) -> dict[str, dict]:
    out = {}
    for path in sorted((tmp / "store" / "runs" / run_id / "blocks").glob("*/record.json")):
        for entry in json.loads(path.read_text())["results"]:
            out[entry["name"]] = entry
    return out


def test_probe_records_a_sensitivity_per_linear(planned) -> None:
    _, entries, plan, _ = planned
    assert len(entries) == 21
    for entry in entries.values():
        s = entry["sensitivity"]
        assert set(s) == {"4", "8"} and s["4"] > s["8"] > 0
    assert 0 < len(plan.overrides) < 21 and set(plan.overrides.values()) == {8}
    assert plan.stored_bits <= plan.budget_bits
    assert plan.sensitivity < plan.uniform_sensitivity[4]


def test_planned_run_carries_each_linears_bits_to_the_store_gptq_and_gguf(planned) -> None:
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from strata_quant.pipeline.formats.gguf import hf_to_gguf_name

    tmp, _, plan, report = planned
    records = _records(tmp, report["run_id"])
    assert {n: e["bits"] for n, e in records.items()} == plan.bits
    checks = {c["format"]: c for c in report["checks"]}
    assert checks["gptq"]["bit_exact_linears"] == 21 and checks["gguf"]["bit_exact_linears"] == 21

    folder = tmp / "out" / "mixed-gptq"
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 4
    assert gptq_format.dynamic_module_bits(qcfg) == plan.overrides
    tensors = load_file(folder / "model.safetensors")
    stored = 0
    for name, bits in plan.bits.items():
        rows, cols = records[name]["shape"]
        assert tensors[f"{name}.qweight"].shape == (cols * bits // 32, rows)
        assert tensors[f"{name}.qzeros"].shape == (cols // 32, rows * bits // 32)
        stored += sum(tensors[f"{name}.{s}"].numel() * 32 for s in ("qweight", "qzeros", "g_idx"))
        stored += tensors[f"{name}.scales"].numel() * 16
    assert stored == plan.stored_bits <= plan.budget_bits  # the budget, measured on the artifact's tensors

    path = tmp / "out" / "mixed-Q4_0.gguf"
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    for name, bits in plan.bits.items():
        assert types[hf_to_gguf_name(f"{name}.weight")] == {4: "Q4_0", 8: "Q8_0"}[bits]


def test_verify_rejects_a_gptq_config_that_hides_the_overrides(planned, tmp_path) -> None:
    import shutil

    from strata_quant.pipeline.assemble import ResultSource
    from strata_quant.pipeline.checkpoint import CheckpointReader
    from strata_quant.pipeline.run import load_records
    from strata_quant.pipeline.store import open_store
    from strata_quant.pipeline.verify import VerifyError, verify_gptq

    tmp, _, plan, report = planned
    folder = tmp_path / "gptq"
    shutil.copytree(tmp / "out" / "mixed-gptq", folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].pop("dynamic")
    (folder / "config.json").write_text(json.dumps(config))
    reader = CheckpointReader(report["model_path"]) if "model_path" in report else None
    if reader is None:
        from strata_quant.pipeline import fixtures

        reader = CheckpointReader(fixtures.tiny_llama())
    store = open_store(str(tmp / "store"))
    results = ResultSource(store, load_records(store, f"runs/{report['run_id']}", 3))
    with pytest.raises(VerifyError, match="config declares 4 bits, the run solved 8"):
        verify_gptq(folder, reader, results)


@pytest.mark.skipif(
    not GPTQMODEL_PYTHON.is_file(),
    reason="GPTQModel reader check needs .venv-gptqmodel (python -m venv .venv-gptqmodel; "
    ".venv-gptqmodel/bin/pip install torch==2.13.0 gptqmodel==7.6.0); NOT a pass",
)
def test_mixed_gptq_loads_in_gptqmodel(planned, tmp_path) -> None:
    """GPTQModel 7.6 reads the ``dynamic`` overrides: every linear loads at its own width and
    dequantizes to the solver's weight rounded to fp16."""
    from safetensors.torch import save_file

    from strata_quant.pipeline.run import load_records
    from strata_quant.pipeline.store import open_store
    from strata_quant.workers.records import result_from_bytes

    tmp, _, _, report = planned
    store = open_store(str(tmp / "store"))
    records = load_records(store, f"runs/{report['run_id']}", 3)
    weights = {
        f"weight:{e['name']}": result_from_bytes(store.get_bytes(e["key"])).dequantize()
        for r in records.values()
        for e in r["results"]
    }
    ids = torch.tensor([[1, 17, 200, 3, 99, 42, 7, 255]])
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.eval import with_weights

    dense = with_weights(
        AutoModelForCausalLM.from_pretrained(fixtures.tiny_llama(), dtype=torch.float32).eval(),
        {k[len("weight:") :]: v for k, v in weights.items()},
    )
    with torch.no_grad():
        logits = dense(ids).logits
    ref = tmp_path / "ref.safetensors"
    save_file({"input_ids": ids, "logits": logits.contiguous(), **weights}, ref)
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", PYTHONPATH="", STRATA_GPTQMODEL_BACKENDS="torch")
    proc = subprocess.run(
        [
            str(GPTQMODEL_PYTHON),
            str(REPO / "tests" / "readers" / "gptqmodel_check.py"),
            f"{tmp / 'out' / 'mixed-gptq'}={ref}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print("\n".join(json.dumps(out) for out in lines), file=sys.stderr)
    assert len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = lines[0]
    assert "error" not in out, out
    assert out["quantized_linears"] == 21 and out["weights_equal_fp16_of_reference"] == 21, out
    assert out["logits_max_abs_diff"] < 2e-3, out
