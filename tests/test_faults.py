"""Faults under real runs: a worker killed mid-run, the driver killed and resumed, a flaky and a
failing S3 store (through tests/fault_proxy.py in front of SeaweedFS), and no credential in
anything a run writes. Nothing under test is mocked; every comparison is against a clean run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from strata_quant.pipeline.config import parse_config
from strata_quant.pipeline.job import run_full_job
from strata_quant.pipeline.run import RunError, run_job
from strata_quant.pipeline.store import StoreError, open_store
from tests.fault_proxy import FaultProxy, Rule
from tests.faulty_workers import faulty_worker

ROOT = Path(__file__).resolve().parent.parent


def tiny_dict(tmp: Path, workers: int = 2, store: str | None = None, **over) -> dict:
    cfg = {
        "name": "tiny",
        "model": "fixture:tiny-llama",
        "calibration": {"source": "fixture:austen/emma", "num_samples": 16, "seq_len": 64},
        "quant": {"method": "gptq", "bits": 4, "group_size": 64, "allow_partial_group": True},
        "run": {"workers": workers, "batch_size": 4, "store": store or str(tmp / "store"), "run_id": "tiny-faults"},
        "output": {"dir": str(tmp / "out"), "formats": ["gptq"]},
        "eval": None,
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value}
    return cfg


def record_hashes(store, run_id: str = "tiny-faults") -> dict[str, str]:
    """Linear name → sha256 of its stored result, over every block record of the run."""
    out = {}
    for key in store.list(f"runs/{run_id}/blocks"):
        if key.endswith("/record.json"):
            for entry in store.get_json(key)["results"]:
                out[entry["name"]] = entry["sha256"]
    return out


def artifact_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_model_path, emma_path, ray_session):
    """One uninterrupted run (local store): the bytes every faulty run must reproduce. W=1: the
    results do not depend on W (tests/test_e2e.py), so the W=2 runs below also check that."""
    tmp = tmp_path_factory.mktemp("clean")
    report = run_full_job(parse_config(tiny_dict(tmp, workers=1)), progress=False)
    hashes = record_hashes(open_store(str(tmp / "store")))
    assert len(hashes) == 21 and report["solved_blocks"] == 3
    return {"records": hashes, "gptq": artifact_hashes(tmp / "out" / "tiny-gptq")}


# ---------------------------------------------------------------------------------------------
# a worker process killed mid-run


def test_killed_worker_is_replaced_and_nothing_is_solved_twice(clean, tmp_path):
    marker = tmp_path / "killed"
    killer = faulty_worker(kill={"block": 1, "rank": 1, "marker": str(marker)})
    outcome = run_job(parse_config(tiny_dict(tmp_path)), progress=False, worker_class=killer)
    # the worker of rank 1 really died (SIGKILL, once) in block 1 …
    pid = int(marker.read_text().split()[0])
    assert marker.read_text().split()[1:] == ["block", "1"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # … the group was replaced once, block 0 replayed through its stored result, block 1 redone
    assert outcome.restarts == 1
    assert outcome.restart_replays == [0]
    assert outcome.solved_blocks == [0, 1, 2]  # each block solved exactly once
    assert outcome.resumed_blocks == []
    summary = outcome.store.get_json(f"{outcome.prefix}/summary.json")
    assert summary["restarts"] == 1 and summary["lost_workers"][0]["block"] == 1
    # and the results are byte-identical to the uninterrupted run
    assert record_hashes(outcome.store) == clean["records"]


def test_restarts_are_bounded_and_finished_blocks_kept(tmp_path, tiny_model_path, ray_session):
    marker = tmp_path / "killed"
    killer = faulty_worker(kill={"block": 1, "rank": 0, "marker": str(marker)})
    cfg = parse_config(tiny_dict(tmp_path, workers=1, run={"max_restarts": 0}))
    with pytest.raises(RunError, match=r"lost workers 1 times, more than run.max_restarts = 0 .*strata resume"):
        run_job(cfg, progress=False, worker_class=killer)
    store = open_store(str(tmp_path / "store"))
    records = [k for k in store.list("runs/tiny-faults") if k.endswith("record.json")]
    assert records == ["runs/tiny-faults/blocks/00000/record.json"]
    assert not store.exists("runs/tiny-faults/summary.json")


# ---------------------------------------------------------------------------------------------
# the driver killed mid-run, then `strata resume`


def test_killed_driver_resumes_to_identical_artifacts(clean, tmp_path, ray_session):
    from strata_quant.pipeline.cli import main

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict(tmp_path, workers=1)))
    store_dir = tmp_path / "store"
    # block 2 stalls, so the driver is surely killed after block 1's record and before block 2's;
    # the driver joins the running Ray cluster, as a cluster job's driver does, and dies alone
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    stall = json.dumps({"sleep": {"block": 2, "rank": 0, "seconds": 600}})
    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faulty_workers", str(cfg_path), stall],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    record1 = store_dir / "runs" / "tiny-faults" / "blocks" / "00001" / "record.json"
    try:
        deadline = time.monotonic() + 240
        while not record1.exists():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "block 1 was not recorded in time:\n" + log_path.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (store_dir / "runs" / "tiny-faults" / "blocks" / "00002" / "record.json").exists()
    assert not (tmp_path / "out").exists()
    assert "connecting to the Ray cluster" in log_path.read_text()

    assert main(["resume", "tiny-faults", "--store", str(store_dir), "--quiet"]) == 0
    summary = json.loads((store_dir / "runs" / "tiny-faults" / "summary.json").read_text())
    assert summary["replayed_blocks"] == [0, 1] and summary["solved_blocks"] == [2]
    assert record_hashes(open_store(str(store_dir))) == clean["records"]
    gptq = artifact_hashes(tmp_path / "out" / "tiny-gptq")
    assert gptq and gptq == clean["gptq"]


# ---------------------------------------------------------------------------------------------
# S3 through a fault-injecting proxy


@pytest.fixture
def proxied_s3(s3_server, monkeypatch):
    """A fresh bucket behind a fault proxy; AWS_ENDPOINT_URL_S3 points this process (and, through
    the pickled store, the workers) at the proxy."""
    bucket = s3_server.make_bucket(f"faults-{uuid.uuid4().hex[:8]}")
    with FaultProxy(s3_server.endpoint, max_lifetime_s=600) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        yield proxy, f"s3://{bucket}/strata"


def _faulty_schedule() -> list[Rule]:
    return [
        Rule("slowdown", every=7),
        Rule("reset", method="GET", every=5),
        Rule("truncate", method="GET", every=6),
        Rule("reset", method="PUT", every=9),
    ]


def test_flaky_s3_run_matches_clean_run_and_leaks_no_credential(clean, proxied_s3, tmp_path, caplog, capfd):
    import logging

    import ray

    from tests.s3_server import ACCESS_KEY, SECRET_KEY

    proxy, location = proxied_s3
    proxy.set_rules(*_faulty_schedule())
    caplog.set_level(logging.DEBUG)
    report = run_full_job(parse_config(tiny_dict(tmp_path, workers=1, store=location)), progress=False)
    injected = sum(proxy.injected.values())
    assert injected >= 10 and set(proxy.injected) >= {"slowdown", "reset", "truncate"}
    proxy.set_rules()
    store = open_store(location)
    assert record_hashes(store) == clean["records"]
    assert artifact_hashes(tmp_path / "out" / "tiny-gptq") == clean["gptq"]

    # no credential in anything the run wrote or logged
    secrets = [SECRET_KEY.encode(), ACCESS_KEY.encode()]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    written = {key: store.get_bytes(key) for key in store.list("runs/tiny-faults")}
    assert {"runs/tiny-faults/run.json", "runs/tiny-faults/summary.json"} <= set(written)
    assert sum(k.endswith("record.json") for k in written) == 3
    written["report"] = Path(report["report_path"]).read_bytes()
    # the secret key: nowhere, not even in botocore's DEBUG log (which names the access key id in
    # its Authorization headers, so the id is checked in strata's own log records only)
    everything = "\n".join(r.getMessage() for r in caplog.records).encode()
    assert SECRET_KEY.encode() not in everything
    written["log records"] = "\n".join(
        r.getMessage() for r in caplog.records if not r.name.startswith(("botocore", "urllib3", "boto3"))
    ).encode()
    out, err = capfd.readouterr()
    written["stdout+stderr"] = (out + err).encode()
    print(f"flaky S3 run: {proxy.requests} requests, {injected} faults injected {dict(proxy.injected)}")
    try:
        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
        for path in logs.glob("worker-*"):
            written[str(path)] = path.read_bytes()
    except Exception:  # a Ray without this internal: the driver's captured output holds the worker logs
        pass
    for where, data in written.items():
        for secret in secrets:
            assert secret not in data, f"a credential leaked into {where}"


def test_failing_s3_stops_with_store_error_and_resumes(clean, proxied_s3, tmp_path):
    proxy, location = proxied_s3
    # every write of block 1 fails (503 SlowDown), past all the store's retries
    proxy.set_rules(Rule("slowdown", method="PUT", key_contains="/blocks/00001/", every=1))
    cfg = parse_config(tiny_dict(tmp_path, workers=1, store=location))
    with pytest.raises(StoreError, match=r"put '.*blocks/00001/.*' failed after 7 attempts \(HTTP 503 SlowDown"):
        run_job(cfg, progress=False)
    store = open_store(location)
    assert [k for k in store.list("runs/tiny-faults") if k.endswith("record.json")] == [
        "runs/tiny-faults/blocks/00000/record.json"
    ]
    assert proxy.injected["slowdown"] >= 7

    proxy.set_rules()  # the store is healthy again: the rerun skips block 0
    again = run_job(cfg, progress=False)
    assert again.resumed_blocks == [0] and again.solved_blocks == [1, 2] and again.restarts == 0
    assert record_hashes(store) == clean["records"]
