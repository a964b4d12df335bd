"""End to end through real Ray: the tiny model with 1 and 2 workers, resume, and the real SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from strata_quant.pipeline.config import ConfigError, parse_config
from strata_quant.pipeline.job import run_full_job
from strata_quant.pipeline.run import run_job


def tiny_config(tmp_path, workers=2, **over):
    cfg = {
        "name": "tiny",
        "model": "fixture:tiny-llama",
        "calibration": {"source": "fixture:austen/emma", "num_samples": 16, "seq_len": 64},
        "quant": {"method": "gptq", "bits": 4, "group_size": 64, "allow_partial_group": True},
        "run": {"workers": workers, "batch_size": 4, "store": str(tmp_path / "store")},
        "output": {"dir": str(tmp_path / "out"), "formats": ["gptq", "gguf"]},
        "eval": {"windows": 4, "seq_len": 64},
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value}
    return parse_config(cfg)


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, tiny_model_path, emma_path, ray_session):
    tmp = tmp_path_factory.mktemp("w2")
    return tmp, run_full_job(tiny_config(tmp, workers=2), progress=False)


def test_two_workers_produce_verified_artifacts(two_worker_run):
    tmp, report = two_worker_run
    assert report["solved_blocks"] == 3 and report["replayed_blocks"] == 0
    gptq_check, gguf_check = report["checks"]
    # 3 blocks × 7 linears, all bit-exact in our GPTQ decoder and in transformers' GGUF loader
    assert gptq_check["bit_exact_linears"] == 21
    assert gguf_check["bit_exact_linears"] == 21 and "transformers" in gguf_check["reader"]
    cfg = json.loads((tmp / "out" / "tiny-gptq" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["sym"], q["checkpoint_format"]) == (
        "gptq",
        4,
        64,
        True,
        "gptq",
    )
    assert (tmp / "out" / "tiny-gptq" / "quantize_config.json").is_file()
    assert (tmp / "out" / "tiny-gptq" / "tokenizer.json").is_file()
    rows = report["quality"]["rows"]
    assert all(torch.isfinite(torch.tensor(r["ppl"])) for r in rows.values())
    # per-block timing and memory of each worker in the record
    record = json.loads(next((tmp / "store" / "runs" / report["run_id"] / "blocks").glob("*/record.json")).read_text())
    assert set(record["timings"]) == set(record["peak_rss_mib"]) == {"0", "1"}
    assert all(mib > 50 for mib in record["peak_rss_mib"].values())


def test_json_log_lines():
    import logging

    from strata_quant.pipeline.cli import JsonLogFormatter

    record = logging.LogRecord("strata.run", logging.INFO, __file__, 1, "block %d done", (3,), None)
    entry = json.loads(JsonLogFormatter().format(record))
    assert entry["message"] == "block 3 done" and entry["level"] == "INFO" and entry["logger"] == "strata.run"


def _hashes(store_root, run_id):
    out = {}
    for record in sorted((store_root / "runs" / run_id / "blocks").glob("*/record.json")):
        for entry in json.loads(record.read_text())["results"]:
            out[entry["name"]] = entry["sha256"]
    return out


def test_one_worker_gives_identical_results(two_worker_run, tmp_path):
    tmp2, report2 = two_worker_run
    outcome1 = run_job(tiny_config(tmp_path, workers=1), progress=False)
    assert outcome1.run_id == report2["run_id"]  # the fingerprint does not depend on W
    h1 = _hashes(tmp_path / "store", outcome1.run_id)
    h2 = _hashes(tmp2 / "store", report2["run_id"])
    assert len(h1) == 21 and h1 == h2


def test_resume_replays_done_blocks_and_refuses_a_changed_config(two_worker_run):
    tmp, report = two_worker_run
    store = tmp / "store" / "runs" / report["run_id"]
    before = {p: p.read_bytes() for p in store.rglob("record.json")}
    again = run_job(tiny_config(tmp, workers=2), progress=False)
    assert again.solved_blocks == [] and again.resumed_blocks == [0, 1, 2]
    assert before == {p: p.read_bytes() for p in store.rglob("record.json")}

    # a block whose result no longer matches its record is solved again, and only that one
    victim = next(iter(sorted((store / "blocks" / "00001").glob("*.safetensors"))))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    third = run_job(tiny_config(tmp, workers=2), progress=False)
    assert third.solved_blocks == [1] and third.resumed_blocks == [0, 2]

    with pytest.raises(ConfigError, match="different fingerprint: solve changed"):
        run_job(tiny_config(tmp, workers=2, quant={"damp": 0.05}, run={"run_id": report["run_id"]}), progress=False)


def test_existing_output_is_not_overwritten(two_worker_run):
    from strata_quant.pipeline.assemble import AssembleError

    tmp, _ = two_worker_run
    with pytest.raises(AssembleError, match="exists; pass --overwrite"):
        run_full_job(tiny_config(tmp, workers=2), progress=False)


@pytest.mark.slow
def test_smollm2_gptq_beats_rtn_and_gguf_is_exact(tmp_path, smollm2_path, ray_session):
    cfg = parse_config(
        {
            "name": "smol",
            "model": "fixture:smollm2-135m",
            "calibration": {"source": "fixture:austen/emma", "num_samples": 16, "seq_len": 256},
            "quant": {"method": "gptq", "bits": 4, "group_size": 64},
            "run": {"workers": 2, "batch_size": 8, "store": str(tmp_path / "store")},
            "output": {"dir": str(tmp_path / "out"), "formats": ["gguf"], "gguf_tokenizer_pre": "smollm"},
            "eval": {"windows": 8, "seq_len": 256},
        }
    )
    report = run_full_job(cfg, progress=False)
    assert report["checks"][0]["bit_exact_linears"] == 30 * 7
    rows = report["quality"]["rows"]
    ref, rtn, gptq = (rows[k]["ppl"] for k in rows)
    assert ref < gptq < rtn, rows
