"""A run on a real two-node Ray cluster on this machine: workers on both nodes, same bytes.

The cluster is a head (`ray start --head`, no dashboard) plus a second node joining it
(`ray start --address=…`) with a custom resource ``node2``, each with 2 CPUs, on free
ports and with their own --temp-dir, so it runs beside the other local Rays. A driver
process joins it (RAY_ADDRESS, as a cluster job's driver does) and runs the tiny model with
2 workers and ``run.placement: spread``: one worker per node, the gloo group across them.
Its stored results must equal, byte for byte, the same config run on the test session's
single-node Ray. Teardown kills only this cluster's processes (tests/test_submit.py's
helpers: by temp dir / GCS address and their descendants), never a global `ray stop`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from strata_quant.pipeline.config import parse_config
from strata_quant.pipeline.run import run_job
from tests.test_submit import RAY_BIN, _free_port, _kill, _our_ray_pids, ray_cli_env, start_ray_nodes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_nodes():
    if not RAY_BIN.exists():
        pytest.skip("no ray CLI next to this Python")
    temp_dir = Path(tempfile.mkdtemp(prefix="sm-", dir="/tmp"))  # short: socket paths live under it
    gcs = _free_port()
    common = [
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--num-cpus=2",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    head = [
        str(RAY_BIN),
        "start",
        "--head",
        f"--port={gcs}",
        "--include-dashboard=false",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        *common,
    ]
    node2 = [
        str(RAY_BIN),
        "start",
        f"--address=127.0.0.1:{gcs}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--resources=" + json.dumps({"node2": 1}),
        *common,
    ]
    markers = [str(temp_dir), f"127.0.0.1:{gcs}"]
    try:
        start_ray_nodes([head, node2], ray_cli_env())
        yield f"127.0.0.1:{gcs}"
    finally:
        _kill(_our_ray_pids(markers))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _config(tmp: Path) -> dict:
    return {
        "name": "multinode",
        "model": "fixture:tiny-llama",
        "calibration": {"source": "fixture:austen/emma", "num_samples": 16, "seq_len": 64},
        "quant": {"method": "gptq", "bits": 4, "group_size": 64, "allow_partial_group": True},
        "run": {"workers": 2, "batch_size": 4, "store": str(tmp / "store"), "placement": "spread"},
        "output": {"dir": str(tmp / "out"), "formats": ["gptq"]},
        "eval": None,
    }


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray, yaml
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import run_job

    ray.init(logging_level="WARNING")  # RAY_ADDRESS: the two-node cluster
    deadline = time.monotonic() + 90
    while len([n for n in ray.nodes() if n["Alive"]]) < 2:
        assert time.monotonic() < deadline, "the second node never joined"
        time.sleep(0.5)
    outcome = run_job(parse_config(yaml.safe_load(open(sys.argv[1]))), progress=False)
    print("RESULT " + json.dumps({
        "hashes": {e["name"]: e["sha256"] for r in outcome.records.values() for e in r["results"]},
        "worker_nodes": outcome.worker_nodes,
        "nodes": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]},
    }))
    """
)


def test_two_node_run_matches_single_node(two_nodes, tmp_path, tiny_model_path, emma_path, ray_session):
    cfg_path = tmp_path / "multi.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path / "multi")))
    env = {**ray_cli_env(), "RAY_ADDRESS": two_nodes, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(cfg_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    multi = json.loads(line[len("RESULT ") :])
    print(f"two-node run: {time.perf_counter() - t0:.1f}s, workers on {multi['worker_nodes']}")

    # one worker on each node: rank 0 and rank 1 on different nodes, one of them the node2 node
    assert len(multi["nodes"]) == 2
    placed = [multi["worker_nodes"][r] for r in ("0", "1")]
    assert set(placed) == set(multi["nodes"])
    assert sum("node2" in multi["nodes"][n] for n in placed) == 1

    # and the same bytes as the single-node run of the same config (here: the session's Ray)
    cfg = _config(tmp_path / "single")
    cfg["run"]["placement"] = "pack"
    single = run_job(parse_config(cfg), progress=False)
    assert len(single.worker_nodes) == 2 and len(set(single.worker_nodes.values())) == 1
    h1 = {e["name"]: e["sha256"] for r in single.records.values() for e in r["results"]}
    assert len(h1) == 21 and multi["hashes"] == h1
