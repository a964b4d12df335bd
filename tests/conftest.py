"""Shared test fixtures: cached real fixtures (fetched once by pipeline.fixtures) and a Ray session."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.s3_server"]  # the `s3_server` fixture (SeaweedFS) and the test S3 credentials


@pytest.fixture(scope="session")
def tiny_model_path():
    from strata_quant.pipeline import fixtures

    return fixtures.tiny_llama()


@pytest.fixture(scope="session")
def smollm2_path():
    from strata_quant.pipeline import fixtures

    return fixtures.smollm2()


@pytest.fixture(scope="session")
def emma_path():
    from strata_quant.pipeline import fixtures

    return fixtures.austen("emma")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs seconds)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def mounted_tmpfs(path, size: str):
    """A real tmpfs of ``size`` at ``path`` (a real ENOSPC from the kernel when it fills).
    Skips the test, with the reason, where this machine does not allow mounting."""
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
