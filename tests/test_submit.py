"""`strata submit/status/logs` against a real two-node Ray cluster started by this module.

The cluster is a head (`ray start --head`, dashboard on loopback, 2 CPUs) plus a second
node (1 CPU), each on free ports and with its own --temp-dir, so it can run beside other
local Rays (tests calling ray.init, other sessions). Teardown never uses `ray stop`: that
command finds Ray processes by name across the whole machine and would kill every Ray
here. It kills only this cluster's processes: those whose command line names our temp
dir or our GCS address, and all their descendants (the worker processes, whose command
lines Ray rewrites to `ray::...`).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from strata_quant.pipeline import submit as sub

RAY_BIN = Path(sys.executable).parent / "ray"
JOB_TIMEOUT_S = 240


# ---------------------------------------------------------------- no cluster needed


def test_config_inside_project_is_referred_to_by_relative_path():
    s = sub.build_submission(sub.PROJECT_ROOT / "configs" / "smollm2-135m-gptq-w4g64.yaml", args=["--no-eval"])
    assert s.staged is None
    assert s.entrypoint == "strata run configs/smollm2-135m-gptq-w4g64.yaml --quiet --no-eval"
    assert s.runtime_env["working_dir"] == str(sub.PROJECT_ROOT)
    for pattern in (".git", ".venv*", "/runs", "/out", "__pycache__", "*.egg-info"):
        assert pattern in s.runtime_env["excludes"]


def test_config_outside_project_is_staged_with_the_source(tmp_path):
    cfg = tmp_path / "my job.yaml"
    cfg.write_text(yaml.safe_dump({"model": "fixture:tiny-llama", "calibration": {"source": "fixture:austen/emma"}}))
    s = sub.build_submission(cfg)
    try:
        wd = Path(s.runtime_env["working_dir"])
        assert s.entrypoint == "strata run '.strata-job/my job.yaml' --quiet"
        assert (wd / ".strata-job" / "my job.yaml").read_text() == cfg.read_text()
        assert (wd / "pipeline" / "submit.py").is_file() and (wd / "workers" / "actor.py").is_file()
        assert (wd / "pyproject.toml").is_file()
        for gone in (".git", ".venv", "runs", "out", "strata.egg-info"):
            assert not (wd / gone).exists(), gone
        assert not list(wd.rglob("__pycache__"))
    finally:
        shutil.rmtree(s.staged)


def test_bad_config_fails_before_submitting(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: x\ncalibration: {source: y}\nquant: {bits: 5}\n")
    with pytest.raises(Exception, match="quant.bits"):
        sub.build_submission(cfg)
    with pytest.raises(sub.SubmitError, match="does not exist"):
        sub.build_submission(tmp_path / "missing.yaml")


def test_submit_waits_for_the_job_agent_and_nothing_else():
    """Ray refuses a job with HTTP 500 until the head's agent registers; that one error is retried."""
    now = [0.0]
    slept: list[float] = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    calls = iter(
        [RuntimeError(f"Request failed with status code 500: {sub.AGENT_NOT_READY}, please try again later.")] * 3
    )

    def call():
        err = next(calls, None)
        if err is not None:
            raise err
        return "job-1"

    assert sub.retry_until_agent(call, timeout=60, sleep=sleep, clock=lambda: now[0]) == "job-1"
    assert slept == [1.0, 2.0, 4.0]

    def always_down():
        raise RuntimeError(sub.AGENT_NOT_READY)

    now[0], slept[:] = 0.0, []
    with pytest.raises(RuntimeError, match=sub.AGENT_NOT_READY):
        sub.retry_until_agent(always_down, timeout=20, sleep=sleep, clock=lambda: now[0])
    assert sum(slept) <= 20 and len(slept) >= 3

    def other():
        raise RuntimeError("Request failed with status code 400: bad runtime_env")

    slept[:] = []
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        sub.retry_until_agent(other, timeout=60, sleep=sleep, clock=lambda: now[0])
    assert slept == []


# ---------------------------------------------------------------- a real cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _our_ray_pids(markers: list[str]) -> set[int]:
    """PIDs whose command line holds one of the markers, plus all their descendants."""
    cmd, parent = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    ours = {pid for pid, line in cmd.items() if any(m in line for m in markers)} - {os.getpid()}
    grew = True
    while grew:
        kids = {pid for pid, ppid in parent.items() if ppid in ours and pid not in ours}
        ours |= kids
        grew = bool(kids)
    return ours


def _kill(pids: set[int]) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)}
            if not pids:
                return
            time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}") / "status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def ray_cli_env() -> dict:
    """The environment for `ray start` of a loopback test cluster (no inherited RAY_* settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{RAY_BIN.parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.5x+ turns token auth on for a new head when ~/.ray/auth_token exists (a local
    # ray.init() writes one) but not for a joining node: pin the mode so both agree. Off is
    # fine for a loopback-only test cluster; real clusters keep token auth (docs/cluster.md).
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def start_ray_nodes(commands: list[list[str]], env: dict) -> None:
    """Runs each `ray start` command in turn; a RuntimeError with its output when one fails."""
    for cmd in commands:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="module")
def ray_cluster():
    if not RAY_BIN.exists():
        pytest.skip("no ray CLI next to this Python")
    pytest.importorskip("ray.dashboard.modules.job", reason="needs ray[default]")
    temp_dir = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))  # short: socket paths live under it
    gcs, dash = _free_port(), _free_port()
    env = ray_cli_env()
    common = [
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={_free_port()}",  # the others default to a random port
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    head = [
        str(RAY_BIN),
        "start",
        "--head",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={_free_port()}",
        "--num-cpus=2",
        *common,
    ]
    worker = [str(RAY_BIN), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", *common]
    markers = [str(temp_dir), f"127.0.0.1:{gcs}"]
    t0 = time.perf_counter()
    try:
        start_ray_nodes([head, worker], env)
        address = f"http://127.0.0.1:{dash}"
        _wait_for_nodes(address, 2)
        print(f"two-node Ray cluster up in {time.perf_counter() - t0:.1f}s at {address}")
        yield {"address": address, "temp_dir": temp_dir}
    finally:
        _kill(_our_ray_pids(markers))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(address: str, n: int, timeout: float = 90.0) -> None:
    import json
    import urllib.request

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{address}/nodes?view=summary", timeout=5) as r:
                nodes = json.load(r)["data"]["summary"]
            alive = [x for x in nodes if x.get("raylet", {}).get("state") == "ALIVE"]
            if len(alive) >= n:
                return
            last = f"{len(alive)} alive"
        except Exception as err:  # dashboard still starting
            last = repr(err)
        time.sleep(1)
    raise RuntimeError(f"cluster at {address} never had {n} nodes: {last}")


def _tiny_config(tmp_path: Path) -> Path:
    cfg = {
        "name": "submit-tiny",
        "model": "fixture:tiny-llama",
        "calibration": {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 32},
        "quant": {"method": "gptq", "bits": 4, "group_size": 64, "allow_partial_group": True},
        "run": {"workers": 2, "batch_size": 4, "store": str(tmp_path / "store")},
        "output": {"dir": str(tmp_path / "out"), "formats": ["gptq"]},
        "eval": None,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_submit_runs_a_job_on_the_cluster(ray_cluster, tmp_path, tiny_model_path, emma_path, capsys):
    address = ray_cluster["address"]
    config = _tiny_config(tmp_path)
    job_id = f"strata-test-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    assert sub.submit(config, address, job_id=job_id) == job_id
    assert sub.status(job_id, address)["status"] in {"PENDING", "RUNNING", "SUCCEEDED"}

    followed = io.StringIO()
    result: dict = {}
    follower = threading.Thread(
        target=lambda: result.setdefault("state", sub.logs(job_id, address, follow=True, out=followed)), daemon=True
    )
    follower.start()
    state = sub.wait(job_id, address, timeout=JOB_TIMEOUT_S, poll=1.0)
    wall = time.perf_counter() - t0
    full_log = "".join(sub.iter_logs(job_id, address))
    assert state == "SUCCEEDED", f"job {state}; log:\n{full_log[-4000:]}"
    print(f"job {job_id} SUCCEEDED in {wall:.1f}s")

    # the log shows the run's progress and its report
    assert "run submit-tiny-" in full_log and "3 blocks, 2 workers" in full_log
    assert "strata run submit-tiny-" in full_log and "verified gptq" in full_log
    follower.join(timeout=60)
    assert result.get("state") == "SUCCEEDED"
    assert "verified gptq" in followed.getvalue()

    # the run's record and artifacts, written by the job on the cluster
    runs = list((tmp_path / "store" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("submit-tiny-")
    assert (runs[0] / "run.json").is_file() and (runs[0] / "summary.json").is_file()
    for b in range(3):
        assert (runs[0] / "blocks" / f"{b:05d}" / "record.json").is_file()
    assert (tmp_path / "out" / "submit-tiny-gptq" / "config.json").is_file()

    # the CLI's status and logs subcommands read the same job
    from strata_quant.pipeline.cli import main

    capsys.readouterr()
    assert main(["status", job_id, "--address", address]) == 0
    assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", job_id, "--address", address]) == 0
    assert "verified gptq" in capsys.readouterr().out
