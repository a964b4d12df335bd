"""Submit a job config to a running Ray cluster through the Ray Jobs API, and follow it.

``strata submit CONFIG --address http://HEAD:8265`` packs the project source (this
checkout, less virtual environments, run stores, artifacts and caches) as the job's
``working_dir`` and runs ``strata run <config>`` on the cluster's head node; the job's
driver then finds the cluster through the ``RAY_ADDRESS`` the job supervisor sets.

A config that lives inside the project is referred to by its path relative to the
project root. A config from elsewhere is shipped with the job: the project source is
staged into a temporary folder together with the config under ``.strata-job/``.

Paths in the config (``run.store``, ``output.dir``, local calibration files) are read on
the cluster: relative ones land in the job's scratch working folder, which dies with the
cluster, so real jobs use an ``s3://`` store or a shared file system path.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STAGED_CONFIG_DIR = ".strata-job"

# gitignore syntax, as Ray's runtime_env "excludes" reads it (Ray also honours .gitignore)
EXCLUDES = [
    ".git",
    ".venv*",
    "venv",
    "/runs",
    "/out",
    "/build",
    "/dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.tmp",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Ray answers this (HTTP 500) while the head's job agent has not registered yet, e.g. just
# after `ray start`; the request did nothing and may be sent again
AGENT_NOT_READY = "No available agent to submit job"


class SubmitError(RuntimeError):
    pass


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict
    staged: Path | None = None  # a temporary folder to remove once the job is submitted


def _excluded(rel: str, name: str) -> bool:
    """The same patterns, applied to a staged copy (a leading '/' anchors at the root)."""
    for pattern in EXCLUDES:
        if pattern.startswith("/"):
            if rel == pattern[1:]:
                return True
        elif fnmatch.fnmatch(name, pattern):
            return True
    return False


def _stage(root: Path, config: Path) -> tuple[Path, str]:
    staged = Path(tempfile.mkdtemp(prefix="strata-submit-"))

    def ignore(folder: str, names: list[str]) -> set[str]:
        base = Path(folder).relative_to(root)
        return {n for n in names if _excluded((base / n).as_posix(), n)}

    shutil.copytree(root, staged / "src", ignore=ignore, symlinks=True)
    rel = f"{STAGED_CONFIG_DIR}/{config.name}"
    (staged / "src" / STAGED_CONFIG_DIR).mkdir(exist_ok=True)
    shutil.copy2(config, staged / "src" / rel)
    return staged, rel


def build_submission(
    config_path: str | Path,
    *,
    working_dir: str | Path | None = None,
    args: list[str] | tuple[str, ...] = (),
    env_vars: dict[str, str] | None = None,
    pip: list[str] | None = None,
) -> Submission:
    """The entrypoint and runtime_env for a config; stages a copy when the config is outside the project."""
    root = Path(working_dir or PROJECT_ROOT).resolve()
    config = Path(config_path).resolve()
    if not config.is_file():
        raise SubmitError(f"config file {str(config_path)!r} does not exist")
    from strata_quant.pipeline.config import load_config

    load_config(config)  # fail here, not minutes later on the cluster
    staged = None
    try:
        rel = config.relative_to(root).as_posix()
        wd = root
    except ValueError:
        staged, rel = _stage(root, config)
        wd = staged / "src"
    runtime_env: dict = {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    env = {"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}
    runtime_env["env_vars"] = env
    if pip:
        runtime_env["pip"] = list(pip)
    entrypoint = shlex.join(["strata", "run", rel, "--quiet", *args])
    return Submission(entrypoint, runtime_env, staged)


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return JobSubmissionClient(address)


def retry_until_agent(call, timeout: float = 120.0, sleep=time.sleep, clock=time.monotonic):
    """``call()``, sent again while the cluster says its job agent is not up yet (at most ``timeout`` s).

    Any other error is raised at once; so is this one once the time is spent.
    """
    deadline = clock() + timeout
    delay = 1.0
    while True:
        try:
            return call()
        except RuntimeError as err:
            if AGENT_NOT_READY not in str(err) or clock() + delay > deadline:
                raise
            print(f"strata: the cluster's job agent is not up yet; trying again in {delay:.0f}s", file=sys.stderr)
            sleep(delay)
            delay = min(2 * delay, 10.0)


def submit(
    config_path: str | Path,
    address: str | None = None,
    *,
    job_id: str | None = None,
    args: list[str] | tuple[str, ...] = (),
    working_dir: str | Path | None = None,
    env_vars: dict[str, str] | None = None,
    pip: list[str] | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    agent_timeout: float = 120.0,
) -> str:
    """Submit ``strata run CONFIG`` to the cluster at ``address`` (the dashboard, :8265); returns the job id."""
    sub = build_submission(config_path, working_dir=working_dir, args=args, env_vars=env_vars, pip=pip)
    client = _client(address)
    try:
        return retry_until_agent(
            lambda: client.submit_job(
                entrypoint=sub.entrypoint,
                runtime_env=sub.runtime_env,
                submission_id=job_id,
                metadata={"strata_config": Path(config_path).name},
                entrypoint_num_cpus=entrypoint_num_cpus,
                entrypoint_num_gpus=entrypoint_num_gpus,
            ),
            timeout=agent_timeout,
        )
    finally:
        if sub.staged is not None:  # the working_dir is uploaded by submit_job; the copy can go
            shutil.rmtree(sub.staged, ignore_errors=True)


def status(job_id: str, address: str | None = None) -> dict:
    """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and its details."""
    info = _client(address).get_job_info(job_id)
    return {
        "job_id": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def wait(job_id: str, address: str | None = None, timeout: float = 3600.0, poll: float = 2.0) -> str:
    """Block until the job reaches SUCCEEDED, FAILED or STOPPED; returns that status."""
    deadline = time.monotonic() + timeout
    while True:
        state = status(job_id, address)["status"]
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {state} after {timeout:.0f}s")
        time.sleep(poll)


@contextmanager
def _event_loop():
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def iter_logs(job_id: str, address: str | None = None, follow: bool = False) -> Iterator[str]:
    """The job's log: all of it so far, or (follow) streamed chunk by chunk until the job ends."""
    client = _client(address)
    if not follow:
        yield client.get_job_logs(job_id)
        return
    with _event_loop() as loop:
        stream = client.tail_job_logs(job_id).__aiter__()
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                break


def logs(job_id: str, address: str | None = None, follow: bool = False, out: TextIO | None = None) -> str | None:
    """Write the job's log to ``out`` (stdout); with follow, stream until the job ends and return its status."""
    out = out or sys.stdout
    for chunk in iter_logs(job_id, address, follow):
        out.write(chunk)
        out.flush()
    return status(job_id, address)["status"] if follow else None
