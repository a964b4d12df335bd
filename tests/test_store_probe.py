"""Workers check, before block 0, that they see the store the driver writes (run.check_store_seen)."""

from __future__ import annotations

import types

import pytest


def test_a_worker_that_does_not_see_the_drivers_store_is_refused(ray_session, tmp_path):
    import ray

    from strata_quant.pipeline.config import ConfigError
    from strata_quant.pipeline.run import check_store_seen
    from strata_quant.pipeline.store import LocalStore
    from strata_quant.workers.actor import BlockWorker

    @ray.remote(num_cpus=0)
    class Worker:
        """BlockWorker.store_sees on a store of the worker's own (another node's disk: another folder)."""

        def __init__(self, store):
            self.me = types.SimpleNamespace(store=store)

        def store_sees(self, key, nonce):
            return BlockWorker.store_sees(self.me, key, nonce)

    driver = LocalStore(tmp_path / "store")
    shared = Worker.remote(LocalStore(tmp_path / "store"))
    elsewhere = Worker.remote(LocalStore(tmp_path / "node-b-disk"))
    check_store_seen(
        driver, str(tmp_path / "store"), "runs/x", [shared], {"0": "node-a"}, 60, "a limit"
    )  # sees it: no error
    with pytest.raises(ConfigError, match=r"worker\(s\) \[1\] \(node node-b\) do not see what the driver writes"):
        check_store_seen(
            driver, str(tmp_path / "store"), "runs/x", [shared, elsewhere], {"0": "a", "1": "node-b"}, 60, "a limit"
        )
    assert not (tmp_path / "node-b-disk" / "runs" / "x" / "store-probe.json").exists()
