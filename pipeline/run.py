"""The driver: plan a run, start the worker actors on Ray, walk the blocks, keep the record.

The driver never loads weights: it reads the checkpoint's config and index, tokenises
the calibration text, and hands each worker its shard of samples. Each block ends with
a record written after all its result objects; a block is done only when its record
exists and every hash in it matches the stored object.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from pipeline import fixtures
from pipeline.calibration import calibration_windows, load_text, tokenize_stream
from pipeline.checkpoint import CheckpointReader
from pipeline.config import ConfigError, JobConfig, check_against_model
from pipeline.store import StoreError, open_store, sha256_bytes
from workers.actor import BlockWorker, WorkerJob
from workers.result import QuantSpec

log = logging.getLogger("strata.run")

STRATA_VERSION = "0.1.0"


@dataclass
class RunOutcome:
    run_id: str
    prefix: str
    store: object
    reader: CheckpointReader
    records: dict[int, dict]
    wall_s: float
    phase_s: dict[str, float] = field(default_factory=dict)
    solved_blocks: list[int] = field(default_factory=list)
    resumed_blocks: list[int] = field(default_factory=list)


class RayBlockWorker(BlockWorker):
    """The worker as Ray runs it: adds the node address for the collective's rendezvous."""

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()


def start_ray(num_workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        cpus = max(os.cpu_count() or 1, num_workers)
        log.info("starting a local Ray with %d CPU slots", cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)


def fingerprint_parts(cfg: JobConfig, reader: CheckpointReader, token_ids: torch.Tensor) -> dict[str, str]:
    """What a run's results depend on; a resumed run must match all of it."""
    quant = cfg.quant.model_dump()
    quant.pop("allow_partial_group")
    solve = {"quant": quant, "propagate": cfg.run.propagate, "hessian_dtype": cfg.run.hessian_dtype}
    return {
        "model": reader.fingerprint(),
        "calibration": sha256_bytes(token_ids.numpy().tobytes()) + f":{tuple(token_ids.shape)}",
        "solve": sha256_bytes(json.dumps(solve, sort_keys=True).encode()),
    }


def record_is_complete(store, record_key: str) -> dict | None:
    """The block record if it exists and every result it lists is stored with its hash."""
    try:
        if not store.exists(record_key):
            return None
        record = store.get_json(record_key)
        if not record.get("complete"):
            return None
        for entry in record["results"]:
            if not store.exists(entry["key"]) or sha256_bytes(store.get_bytes(entry["key"])) != entry["sha256"]:
                return None
    except (StoreError, ValueError) as err:  # corrupt or unreadable: the block is redone
        log.warning("block record %s is not usable (%s); the block will be solved again", record_key, err)
        return None
    return record


def shard_samples(token_ids: torch.Tensor, workers: int, batch_size: int) -> list[torch.Tensor]:
    """Contiguous shards whose edges fall on batch edges, so every worker sees the same batches."""
    n_batches = math.ceil(token_ids.shape[0] / batch_size)
    if n_batches < workers:
        raise ConfigError(
            f"{token_ids.shape[0]} samples in batches of {batch_size} cannot feed {workers} workers; "
            "lower run.batch_size or run.workers"
        )
    per_worker = math.ceil(n_batches / workers)
    shards = []
    for r in range(workers):
        lo, hi = r * per_worker * batch_size, min((r + 1) * per_worker * batch_size, token_ids.shape[0])
        shards.append(token_ids[lo:hi])
    if any(s.shape[0] == 0 for s in shards):
        raise ConfigError(f"{token_ids.shape[0]} samples leave a worker empty with {workers} workers")
    return shards


def prepare(cfg: JobConfig) -> tuple[CheckpointReader, torch.Tensor, object]:
    model_path = fixtures.resolve(cfg.model)
    reader = CheckpointReader(model_path)
    check_against_model(cfg, reader.config)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    c = cfg.calibration
    stream = tokenize_stream(tokenizer, load_text(c.source, c.text_field))
    token_ids = calibration_windows(stream, c.num_samples, c.seq_len, c.sampling, c.seed)
    return reader, token_ids, tokenizer


def run_job(cfg: JobConfig, progress: bool = True) -> RunOutcome:
    """Quantize every block of the model on Ray workers and record the results in the store."""
    import ray
    from tqdm import tqdm

    t_start = time.perf_counter()
    reader, token_ids, _ = prepare(cfg)
    store = open_store(cfg.run.store)
    parts = fingerprint_parts(cfg, reader, token_ids)
    fingerprint = sha256_bytes(json.dumps(parts, sort_keys=True).encode())
    run_id = cfg.run.run_id or f"{cfg.name}-{fingerprint[:12]}"
    prefix = f"runs/{run_id}"
    run_key = f"{prefix}/run.json"
    if store.exists(run_key):
        old = store.get_json(run_key)
        if old["fingerprint"] != fingerprint:
            changed = [k for k in parts if old["parts"].get(k) != parts[k]]
            raise ConfigError(f"run {run_id!r} exists with a different fingerprint: {', '.join(changed)} changed")
        log.info("resuming run %s", run_id)
    else:
        store.put_json(
            run_key,
            {
                "run_id": run_id,
                "fingerprint": fingerprint,
                "parts": parts,
                "config": cfg.model_dump(),
                "strata_version": STRATA_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "num_blocks": reader.num_layers,
            },
        )

    n_blocks = reader.num_layers
    done = {b: r for b in range(n_blocks) if (r := record_is_complete(store, f"{prefix}/blocks/{b:05d}/record.json"))}
    workers_n = cfg.run.workers
    shards = shard_samples(token_ids, workers_n, cfg.run.batch_size)
    threads = cfg.run.threads_per_worker or max(1, (os.cpu_count() or 1) // workers_n)
    job = WorkerJob(
        model_config=reader.config,
        spec=QuantSpec(cfg.quant.bits, cfg.quant.group_size, cfg.quant.sym),
        method=cfg.quant.method,
        propagate=cfg.run.propagate,
        run_prefix=prefix,
        batch_size=cfg.run.batch_size,
        damp=cfg.quant.damp,
        block_size=cfg.quant.block_size,
        act_order=cfg.quant.act_order,
        static_groups=cfg.quant.static_groups,
        mse_grid=cfg.quant.mse_grid,
        true_sequential=cfg.quant.true_sequential,
        hessian_dtype=cfg.run.hessian_dtype,
        threads=threads,
    )

    start_ray(workers_n)
    actor_cls = ray.remote(RayBlockWorker)
    actors = [
        actor_cls.options(num_cpus=1, max_concurrency=1).remote(rank, workers_n, reader, store, job)
        for rank in range(workers_n)
    ]
    phase: dict[str, float] = {}
    records: dict[int, dict] = dict(done)
    solved, resumed = [], []
    try:
        if workers_n > 1:
            address, port = ray.get([actors[0].node_ip.remote(), actors[0].rendezvous.remote()])
            ray.get([a.init_group.remote(address, port) for a in actors])
        ray.get([a.load_samples.remote(shard) for a, shard in zip(actors, shards)])
        log.info(
            "run %s: %d blocks, %d workers × %d threads, %d samples × %d tokens, %d blocks already done",
            run_id,
            n_blocks,
            workers_n,
            threads,
            *token_ids.shape,
            len(done),
        )
        bar = tqdm(total=n_blocks, desc="blocks", unit="blk", disable=not progress, dynamic_ncols=True)
        for b in range(n_blocks):
            t_block = time.perf_counter()
            replay = done.get(b)
            outs = ray.get([a.process_block.remote(b, replay) for a in actors])
            for out in outs:
                for k, v in out["timings"].items():
                    phase[k] = phase.get(k, 0.0) + v / workers_n
            if replay is None:
                results = sorted((r for out in outs for r in out["results"]), key=lambda r: r["name"])
                record = {
                    "block": b,
                    "complete": True,
                    "results": results,
                    "timings": {str(out["rank"]): out["timings"] for out in outs},
                    "wall_s": time.perf_counter() - t_block,
                }
                store.put_json(f"{prefix}/blocks/{b:05d}/record.json", record)
                records[b] = record
                solved.append(b)
            else:
                resumed.append(b)
            bar.set_postfix_str(f"block {b} {time.perf_counter() - t_block:.1f}s" + (" (replayed)" if replay else ""))
            bar.update(1)
        bar.close()
    finally:
        for a in actors:
            try:
                ray.get(a.shutdown.remote(), timeout=30)
            except Exception:  # a dead actor has nothing to shut down
                pass
            ray.kill(a)
    wall = time.perf_counter() - t_start
    store.put_json(
        f"{prefix}/summary.json",
        {"wall_s": wall, "phase_s": phase, "solved_blocks": solved, "replayed_blocks": resumed},
    )
    return RunOutcome(run_id, prefix, store, reader, records, wall, phase, solved, resumed)


def result_key_map(records: dict[int, dict]) -> dict[str, dict]:
    """Linear name (e.g. model.layers.0.self_attn.q_proj) → its record entry."""
    return {entry["name"]: entry for record in records.values() for entry in record["results"]}


def load_records(store, prefix: str, num_blocks: int) -> dict[int, dict]:
    records = {}
    for b in range(num_blocks):
        record = record_is_complete(store, f"{prefix}/blocks/{b:05d}/record.json")
        if record is None:
            raise ConfigError(f"block {b} of {prefix} is not complete; resume the run first")
        records[b] = record
    return records
