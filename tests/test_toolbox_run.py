"""NF4, GPTQ-on-NF4, FP8 and INT8 (with a linear kept in 16-bit) through the real path: a strata
run on real local Ray workers (2), results in the store, assembled, verified, and loaded by
transformers (bitsandbytes' CPU backend for NF4, compressed-tensors for FP8 and INT8)."""

from __future__ import annotations

import json

import pytest
import torch

from strata_quant.pipeline.config import ConfigError, parse_config
from strata_quant.pipeline.job import run_full_job
from strata_quant.pipeline.run import run_job
from strata_quant.workers.fp8 import fp8_quantize
from strata_quant.workers.job import WorkerJob
from strata_quant.workers.methods import KeptLinear, Part, matches_module, outlier_group, quantize_parts
from strata_quant.workers.nf4 import gptq_nf4, nf4_quantize
from strata_quant.workers.records import result_from_bytes, result_to_bytes
from strata_quant.workers.result import QuantSpec

IDS = torch.tensor([[1, 17, 200, 3, 99, 42, 7, 255, 128, 64, 5, 0, 311, 4000, 12, 9]])
N_LINEARS = 21  # 3 blocks × 7 linears


def toolbox_config(tmp_path, quant: dict, formats: list[str], workers: int = 2, eval_windows: int | None = None):
    cfg = {
        "name": "tiny",
        "model": "fixture:tiny-llama",
        "calibration": {"source": "fixture:austen/emma", "num_samples": 16, "seq_len": 64},
        "quant": quant,
        # one torch thread per worker whatever W: the damped inverse Cholesky (workers/gptq.py, LAPACK)
        # differs in the last bit between 1 and 2 threads for K >= 352, so W=1 on 2 threads and W=2 on
        # 1 thread each flipped 18 of 45056 codes of one linear here (integer GPTQ g32 flips some too)
        "run": {"workers": workers, "batch_size": 4, "store": str(tmp_path / "store"), "threads_per_worker": 1},
        "output": {"dir": str(tmp_path / "out"), "formats": formats},
        "eval": {"windows": eval_windows, "seq_len": 64, "baselines": []} if eval_windows else None,
    }
    return parse_config(cfg)


def _records(tmp, run_id):
    out = {}
    for path in sorted((tmp / "store" / "runs" / run_id / "blocks").glob("*/record.json")):
        for entry in json.loads(path.read_text())["results"]:
            out[entry["name"]] = entry
    return out


def _stored(tmp, entry):
    return result_from_bytes((tmp / "store" / entry["key"]).read_bytes())


def _dequantized_model(model_path, tmp, records, dtype=torch.float32):
    """The reference model with every quantized linear replaced by its stored, dequantized result."""
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline.eval import with_weights

    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    weights = {name: _stored(tmp, e).dequantize() for name, e in records.items() if not e.get("skipped")}
    return with_weights(ref, weights).eval()


def _logits_close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= rel * want.float().std().item(), (diff, want.float().std().item())
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


# ---------------------------------------------------------------------------------------------- NF4


# bitsandbytes 0.50.2's CPU dequantize_4bit disagrees with its own quantize_4bit when a row's length is
# not a multiple of the blocksize (the tiny model's FFN width is 352 = 11 × 32): blocks of 32 here
NF4_QUANT = {"method": "nf4", "double_quant": True, "nf4_blocksize": 32}


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory, tiny_model_path, emma_path, ray_session):
    tmp = tmp_path_factory.mktemp("nf4")
    return tmp, run_full_job(toolbox_config(tmp, NF4_QUANT, ["bitsandbytes"], eval_windows=2), progress=False)


def test_nf4_run_verifies_and_loads_in_bitsandbytes(nf4_run, tiny_model_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (extra 'bnb') is not installed")
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    tmp, report = nf4_run
    check = report["checks"][0]
    assert check["format"] == "bitsandbytes" and check["bit_exact_linears"] == N_LINEARS
    records = _records(tmp, report["run_id"])
    assert len(records) == N_LINEARS
    assert all(e["kind"] == "nf4" and e["double_quant"] for e in records.values())
    assert all(4.25 < e["bits_per_weight"] < 4.3 for e in records.values())  # 4 + 8/32 + nested
    folder = tmp / "out" / "tiny-bnb-nf4"
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitsandbytes" and qcfg["bnb_4bit_use_double_quant"] is True
    # the eval table has the method's row (perplexity, KLD) next to the reference
    rows = report["quality"]["rows"]
    assert set(rows) == {"fp16 (reference)", "strata NF4+DQ b32"}
    assert rows["strata NF4+DQ b32"]["kld"] > 0 and report["artifacts"]["bitsandbytes"]["bytes"] > 0

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="cpu").eval()
    for name, entry in records.items():
        mod = model.get_submodule(name)
        assert type(mod).__name__ == "Linear4bit", name
        got = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        assert torch.equal(got, _stored(tmp, entry).dequantize(torch.float16)), name
    ours = _dequantized_model(tiny_model_path, tmp, records, torch.float16)
    with torch.no_grad():
        _logits_close(model(IDS).logits, ours(IDS).logits, rel=0.05)


def test_nf4_resume_replays_through_stored_results(nf4_run, tiny_model_path):
    """A resumed run replays the done blocks through their stored NF4 results: block 1 solved again
    after block 0 was replayed gives byte-identical results."""
    tmp, report = nf4_run
    cfg = toolbox_config(tmp, NF4_QUANT, ["bitsandbytes"], eval_windows=2)
    store = tmp / "store" / "runs" / report["run_id"]
    before = _records(tmp, report["run_id"])
    (store / "blocks" / "00001" / "record.json").unlink()
    victim = next(iter(sorted((store / "blocks" / "00002").glob("*.safetensors"))))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")  # block 2's record no longer matches
    third = run_job(cfg, progress=False)
    assert third.solved_blocks == [1, 2] and third.resumed_blocks == [0]
    after = _records(tmp, report["run_id"])
    assert {n: e["sha256"] for n, e in after.items()} == {n: e["sha256"] for n, e in before.items()}


# ------------------------------------------------------------------------------------------ GPTQ-NF4


@pytest.fixture(scope="module")
def gptq_nf4_run(tmp_path_factory, tiny_model_path, emma_path, ray_session):
    tmp = tmp_path_factory.mktemp("gptq_nf4")
    # the tiny model's FFN width 352 is a multiple of 32, not of 64
    cfg = toolbox_config(tmp, {"method": "gptq_nf4", "nf4_blocksize": 32}, ["bitsandbytes"])
    return tmp, run_full_job(cfg, progress=False)


def test_gptq_nf4_run_verifies_loads_and_beats_nf4_rounding(gptq_nf4_run, tiny_model_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (extra 'bnb') is not installed")
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    tmp, report = gptq_nf4_run
    assert report["checks"][0]["bit_exact_linears"] == N_LINEARS
    records = _records(tmp, report["run_id"])
    for entry in records.values():
        result = _stored(tmp, entry)
        assert result.method == "gptq-nf4" and result.blocksize == 32 and entry["group_size"] == 32
        assert 0 < entry["output_rel_error"] < 0.1
    folder = tmp / "out" / "tiny-bnb-nf4"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="cpu").eval()
    for name, entry in records.items():
        mod = model.get_submodule(name)
        got = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        assert torch.equal(got, _stored(tmp, entry).dequantize(torch.float16)), name
    ours = _dequantized_model(tiny_model_path, tmp, records, torch.float16)
    with torch.no_grad():
        _logits_close(model(IDS).logits, ours(IDS).logits, rel=0.05)
    # same block scales as plain NF4 rounding of the checkpoint weight, other codes: the error feedback ran
    name = "model.layers.0.self_attn.q_proj"
    weight = AutoModelForCausalLM.from_pretrained(tiny_model_path).get_submodule(name).weight.detach().float()
    plain, solved = nf4_quantize(weight, blocksize=32), _stored(tmp, records[name])
    assert torch.equal(solved.absmax, plain.absmax) and torch.equal(solved.nested_absmax, plain.nested_absmax)
    assert (solved.codes != plain.codes).float().mean() > 0.05


def test_gptq_nf4_one_and_two_workers_store_identical_bytes(gptq_nf4_run, tmp_path):
    tmp2, report2 = gptq_nf4_run
    cfg = toolbox_config(tmp_path, {"method": "gptq_nf4", "nf4_blocksize": 32}, ["bitsandbytes"], workers=1)
    outcome = run_job(cfg, progress=False)
    assert outcome.run_id == report2["run_id"]
    h1 = {n: e["sha256"] for n, e in _records(tmp_path, outcome.run_id).items()}
    h2 = {n: e["sha256"] for n, e in _records(tmp2, report2["run_id"]).items()}
    assert len(h1) == N_LINEARS and h1 == h2


# ---------------------------------------------------------------------------------------------- FP8


def test_fp8_run_verifies_and_loads_in_compressed_tensors(tmp_path, tiny_model_path, emma_path, ray_session):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    cfg = toolbox_config(tmp_path, {"method": "fp8", "fp8_type": "e4m3"}, ["compressed-tensors"])
    report = run_full_job(cfg, progress=False)
    check = report["checks"][0]
    assert check["format"] == "compressed-tensors" and check["bit_exact_linears"] == N_LINEARS
    records = _records(tmp_path, report["run_id"])
    assert all(e["kind"] == "fp8" and e["fp8_block"] is None and e["group_size"] == -1 for e in records.values())
    folder = tmp_path / "out" / "tiny-compressed-tensors"
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "float-quantized"
    assert qcfg["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(IDS).logits
    state = model.state_dict()
    for name, entry in records.items():  # fp32 model, fp32 scales: the reader's weights are ours exactly
        assert torch.equal(state[f"{name}.weight"], _stored(tmp_path, entry).dequantize()), name
    ours = _dequantized_model(tiny_model_path, tmp_path, records)
    with torch.no_grad():
        _logits_close(got, ours(IDS).logits, rel=1e-4)


# ---------------------------------------------------------------------------------------------- INT8


def test_int8_run_keeps_a_named_linear_in_16_bit(tmp_path, tiny_model_path, emma_path, ray_session):
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    kept = "model.layers.1.mlp.down_proj"
    quant = {"method": "gptq", "bits": 8, "group_size": -1, "modules_to_not_convert": ["layers.1.mlp.down_proj"]}
    report = run_full_job(toolbox_config(tmp_path, quant, ["compressed-tensors"]), progress=False)
    records = _records(tmp_path, report["run_id"])
    assert len(records) == N_LINEARS
    assert records[kept]["skipped"] is True and records[kept]["reason"] == "modules_to_not_convert"
    assert records[kept]["bits"] == 16
    assert isinstance(_stored(tmp_path, records[kept]), KeptLinear)
    assert sum(1 for e in records.values() if e.get("skipped")) == 1
    assert all(e["bits"] == 8 and e["group_size"] == -1 for n, e in records.items() if n != kept)
    assert report["checks"][0]["bit_exact_linears"] == N_LINEARS - 1

    folder = tmp_path / "out" / "tiny-compressed-tensors"
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert kept in qcfg["ignore"]
    artifact = load_file(folder / "model.safetensors")
    source = load_file(tiny_model_path / "model.safetensors")
    assert torch.equal(artifact[f"{kept}.weight"], source[f"{kept}.weight"])  # the checkpoint's float weight
    assert f"{kept}.weight_packed" not in artifact

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(model.get_submodule(kept)).__name__ == "Linear"
    ours = _dequantized_model(tiny_model_path, tmp_path, records)
    with torch.no_grad():
        _logits_close(model(IDS).logits, ours(IDS).logits, rel=1e-3)


# ------------------------------------------------------------------------------ pure parts (no Ray)


def _hessian(k: int, n: int = 1024, seed: int = 0, boost: float | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen)
    if boost is not None:
        x[:, 5] *= boost
    return 2 * x.T @ x / n


@pytest.mark.parametrize(
    "result",
    [
        nf4_quantize(torch.randn(32, 128), double_quant=True),
        nf4_quantize(torch.randn(32, 128), double_quant=False),
        fp8_quantize(torch.randn(32, 128)),
        fp8_quantize(torch.randn(40, 96), fmt="e5m2", block=(16, 32)),
        KeptLinear(weight=torch.randn(8, 16), reason="outliers"),
    ],
    ids=["nf4-dq", "nf4", "fp8-channel", "fp8-e5m2-block", "kept"],
)
def test_results_store_as_deterministic_safetensors(result):
    data = result_to_bytes(result)
    assert data == result_to_bytes(result)  # one JSON metadata entry: the same bytes every time
    back = result_from_bytes(data)
    assert type(back) is type(result)
    assert torch.equal(back.dequantize(), result.dequantize())
    assert result_to_bytes(back) == data


def test_quantize_parts_splits_keeps_and_solves_per_tensor():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.02
    h = _hessian(128)
    spec = QuantSpec(4, 64, True)
    parts = [Part("q", 16, spec), Part("k", 16, spec, keep="modules_to_not_convert"), Part("v", 16, spec)]
    nf4 = quantize_parts("gptq_nf4", w, h, parts, {"nf4_blocksize": 64})
    assert isinstance(nf4[1], KeptLinear) and torch.equal(nf4[1].weight, w[16:32])
    # NF4 scales are per tensor and the stacked GPTQ solve splits by rows: each part equals the part
    # solved alone (and the two parts have their own double-quantization offsets)
    for i, rows in ((0, slice(0, 16)), (2, slice(32, 48))):
        alone = gptq_nf4(w[rows], h, blocksize=64)
        assert torch.equal(nf4[i].codes, alone.codes) and torch.equal(nf4[i].absmax, alone.absmax)
        assert nf4[i].offset == alone.offset
    assert nf4[0].offset != nf4[2].offset
    plain = quantize_parts("nf4", w, None, parts, {"nf4_blocksize": 64})
    assert torch.equal(plain[2].codes, nf4_quantize(w[32:], blocksize=64).codes)
    # integer GPTQ: rows are independent given H, so the stacked solve splits into per-part solves;
    # a part with its own spec (mixed precision) is solved on its own grid
    mixed = [Part("q", 16, spec), Part("k", 16, QuantSpec(8, -1, True)), Part("v", 16, spec)]
    out = quantize_parts("gptq", w, h, mixed, {})
    assert out[1].spec.bits == 8 and out[0].spec.bits == 4
    from strata_quant.workers.gptq import gptq_quantize

    alone = gptq_quantize(w[32:], h, spec)
    assert torch.equal(out[2].codes, alone.codes) and torch.equal(out[2].scales, alone.scales)
    with pytest.raises(ValueError, match="parts cover"):
        quantize_parts("rtn", w, None, parts[:2], {})
    with pytest.raises(ValueError, match="needs the Hessian"):
        quantize_parts("gptq_nf4", w, None, parts, {})


def test_spec_overrides_and_module_matching():
    job = WorkerJob(model_config={}, spec=QuantSpec(4, 64, True), spec_overrides={r"mlp\.down_proj$": {"bits": 8}})
    assert job.spec_for("model.layers.3.mlp.down_proj") == QuantSpec(8, 64, True)
    assert job.spec_for("model.layers.3.mlp.up_proj") == QuantSpec(4, 64, True)
    later = WorkerJob(
        model_config={}, spec=QuantSpec(), spec_overrides={"layers": {"bits": 8}, r"layers\.0\.": {"bits": 2}}
    )
    assert later.spec_for("model.layers.0.mlp.up_proj").bits == 2  # later overrides win
    with pytest.raises(ValueError, match="unknown QuantSpec field"):
        WorkerJob(model_config={}, spec=QuantSpec(), spec_overrides={".": {"bitz": 8}}).spec_for("x")
    assert matches_module("model.layers.1.mlp.down_proj", ["down_proj"])
    assert matches_module("model.layers.1.mlp.down_proj", ["layers.1"])
    assert not matches_module("model.layers.11.mlp.down_proj", ["layers.1"])
    assert not matches_module("model.layers.1.mlp.down_proj", ["down"])


def test_outlier_detection_from_the_hessian():
    assert outlier_group(_hessian(64, boost=100.0), sigma=6.0)
    assert not outlier_group(_hessian(64), sigma=6.0)


def test_toolbox_config_errors_name_the_allowed_formats(tmp_path):
    with pytest.raises(ConfigError, match="gguf cannot hold method nf4 results; allowed for nf4: bitsandbytes"):
        toolbox_config(tmp_path, {"method": "nf4"}, ["gguf"])
    with pytest.raises(ConfigError, match="gptq cannot hold method fp8 results; allowed for fp8: compressed-tensors"):
        toolbox_config(tmp_path, {"method": "fp8"}, ["gptq"])
    with pytest.raises(ConfigError, match="bitsandbytes output holds method nf4 / gptq_nf4 results only"):
        toolbox_config(tmp_path, {"method": "gptq"}, ["bitsandbytes"])
    with pytest.raises(ConfigError, match="E4M3 weights only"):
        toolbox_config(tmp_path, {"method": "fp8", "fp8_type": "e5m2"}, ["compressed-tensors"])
    with pytest.raises(ConfigError, match="cannot leave linears in 16-bit"):
        toolbox_config(tmp_path, {"method": "gptq", "bits": 8, "skip_outliers": True}, ["gguf"])
    with pytest.raises(ConfigError, match="nf4_blocksize"):
        toolbox_config(tmp_path, {"method": "nf4", "nf4_blocksize": 48}, ["bitsandbytes"])


def test_gptq_nf4_blocksize_must_divide_the_model_widths(tmp_path, tiny_model_path, emma_path):
    from strata_quant.pipeline.run import prepare

    with pytest.raises(ConfigError, match="multiples of quant.nf4_blocksize 64"):
        prepare(toolbox_config(tmp_path, {"method": "gptq_nf4"}, ["bitsandbytes"]))
