"""Shared test fixtures: cached real fixtures (fetched once by pipeline.fixtures) and a Ray session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.s3_server"]  # the `s3_server` fixture (SeaweedFS) and the test S3 credentials


@pytest.fixture(scope="session")
def tiny_model_path():
    from pipeline import fixtures

    return fixtures.tiny_llama()


@pytest.fixture(scope="session")
def smollm2_path():
    from pipeline import fixtures

    return fixtures.smollm2()


@pytest.fixture(scope="session")
def emma_path():
    from pipeline import fixtures

    return fixtures.austen("emma")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs seconds)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
