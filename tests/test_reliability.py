"""A complete record is complete, a resume is the same model, hangs end within the watchdog, a
worker counts as lost only when Ray says so, solver numbers reach the record, fixtures never
install anything, and log lines carry no credential. Real runs on the tiny Llama fixture (real
Ray, the local store); faults come from test-only worker subclasses (tests/faulty_workers.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import time
from pathlib import Path

import pytest

from strata_quant.pipeline.assemble import quantized_only
from strata_quant.pipeline.checkpoint import CheckpointError
from strata_quant.pipeline.config import ConfigError, parse_config
from strata_quant.pipeline.run import (
    RunError,
    block_linear_names,
    check_block_results,
    check_same_shards,
    load_records,
    record_is_complete,
    run_job,
)
from strata_quant.pipeline.store import ObjectInfo, RedactingFilter, open_store, redact
from tests.faulty_workers import faulty_worker

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(tmp: Path, model: str = "fixture:tiny-llama", workers: int = 1, **run) -> dict:
    return {
        "name": "tiny",
        "model": model,
        "calibration": {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 64},
        "quant": {"method": "gptq", "bits": 4, "group_size": 64, "allow_partial_group": True},
        "run": {"workers": workers, "batch_size": 4, "store": str(tmp / "store"), "run_id": "tiny-rel", **run},
        "output": {"dir": str(tmp / "out"), "formats": ["gptq"]},
        "eval": None,
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_path, emma_path, ray_session):
    """One whole W=1 run of the tiny Llama."""
    tmp = tmp_path_factory.mktemp("finished")
    outcome = run_job(parse_config(tiny(tmp)), progress=False)
    return tmp, outcome


# ---------------------------------------------------------------------------------------------
# a record is complete only when it is


def test_block_linears_come_from_the_models_class(finished):
    _, outcome = finished
    linears = block_linear_names(outcome.reader)
    assert sorted(linears) == [0, 1, 2]
    assert sorted(n.rsplit(".", 1)[1] for n in linears[1]) == sorted(LINEARS)
    assert all(n.startswith("model.layers.1.") for n in linears[1])
    for b, record in outcome.records.items():  # the run's own records pass the check
        check_block_results(outcome.store, b, record["results"], linears[b])


def test_a_record_missing_a_linear_is_refused(finished):
    _, outcome = finished
    store, linears = outcome.store, block_linear_names(outcome.reader)
    record = outcome.records[1]
    short = [e for e in record["results"] if not e["name"].endswith("mlp.down_proj")]
    with pytest.raises(RunError, match=r"block 1: the workers' results has no result for model.layers.1.mlp.down_proj"):
        check_block_results(store, 1, short, linears[1])
    with pytest.raises(RunError, match=r"more than once"):
        check_block_results(store, 1, record["results"] + record["results"][:1], linears[1])
    # a stored record that lacks a linear is not complete: a resume solves the block again
    key = f"{outcome.prefix}/blocks/00001/record.json"
    assert record_is_complete(store, key, linears[1]) is not None
    store.put_json("runs/doctored/blocks/00001/record.json", {**record, "results": short})
    assert record_is_complete(store, "runs/doctored/blocks/00001/record.json", linears[1]) is None


def test_verification_refuses_an_artifact_whose_record_lacks_a_linear(finished):
    """The record's hole becomes a float weight in the artifact; verify names the linear."""
    from strata_quant.pipeline.assemble import assemble_gptq
    from strata_quant.pipeline.verify import VerifyError, verify_gptq

    tmp, outcome = finished
    records = load_records(outcome.store, outcome.prefix, 3)
    doctored = {b: dict(r) for b, r in records.items()}
    doctored[2]["results"] = [e for e in records[2]["results"] if not e["name"].endswith("self_attn.k_proj")]
    folder = tmp / "holey-gptq"
    results = quantized_only(outcome.store, doctored)
    assemble_gptq(outcome.reader, results, folder)
    with pytest.raises(
        VerifyError, match=r"1 linear\(s\) of the model have no result .*model.layers.2.self_attn.k_proj"
    ):
        verify_gptq(folder, outcome.reader, results)
    good = tmp / "whole-gptq"
    whole = quantized_only(outcome.store, records)
    assemble_gptq(outcome.reader, whole, good)
    assert verify_gptq(good, outcome.reader, whole)["quantized_linears"] == 21


def test_a_run_whose_worker_drops_a_result_writes_no_record(tmp_path, tiny_model_path, emma_path, ray_session):
    dropper = faulty_worker(drop={"block": 0, "linear": "mlp.up_proj"})
    with pytest.raises(RunError, match=r"block 0: the workers' results has no result for model.layers.0.mlp.up_proj"):
        run_job(parse_config(tiny(tmp_path)), progress=False, worker_class=dropper)
    store = open_store(str(tmp_path / "store"))
    assert not [k for k in store.list("runs/tiny-rel") if k.endswith("record.json")]


def test_results_missing_from_a_local_store_are_refused(tmp_path, tiny_model_path, emma_path, ray_session):
    """A worker's result written where the driver cannot see it (another node's disk)."""
    loser = faulty_worker(lose={"block": 1, "linear": "self_attn.o_proj"})
    with pytest.raises(RunError, match=r"block 1: 1 result object\(s\) .*o_proj.*local-folder store must be one"):
        run_job(parse_config(tiny(tmp_path)), progress=False, worker_class=loser)
    store = open_store(str(tmp_path / "store"))
    assert [k for k in store.list("runs/tiny-rel") if k.endswith("record.json")] == [
        "runs/tiny-rel/blocks/00000/record.json"
    ]


# ---------------------------------------------------------------------------------------------
# resume means the same model


def _tensor_span(path: Path, name: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    start, end = header[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def test_records_carry_each_blocks_tensor_hashes(finished):
    import hashlib

    _, outcome = finished
    path = Path(outcome.reader.path) / "model.safetensors"
    name = "model.layers.2.mlp.gate_proj.weight"
    start, end = _tensor_span(path, name)
    with open(path, "rb") as f:
        f.seek(start)
        want = hashlib.sha256(f.read(end - start)).hexdigest()
    digests = outcome.records[2]["tensor_sha256"]
    assert digests[name] == want
    assert set(digests) == set(outcome.reader.block_names(2))


def test_a_checkpoint_changed_under_the_same_shapes_is_refused_on_resume(
    tmp_path, tiny_model_path, emma_path, ray_session
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    cfg = parse_config(tiny(tmp_path, model=str(model)))
    first = run_job(cfg, progress=False)
    assert first.solved_blocks == [0, 1, 2]
    again = run_job(cfg, progress=False)  # the same bytes: every block replayed, nothing solved
    assert again.resumed_blocks == [0, 1, 2] and again.solved_blocks == []
    # another fine-tune of the same shapes: block 1's up_proj gets other (finite) values
    name = "model.layers.1.mlp.up_proj.weight"
    start, end = _tensor_span(model / "model.safetensors", name)
    with open(model / "model.safetensors", "r+b") as f:
        f.seek(start)
        data = bytearray(f.read(end - start))
        data[0:2], data[2:4] = data[2:4], data[0:2]  # two fp16 values swapped: the same header, shapes and config
        f.seek(start)
        f.write(data)
    with pytest.raises(CheckpointError, match=rf"run 'tiny-rel': block 1 of the checkpoint changed .*{name}"):
        run_job(cfg, progress=False)
    store = open_store(str(tmp_path / "store"))
    summary = store.get_json("runs/tiny-rel/summary.json")
    assert summary["replayed_blocks"] == [0, 1, 2]  # from the second run: the refused one wrote nothing


class _Shards:
    def __init__(self, etags: dict[str, str]):
        self.uri = "s3://models/tiny"
        self.shards = {f: ObjectInfo(10, tag) for f, tag in etags.items()}


def test_changed_shard_etags_are_refused():
    recorded = {"model-00001.safetensors": "aa", "model-00002.safetensors": "bb"}
    check_same_shards("r", recorded, _Shards(recorded))
    check_same_shards("r", None, _Shards({"model-00001.safetensors": "zz"}))  # runs without ETags
    with pytest.raises(CheckpointError, match=r"model-00002.safetensors of s3://models/tiny changed .*ETag"):
        check_same_shards("r", recorded, _Shards({**recorded, "model-00002.safetensors": "cc"}))


# ---------------------------------------------------------------------------------------------
# time-outs and honest loss detection


def test_block_timeout_is_validated():
    with pytest.raises(ConfigError, match=r"run.block_timeout_s"):
        parse_config(tiny(Path("/tmp"), block_timeout_s=0))


def test_a_hung_collective_ends_within_the_watchdog(tmp_path, tiny_model_path, emma_path, ray_session):
    """Rank 1 stalls in block 1 (for ten minutes): rank 0 waits in the block's reduction. The run
    stops with an error naming the block within the watchdog of block 1; block 0 is kept."""
    import threading

    staller = faulty_worker(sleep={"block": 1, "rank": 1, "seconds": 600})
    cfg = parse_config(tiny(tmp_path, workers=2, block_timeout_s=30))
    record0 = tmp_path / "store" / "runs" / "tiny-rel" / "blocks" / "00000" / "record.json"
    seen: list[float] = []

    def watch() -> None:  # when block 0's record appears, block 1 starts
        while not seen and not stopped.is_set():
            if record0.exists():
                seen.append(time.monotonic())
            time.sleep(0.1)

    stopped = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(
            RunError,
            match=r"block 1: (no answer from worker\(s\) \[.*\] within run.block_timeout_s = 30 s|a worker failed: .*)",
        ) as err:
            run_job(cfg, progress=False, worker_class=staller)
    finally:
        stopped.set()
    block1_s = time.monotonic() - seen[0]
    print(f"hung collective: block 1 stopped {block1_s:.1f} s after it started: {err.value}")
    assert block1_s < 30 + 10, block1_s  # the watchdog (30 s) and the few seconds to ask Ray about deaths
    store = open_store(str(tmp_path / "store"))
    assert [k for k in store.list("runs/tiny-rel") if k.endswith("record.json")] == [
        "runs/tiny-rel/blocks/00000/record.json"
    ]


def test_an_error_mentioning_gloo_is_not_a_lost_worker(tmp_path, tiny_model_path, emma_path, ray_session):
    """A worker that raises (alive, as Ray sees it) stops the run once; no restart, no replay."""
    failer = faulty_worker(fail={"block": 1, "rank": 0, "message": "[gloo] fake desync of the collective"})
    with pytest.raises(RunError, match=r"block 1: a worker failed: RuntimeError: \[gloo\] fake desync"):
        run_job(parse_config(tiny(tmp_path)), progress=False, worker_class=failer)
    store = open_store(str(tmp_path / "store"))
    assert not store.exists("runs/tiny-rel/summary.json")
    assert store.exists("runs/tiny-rel/blocks/00000/record.json")


# ---------------------------------------------------------------------------------------------
# solver numbers in the record and the report


def test_damping_and_dead_inputs_are_recorded_and_summed(finished):
    from strata_quant.pipeline.report import solver_notes, solver_notes_line

    _, outcome = finished
    entries = [e for r in outcome.records.values() for e in r["results"]]
    assert len(entries) == 21
    assert all(e["damp"] == 0.01 and e["damp_used"] >= 0.01 and e["dead_inputs"] >= 0 for e in entries)
    notes = solver_notes(entries)
    assert notes["gptq_linears"] == 21
    raised = dict(entries[0], damp_used=10.0)  # as a solve that needed 1000× the damping
    dead = dict(entries[1], dead_inputs=7)
    notes = solver_notes([raised, dead, *entries[2:]])
    assert notes["damp_raised_linears"] >= 1 and notes["damp_max_factor"] == pytest.approx(1000.0)
    assert notes["dead_inputs"] >= 7 and notes["dead_input_linears"] >= 1
    line = solver_notes_line(notes)
    assert "up to 1e+03× quant.damp" in line and "dead input(s)" in line
    from strata_quant.pipeline.report import config_items

    assert ("Damping and dead inputs", line) in config_items({"quant": {}, "solver_notes": notes})


# ---------------------------------------------------------------------------------------------
# no side effects


def test_a_fixture_text_never_calls_apt(tmp_path, monkeypatch):
    """With nothing in the cache and (fake) apt-get, apt and Rscript on the PATH, a job's
    `fixture:` text and model fail with the advice to run `strata fixtures`; nothing is run."""
    from strata_quant.pipeline.calibration import load_text
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.fixtures import FixtureError

    bin_dir, called = tmp_path / "bin", tmp_path / "called"
    bin_dir.mkdir()
    for tool in ("apt-get", "apt", "Rscript", "sudo", "pip"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho {tool} "$@" >> {called}\nexit 1\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/bin")
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FixtureError, match=r"fixture:austen/emma is not in the fixture cache .*`strata fixtures`"):
        load_text("fixture:austen/emma")
    with pytest.raises(FixtureError, match=r"fixture:tiny-llama is not in the fixture cache"):
        open_checkpoint("fixture:tiny-llama")
    assert not called.exists(), called.read_text()


def test_a_run_with_a_missing_fixture_fails_before_ray(tmp_path, monkeypatch):
    import ray

    from strata_quant.pipeline.fixtures import FixtureError

    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "empty-cache"))
    was_up = ray.is_initialized()
    with pytest.raises(FixtureError, match=r"strata fixtures"):
        run_job(parse_config(tiny(tmp_path)), progress=False)
    assert ray.is_initialized() == was_up
    assert not (tmp_path / "store" / "runs" / "tiny-rel").exists()


def test_log_lines_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-key-value-0123")
    text = "could not reach http://alice:pa55word@store.example:8333/bucket (key s3cr3t-key-value-0123)"
    clean = redact(text)
    assert "pa55word" not in clean and "alice" not in clean and "s3cr3t-key-value-0123" not in clean
    assert "store.example:8333/bucket" in clean
    record = logging.LogRecord("strata.x", logging.WARNING, __file__, 1, "failed: %s", (text,), None)
    assert RedactingFilter().filter(record) and "pa55word" not in record.getMessage()


def test_store_retry_warnings_carry_no_endpoint_userinfo(caplog, monkeypatch):
    """A real S3 client against a closed port, its endpoint URL with user:password."""
    from strata_quant.pipeline.store import S3Store, StoreError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-value")

    store = S3Store("bucket", endpoint_url="http://alice:pa55word@127.0.0.1:9", retries=2, backoff_base_s=0.01)
    caplog.set_level(logging.WARNING, logger="strata.store")
    with pytest.raises(StoreError) as err:
        store.exists("x")
    assert "pa55word" not in str(err.value)
    warnings = [r.getMessage() for r in caplog.records if r.name == "strata.store"]
    assert warnings and all("pa55word" not in w for w in warnings)


# ---------------------------------------------------------------------------------------------
# BOS in calibration, as the model's tokenizer does it


def test_calibration_starts_windows_as_the_tokenizer_starts_a_prompt(tiny_model_path, emma_path):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from strata_quant.pipeline.calibration import (
        calibration_prefix,
        calibration_windows,
        tokenize_stream,
        tokenizer_prefix,
    )

    plain = AutoTokenizer.from_pretrained(tiny_model_path)  # SmolLM2's: GPT-2 style, adds no BOS
    stream = tokenize_stream(plain, emma_path.read_text()[:200_000])
    assert tokenizer_prefix(plain) == [] and calibration_prefix(plain, "auto") == []
    windows = calibration_windows(stream, 8, 64, prefix=calibration_prefix(plain, "auto"))
    step = stream.numel() // 8
    assert all(windows[i].equal(stream[i * step : i * step + 64]) for i in range(8))  # unchanged without a BOS
    assert calibration_prefix(plain, "always") == [plain.bos_token_id]

    with_bos = AutoTokenizer.from_pretrained(tiny_model_path)  # the same, adding its BOS as Llama 3's does
    bos = with_bos.bos_token
    with_bos._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, with_bos.bos_token_id)]
    )
    assert with_bos("Emma", add_special_tokens=True)["input_ids"][0] == with_bos.bos_token_id
    assert calibration_prefix(with_bos, "auto") == [with_bos.bos_token_id]
    assert calibration_prefix(with_bos, "never") == []
    windows = calibration_windows(stream, 8, 64, prefix=calibration_prefix(with_bos, "auto"))
    assert windows.shape == (8, 64) and (windows[:, 0] == with_bos.bos_token_id).all()
    assert windows[1, 1:].equal(stream[step : step + 63])


def _rank_main(rank: int, port: int, model_config: dict, timeout_s: float, out) -> None:
    """One worker of a 2-worker gloo group (a process of its own): rank 0 all-reduces, rank 1
    never comes. Puts (rank, what happened, seconds waited) on ``out``."""
    import torch
    import torch.distributed as dist

    from strata_quant.workers.actor import BlockWorker
    from strata_quant.workers.job import WorkerJob
    from strata_quant.workers.result import QuantSpec

    job = WorkerJob(model_config=model_config, spec=QuantSpec(4, 64, True), collective_timeout_s=timeout_s)
    worker = BlockWorker(rank, 2, None, None, job)
    worker.init_group("127.0.0.1", port)
    if rank == 1:
        time.sleep(timeout_s * 6)  # hung: never reaches the collective
        out.put((rank, "slept", 0.0))
        return
    t = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4))
        out.put((rank, "returned", time.monotonic() - t))
    except Exception as err:
        out.put((rank, f"{type(err).__name__}: {err}", time.monotonic() - t))


def test_collectives_time_out_on_a_hung_peer(tiny_model_path):
    """The workers' gloo group is made with the run's timeout: a collective whose peer never
    comes raises after it, instead of waiting for gloo's default 30 minutes."""
    import multiprocessing

    from strata_quant.workers.actor import free_port

    config = json.loads((tiny_model_path / "config.json").read_text())
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, config, 5.0, out), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        rank, what, waited = out.get(timeout=180)
    finally:
        for p in procs:
            p.kill()
            p.join(10)
    assert rank == 0 and what != "returned", what
    assert 4.0 <= waited < 30.0, (what, waited)
