"""The driver: plan a run, start the worker actors on Ray, walk the blocks, keep the record.

The driver never loads weights: it reads the checkpoint's config and index, tokenises
the calibration text, and hands each worker its shard of samples. Each block ends with
a record written after all its result objects; a block is done only when its record
exists and every hash in it matches the stored object.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from strata_quant.pipeline.calibration import (
    CalibrationError,
    calibration_prefix,
    calibration_windows,
    load_text,
    tokenize_stream,
)
from strata_quant.pipeline.checkpoint import CheckpointError, CheckpointReader, open_checkpoint
from strata_quant.pipeline.config import ConfigError, JobConfig, check_against_model, parse_config
from strata_quant.pipeline.overrides import bits_spec_overrides
from strata_quant.pipeline.report import solver_notes
from strata_quant.pipeline.store import (
    LocalStore,
    ObjectNotFound,
    StoreError,
    install_redaction,
    open_store,
    sha256_bytes,
)
from strata_quant.pipeline.structure import (
    BlockStructure,
    block_linear_names,
    check_moe_method,
    expected_block_names,
    meta_model,
)
from strata_quant.workers.actor import BlockWorker
from strata_quant.workers.job import WorkerJob, job_overlaps
from strata_quant.workers.moe import MoeError
from strata_quant.workers.result import QuantSpec

log = logging.getLogger("strata.run")

STRATA_VERSION = "0.1.0"


SETUP_MIN_S = 600.0  # the least time the workers' setup may take before the run stops


class RunError(RuntimeError):
    """The run cannot go on (e.g. workers lost more often than run.max_restarts allows)."""


@dataclass
class RunOutcome:
    run_id: str
    prefix: str
    store: object
    reader: CheckpointReader
    records: dict[int, dict]
    wall_s: float
    phase_s: dict[str, float] = field(default_factory=dict)
    solved_blocks: list[int] = field(default_factory=list)  # solved in this run (each at most once)
    resumed_blocks: list[int] = field(default_factory=list)  # done before this run started, replayed
    restarts: int = 0  # worker groups replaced after a lost worker
    restart_replays: list[int] = field(default_factory=list)  # blocks replayed to rebuild a replaced group
    loop_s: float = 0.0  # wall time of the block loop (first block started → last record written)
    worker_nodes: dict[str, str] = field(default_factory=dict)  # rank → Ray node id (of the last worker group)
    calibration_prefix: list[str] = field(default_factory=list)  # the tokens every calibration window starts with


class RayBlockWorker(BlockWorker):
    """The worker as Ray runs it: adds the node address for the collective's rendezvous, its pid,
    and the heap upkeep between blocks."""

    def __init__(self, rank, world, reader, store, job):
        _fix_mmap_threshold()
        install_redaction()  # this process's log lines (store retries) carry no credential
        super().__init__(rank, world, reader, store, job)

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def process_block(self, b: int, replay: dict | None = None) -> dict:
        out = super().process_block(b, replay)
        self._trim_if_grown()
        return out

    _blocks_seen = 0
    _rss_settled = 0  # the largest resident set after one of the first _TRIM_WARMUP blocks

    def _trim_if_grown(self) -> None:
        """Trim the heap after a block once the resident set exceeds what the first
        ``_TRIM_WARMUP`` blocks settled at (queues filled, buffers made) by ``_TRIM_SLACK``:
        that bounds the slow growth a trim removes (without trims: +40 % over SmolLM2's 30
        blocks at W=2), without a trim after every block, which handed the next block's
        pages back to be faulted in again (1.2–1.7 s of a 25 s run at W=2, per worker)."""
        rss = _resident_bytes()
        self._blocks_seen += 1
        if self._blocks_seen <= _TRIM_WARMUP:
            self._rss_settled = max(self._rss_settled, rss)
        elif rss > self._rss_settled * (1 + _TRIM_SLACK):
            _trim_heap()


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc: nothing to tune
            _LIBC = False
    return _LIBC


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _fix_mmap_threshold(nbytes: int = 8 << 20) -> None:
    """Serve every allocation of ``nbytes`` or more by its own mmap, unmapped on free. glibc
    raises its threshold each time a large mmap'd chunk is freed (up to 32 MiB); past that,
    tensors of a few MiB come from the heap and leave holes that the next block's tensors,
    sized differently, cannot reuse, so the worker's peak RSS crept up block after block
    (+20 % from 4 to 32 blocks at SmolLM2's width). A fixed threshold turns the adjustment
    off. 8 MiB, measured (benchmarks/memory.py): smaller thresholds bound memory a little
    better but fault in fresh pages for every mid-sized tensor (128 KiB cost +35 % CPU time
    at that width); wide models' tensors are all far above it and see no change."""
    libc = _libc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def worker_runtime_env(huge_pages: bool, inherited: str | None = None) -> dict | None:
    """The Ray runtime_env of the worker actors: with ``huge_pages``, glibc's malloc asks for
    transparent huge pages (madvise) on the chunks it maps, which glibc reads from the
    environment only when a process starts. A worker's activations, Gram sums and solver
    matrices are mostly above the 8 MiB mmap threshold (:func:`_fix_mmap_threshold`), so
    each was faulted in 4 KiB at a time on every batch: ~130 000 faults per SmolLM2 block's
    statistics pass, ~14 000 with huge pages, and that pass alone 9 % faster (2-core dev
    machine); whole runs gained 1–9 % on SmolLM2 and nothing on a 1536-wide model, hence an
    option. ``inherited`` (the driver's GLIBC_TUNABLES) is kept beside it."""
    if not huge_pages:
        return None
    parts = [p for p in (inherited or "").split(":") if p and not p.startswith("glibc.malloc.hugetlb=")]
    return {"env_vars": {"GLIBC_TUNABLES": ":".join(parts + [HUGE_PAGES_TUNABLE])}}


_TRIM_WARMUP, _TRIM_SLACK = 4, 0.02


def _resident_bytes() -> int:
    """This process's resident set (/proc/self/statm), or 0 where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS after a block (glibc malloc_trim). Blocks free
    everything they allocate, but the gloo threads' malloc arenas kept the holes: the worker's
    RSS grew with depth (4 → 32 blocks: +34 %) without it."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


_LIBC = None


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


class RunMetrics:
    """Ray metrics (exported with Ray's Prometheus metrics): blocks done, seconds per block,
    worker peak memory. A cluster without the metrics agent simply gets no samples."""

    def __init__(self):
        try:
            from ray.util.metrics import Counter, Gauge

            self.blocks = Counter("strata_blocks_done", "blocks solved and recorded", tag_keys=("run",))
            self.seconds = Gauge("strata_block_seconds", "wall seconds of the last block", tag_keys=("run",))
            self.rss = Gauge("strata_worker_peak_rss_bytes", "peak RSS of a worker", tag_keys=("run", "rank"))
        except Exception as err:  # metrics are an extra; never fail a run for them
            log.debug("Ray metrics unavailable: %s", err)
            self.blocks = None

    def block_done(self, run_id: str, record: dict) -> None:
        if self.blocks is None:
            return
        try:
            self.blocks.inc(1, tags={"run": run_id})
            self.seconds.set(record["wall_s"], tags={"run": run_id})
            for rank, mib in record.get("peak_rss_mib", {}).items():
                if mib is not None:
                    self.rss.set(mib * 2**20, tags={"run": run_id, "rank": rank})
        except Exception as err:
            log.debug("could not record Ray metrics: %s", err)


def fingerprint_parts(
    cfg: JobConfig,
    reader: CheckpointReader,
    token_ids: torch.Tensor,
    statistics: str | None = None,
    ggml_types: dict[str, str] | None = None,
) -> dict[str, str]:
    """What a run's results depend on; a resumed run must match all of it. ``statistics``: the run
    whose kept statistics this one solves from (pipeline.kept_statistics), its calibration;
    ``ggml_types``: each linear's llama.cpp type in a run that solves a mix (its grid)."""
    quant = cfg.quant.model_dump()
    quant.pop("allow_partial_group")
    quant["moe"].pop("max_expert_stats")  # the bytes do not depend on it: a run resumes under a lower budget
    if not quant["refine_passes"]:  # only when set: runs without it keep the fingerprints they had
        quant.pop("refine_passes")
    solve = {"quant": quant, "propagate": cfg.run.propagate, "hessian_dtype": cfg.run.hessian_dtype}
    if cfg.run.hidden_dtype != "float32":  # only when set: fp32 runs keep the fingerprints they had
        solve["hidden_dtype"] = cfg.run.hidden_dtype
    if cfg.run.keep_statistics:  # a resumed run keeps them for every block or for none
        solve["keep_statistics"] = True
    if cfg.quant.sensitivity_bits or cfg.quant.sensitivity_types:  # a probe: only its records depend on the measure
        from strata_quant.workers.mixed import SENSITIVITY_MEASURE

        solve["sensitivity_measure"] = SENSITIVITY_MEASURE
    if ggml_types:  # a solved mix: another mix (or own types) under the same name must not resume these results
        solve["ggml_types"] = dict(sorted(ggml_types.items()))
    return {
        "model": reader.fingerprint(),
        "calibration": statistics or sha256_bytes(token_ids.numpy().tobytes()) + f":{tuple(token_ids.shape)}",
        "solve": sha256_bytes(json.dumps(solve, sort_keys=True).encode()),
    }


def record_is_complete(store, record_key: str, linears: list[str] | None = None) -> dict | None:
    """The block record if it exists and every result it lists is stored with its hash (and,
    given the block's ``linears``, it lists exactly those: one result each)."""
    try:
        if not store.exists(record_key):
            return None
        record = store.get_json(record_key)
        if not record.get("complete"):
            return None
        if linears is not None:
            problem = results_mismatch(record["results"], linears)
            if problem:
                log.warning("block record %s %s; the block will be solved again", record_key, problem)
                return None
        for entry in record["results"]:
            # AWQ's folded float tensors and the input statistics (strata imatrix) too
            extra = [*entry.get("float_results", []), *([entry["activations"]] if entry.get("activations") else [])]
            for item in (entry, *extra):
                if not store.exists(item["key"]) or sha256_bytes(store.get_bytes(item["key"])) != item["sha256"]:
                    return None
    except (StoreError, ValueError) as err:  # corrupt or unreadable: the block is redone
        log.warning("block record %s is not usable (%s); the block will be solved again", record_key, err)
        return None
    return record


def results_mismatch(results: list[dict], linears: list[str]) -> str | None:
    """How a block's result entries differ from its linears (one result per linear), or None."""
    names = [r["name"] for r in results]
    missing = [n for n in linears if n not in names]
    extra = sorted(set(names) - set(linears))
    twice = sorted(n for n in set(names) if names.count(n) > 1)
    problems = []
    for what, found in (("has no result for", missing), ("lists results of no linear of the block", extra)):
        if found:
            problems.append(f"{what} {', '.join(found[:4])}{' …' if len(found) > 4 else ''}")
    if twice:
        problems.append(f"lists {', '.join(twice[:4])} more than once")
    return "; ".join(problems) or None


def check_block_results(store, b: int, results: list[dict], linears: list[str]) -> None:
    """Before block ``b``'s record says ``complete``: one result per linear of the block, and each
    result object (AWQ's float tensors too) in the store with the size the worker wrote."""
    problem = results_mismatch(results, linears)
    if problem:
        raise RunError(f"block {b}: the workers' results {problem}; the block's record is not written")
    absent = []
    for entry in results:
        for item in (entry, *entry.get("float_results", [])):
            try:
                size = store.stat(item["key"]).size
            except ObjectNotFound:
                size = None
            if size != item["bytes"]:
                absent.append(item["key"] if size is None else f"{item['key']} ({size} of {item['bytes']} bytes)")
    if absent:
        local = isinstance(store, LocalStore)
        raise RunError(
            f"block {b}: {len(absent)} result object(s) the workers wrote are not in the store {store!r} as the "
            f"driver sees it: {', '.join(absent[:3])}{' …' if len(absent) > 3 else ''}"
            + (
                "; a local-folder store must be one filesystem every worker and the driver share "
                "(workers on other nodes write to their own disks): use a shared folder or an s3:// store"
                if local
                else ""
            )
        )


def shard_etags(reader: CheckpointReader) -> dict[str, str]:
    """An s3:// checkpoint's shard ETags by file (where the objects have them); {} for a folder."""
    return {f: info.etag for f, info in sorted(reader.shards.items()) if info.etag}


def check_same_shards(run_id: str, recorded: dict[str, str] | None, reader: CheckpointReader) -> None:
    """A resumed run reads the shards it started on: their ETags, where recorded, unchanged."""
    if not recorded:
        return
    changed = _changed(recorded, shard_etags(reader))
    if changed:
        _model_changed(
            run_id,
            f"checkpoint shard(s) {', '.join(changed[:5])}{' …' if len(changed) > 5 else ''} of {reader.uri} "
            "changed since the run started (S3 ETag)",
        )


def _changed(want: dict, got: dict) -> list[str]:
    """The keys whose values differ between two digests maps (a key missing on one side differs)."""
    return sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))


def _model_changed(run_id: str, what: str) -> None:
    raise CheckpointError(
        f"run {run_id!r}: {what}; a resume must read the same model: start a new run (another run.run_id) "
        "or restore the checkpoint"
    )


def check_block_data(run_id: str, b: int, record: dict, outs: list[dict]) -> None:
    """A replayed block read the bytes its record was solved from: each tensor's sha256 (taken by
    the worker that read it) equal to the record's. Records without hashes are not checked."""
    want = record.get("tensor_sha256")
    got = next((o["tensor_sha256"] for o in outs if o.get("tensor_sha256")), None)
    if not want or got is None:
        return
    changed = _changed(want, got)
    if changed:
        _model_changed(
            run_id,
            f"block {b} of the checkpoint changed since the run solved it: {', '.join(changed[:3])}"
            f"{f' and {len(changed) - 3} more' if len(changed) > 3 else ''} hold other bytes (same shapes)",
        )


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


def check_checkpoint(reader: CheckpointReader) -> str:
    """Every block holds exactly the tensors its layer class needs (checked from the index and the
    shard headers, before any worker starts; a MoE block's per-expert tensors by the family's
    conversion reversed, :func:`pipeline.moe.block_checkpoint_names`); returns the decoder layers' path."""
    from strata_quant.pipeline.moe import block_checkpoint_names, moe_layout

    layers_path, suffixes = expected_block_names(reader)
    model, _, _ = meta_model(reader)
    moe_blocks, _, _ = moe_layout(model, layers_path)
    for b in range(reader.num_layers):
        want = set(block_checkpoint_names(model, layers_path, b) if b in moe_blocks else suffixes)
        prefix = f"{layers_path}.{b}."
        have = {n[len(prefix) :] for n in reader.block_names(b, layers_path)}
        missing = sorted(want - have)
        if missing:
            shown = ", ".join(prefix + m for m in missing[:5]) + (" …" if len(missing) > 5 else "")
            raise CheckpointError(
                f"block {b} lacks {len(missing)} tensor(s) in the checkpoint index: {shown}; "
                "the index or the shards are incomplete"
            )
    return layers_path


def load_tokenizer(model_path, name: str | None = None):
    """The tokenizer of the model folder ``model_path`` (``name``: the model's location for
    messages, e.g. the s3:// URI whose metadata folder ``model_path`` is)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    except Exception as err:  # transformers raises OSError, ValueError, TypeError … for a missing tokenizer
        raise CheckpointError(
            f"cannot load the tokenizer from {name or str(model_path)!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "the model folder needs its tokenizer files (tokenizer.json / tokenizer_config.json)"
        ) from None


def prepare(cfg: JobConfig) -> tuple[CheckpointReader, torch.Tensor, object, BlockStructure]:
    """Everything that can be checked without Ray: checkpoint headers and completeness, the
    config against the model, tokenizer and calibration text."""
    from strata_quant.pipeline.config import check_head_dim
    from strata_quant.pipeline.probe import block_structure

    reader = open_checkpoint(cfg.model)  # a folder, fixture: or s3://bucket/prefix
    if {"hidden_size", "num_attention_heads"} <= set(reader.config):  # else the tracing below names the family
        check_head_dim(reader.config)  # before transformers builds the layer class from it
    check_moe_method(reader, cfg.quant.method)
    # traced in a child process where the layer is large: a float32 copy of it would set the driver's peak
    structure = block_structure(reader, awq=cfg.quant.method in ("awq", "awq_gptq"))
    check_against_model(cfg, reader.config, structure.widths)
    check_checkpoint(reader)
    tokenizer = load_tokenizer(reader.path, reader.uri)
    if "gguf" in cfg.output.formats:  # layout, rope, tensor names, tokenizer: refused here, not after the run
        from strata_quant.pipeline.formats.gguf import check_gguf
        from strata_quant.pipeline.formats.gguf_mix import linear_types, own_linear_types
        from strata_quant.pipeline.formats.gguf_solved import solves_mix

        check_gguf(reader.config, reader.tensor_names, reader.path)
        if solves_mix(cfg.output.gguf_type, cfg.quant.method):  # every linear's type, from llama.cpp, before block 0
            if structure.moe_blocks:
                raise ConfigError(
                    f"output.gguf_type {cfg.output.gguf_type} with quant.method gptq solves llama.cpp's mix in the "
                    f"run for dense linears only; blocks {structure.moe_blocks[:4]} hold routed experts (use a "
                    "legacy type such as Q4_0, or quant.method rtn)"
                )
            names = [n for block in block_linear_names(reader).values() for n in block]
            structure.ggml_types = linear_types(reader, cfg.output.gguf_type, names)
            structure.ggml_types |= own_linear_types(reader, cfg.output.gguf_types, names)
    c = cfg.calibration
    stream = tokenize_stream(tokenizer, load_text(c.source, c.text_field))
    prefix = calibration_prefix(tokenizer, c.bos)
    log.info(
        "calibration windows start with %s (calibration.bos: %s)",
        repr(tokenizer.convert_ids_to_tokens(prefix)) if prefix else "text only, no BOS",
        c.bos,
    )
    token_ids = calibration_windows(stream, c.num_samples, c.seq_len, c.sampling, c.seed, prefix=prefix)
    return reader, token_ids, tokenizer, structure


# errors a worker raises that say something about the input or the store: re-raised as they are
# (MoeError: quant.moe.policy fail, an expert the calibration does not reach enough)
_INPUT_ERRORS = (CheckpointError, CalibrationError, ConfigError, StoreError, MoeError)


class _WorkerLost(Exception):
    """Internal: Ray reports a worker of the group dead (its process, or its node)."""


def check_store_seen(
    store, location: str, prefix: str, actors: list, nodes: dict[str, str], timeout_s: float, limit: str
) -> None:
    """Every worker reads what the driver just wrote to the store, before block 0: a local folder
    that is not shared by every node (each worker's results on its own disk) is refused here."""
    nonce = os.urandom(8).hex()
    key = f"{prefix}/store-probe.json"
    store.put_json(key, {"nonce": nonce})
    seen = _collect([a.store_sees.remote(key, nonce) for a in actors], timeout_s, "the store check", limit)
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(
            f"run.store {location}: worker(s) {blind} (node {nodes.get(str(blind[0]), '?')}) do not see what the "
            "driver writes there; a local folder must be shared by every node (or use an s3:// store)"
        )


def _collect(refs: list, timeout_s: float, what: str, limit: str = "run.block_timeout_s") -> list:
    """``ray.get`` of every ref within ``timeout_s`` (the watchdog), failing at the first failure
    (a collective whose peer died never returns, so waiting for all would hang). A worker Ray
    reports dead becomes ``_WorkerLost``; a worker's input or store error is re-raised as it
    was raised; anything else, and the watchdog running out, is a RunError naming ``what``."""
    import ray
    from ray.exceptions import RayTaskError

    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0.0)) if left > 0 else ([], pending)
        if not ready:
            waiting = sorted(i for i, ref in enumerate(refs) if ref in pending)
            raise RunError(
                f"{what}: no answer from worker(s) {waiting} within {limit} = {timeout_s:g} s "
                "(a hung collective or a stuck worker); the workers were stopped, the finished blocks are kept"
            )
        try:
            ray.get(ready)
        except _deaths() as err:
            raise _WorkerLost(f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, _INPUT_ERRORS):
                raise cause from None
            # a peer's death breaks the others' collectives first; asked within the watchdog (5 s at least)
            dead = _peer_died(pending, min(30.0, max(5.0, deadline - time.monotonic())))
            if dead is not None:
                raise _WorkerLost(f"{dead} (the others' collective failed: {_first_line(cause)})") from err
            log.error("%s: a worker failed:\n%s", what, err)
            raise RunError(f"{what}: a worker failed: {_first_line(cause or err)}") from None
    return ray.get(refs)


def _first_line(err) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _deaths() -> tuple:
    """Ray's errors for a dead worker (imported on use: Ray loads only where a run starts); its
    memory monitor killing a worker is one of them."""
    from ray.exceptions import (
        NodeDiedError,
        ObjectLostError,
        OutOfMemoryError,
        OwnerDiedError,
        RayActorError,
        WorkerCrashedError,
    )

    return (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, OwnerDiedError, OutOfMemoryError)


def _peer_died(pending: list, timeout_s: float = 30.0) -> str | None:
    """The Ray error of another task of the same step whose worker Ray reports dead (waited for a
    while: Ray notices a death a little after its peers' connections break), or None."""
    import ray

    if not pending:
        return None
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
    for ref in ready:
        try:
            ray.get(ref)
        except _deaths() as err:
            return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        except Exception:
            pass
    return None


def _teardown(actors: list, graceful: bool) -> None:
    import ray

    for a in actors:
        if graceful:
            try:
                ray.get(a.shutdown.remote(), timeout=30)
            except Exception:  # a dead actor has nothing to shut down
                pass
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass


def _placement_group(workers: int, placement: str, gpus: int = 0, timeout_s: float = 120.0):
    """``run.placement: spread``: a placement group of one bundle per worker (1 CPU, and ``gpus``
    GPUs) with Ray's SPREAD strategy (bundles on distinct nodes where the cluster has them);
    None for ``pack``."""
    if placement != "spread":
        return None
    import ray
    from ray.util.placement_group import placement_group

    bundle = {"CPU": 1, "GPU": gpus} if gpus else {"CPU": 1}
    pg = placement_group([bundle] * workers, strategy="SPREAD")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        _remove_placement_group(pg)
        raise RunError(
            f"run.placement spread: the cluster did not grant {workers} bundles ({bundle}) within {timeout_s:.0f}s "
            f"(cluster resources: {ray.cluster_resources()})"
        )
    log.info("workers spread over the cluster's nodes (placement group of %d bundles)", workers)
    return pg


def _placement_options(pg, rank: int) -> dict:
    if pg is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank)
    }


def _remove_placement_group(pg) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception as err:  # the cluster may be gone already
        log.debug("could not remove the placement group: %s", err)


def run_job(
    cfg: JobConfig, progress: bool = True, worker_class: type = RayBlockWorker, prepared: tuple | None = None
) -> RunOutcome:
    """Quantize every block of the model on Ray workers and record the results in the store.

    A lost worker (Ray reports its process or its node dead) breaks the whole collective group:
    the group is torn down, W fresh workers are started, the blocks finished so far are replayed
    (forward only, through their stored results, as on resume) and the failed block is redone.
    At most ``run.max_restarts`` times; past that a RunError, with every finished block kept.
    Any other worker failure, and a block (or the workers' setup) taking longer than
    ``run.block_timeout_s``, stops the run with a RunError; finished blocks are kept.
    ``worker_class``: the actor class (a subclass of RayBlockWorker; tests inject faults so).
    ``prepared``: :func:`prepare`'s result when the caller has it already (pipeline.preflight).

    The phases: :func:`plan_run` (store, checkpoint, samples, the run's record, the workers'
    job), placement (Ray, GPUs, the placement group), :func:`_run_groups` (worker groups walking
    the blocks until every one is recorded), :func:`_finish` (the summary and the outcome).
    """
    import ray

    t_start = time.perf_counter()
    plan = plan_run(cfg, prepared)
    start_ray(plan.workers)
    if plan.job.moe_expert_shapes:  # the statistics budget against the smallest node's memory, before block 0
        from strata_quant.pipeline.moe import check_expert_budget

        nodes = [n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
        check_expert_budget(cfg.quant.moe.max_expert_stats, plan.job.moe_expert_shapes, min(nodes, default=0.0))
    actor_cls = ray.remote(worker_class)
    rec = _Recorder(plan, progress)
    gpus = 1 if cfg.run.device == "cuda" else 0
    if gpus:
        have = ray.cluster_resources().get("GPU", 0)
        if have < plan.workers:
            raise RunError(
                f"run.device cuda needs one GPU per worker ({plan.workers}); the Ray cluster has {have:g} "
                "(set run.device: cpu, or fewer run.workers)"
            )
    pg = _placement_group(plan.workers, cfg.run.placement, gpus)
    try:
        _run_groups(plan, rec, actor_cls, pg, gpus)
    finally:
        if pg is not None:
            _remove_placement_group(pg)
    rec.bar.close()
    return _finish(plan, rec, t_start)


@dataclass
class RunPlan:
    """What a run settles before any worker starts: where it stores, what it reads, its samples
    (one shard per worker), the blocks already done and the job every worker gets."""

    cfg: JobConfig
    store: object
    reader: CheckpointReader
    token_ids: torch.Tensor
    prefix_tokens: list[str]
    run_id: str
    prefix: str
    linears: dict[int, list[str]]  # what each block's record must hold
    done: dict[int, dict]
    shards: list[torch.Tensor]
    threads: int
    job: WorkerJob

    @property
    def workers(self) -> int:
        return self.cfg.run.workers

    @property
    def n_blocks(self) -> int:
        return self.reader.num_layers


def plan_run(cfg: JobConfig, prepared: tuple | None = None) -> RunPlan:
    """The store reached, the checkpoint and calibration prepared, the run's record written (or
    a resumed one checked), the finished blocks found and the workers' job built."""
    store = open_store(cfg.run.store)
    store.exists("runs/strata-probe")  # an unreachable store, a missing bucket, bad credentials: fail now
    reader, token_ids, tokenizer, structure = prepared or prepare(cfg)
    prefix_tokens = tokenizer.convert_ids_to_tokens(calibration_prefix(tokenizer, cfg.calibration.bos))
    linears = block_linear_names(reader)
    statistics, kept = None, None
    if cfg.calibration.statistics is not None:  # checked before this run's record is written
        from strata_quant.pipeline.kept_statistics import kept_statistics

        statistics, kept = kept_statistics(
            store, cfg, reader.fingerprint(), linears, structure.moe_blocks, record_is_complete
        )
        log.info("solving from the statistics run %s kept: no calibration forward", cfg.calibration.statistics)
    run_id = _open_run(cfg, store, reader, token_ids, prefix_tokens, statistics, structure.ggml_types)
    prefix = f"runs/{run_id}"
    done = {
        b: r
        for b in range(reader.num_layers)
        if (r := record_is_complete(store, f"{prefix}/blocks/{b:05d}/record.json", linears[b]))
    }
    workers_n = cfg.run.workers
    shards = shard_samples(token_ids, workers_n, cfg.run.batch_size)
    threads = cfg.run.threads_per_worker or max(1, (os.cpu_count() or 1) // workers_n)
    job = worker_job(cfg, reader, structure, prefix, threads, kept)
    return RunPlan(cfg, store, reader, token_ids, prefix_tokens, run_id, prefix, linears, done, shards, threads, job)


def _open_run(
    cfg: JobConfig,
    store,
    reader: CheckpointReader,
    token_ids: torch.Tensor,
    prefix_tokens,
    statistics: str | None,
    ggml_types: dict[str, str] | None = None,
) -> str:
    """The run's id; its ``run.json`` written, or (resume) checked against this config and checkpoint."""
    parts = fingerprint_parts(cfg, reader, token_ids, statistics, ggml_types)
    fingerprint = sha256_bytes(json.dumps(parts, sort_keys=True).encode())
    run_id = cfg.run.run_id or f"{cfg.name}-{fingerprint[:12]}"
    run_key = f"runs/{run_id}/run.json"
    if store.exists(run_key):
        old = store.get_json(run_key)
        if old["fingerprint"] != fingerprint:
            changed = [k for k in parts if old["parts"].get(k) != parts[k]]
            raise ConfigError(f"run {run_id!r} exists with a different fingerprint: {', '.join(changed)} changed")
        check_same_shards(run_id, old.get("shard_etags"), reader)
        log.info("resuming run %s", run_id)
        return run_id
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
            "calibration_prefix": prefix_tokens,
            **({"shard_etags": etags} if (etags := shard_etags(reader)) else {}),
        },
    )
    return run_id


def worker_job(
    cfg: JobConfig, reader: CheckpointReader, structure, prefix: str, threads: int, kept: dict | None = None
) -> WorkerJob:
    """The job every worker of the run gets (plain data, sent once); ``kept``: the statistics entries
    per block of the run it solves from (pipeline.kept_statistics)."""
    quant, run = cfg.quant, cfg.run
    return WorkerJob(
        model_config=reader.config,
        spec=QuantSpec(quant.bits, quant.group_size, quant.sym),
        method=quant.method,
        propagate=run.propagate,
        run_prefix=prefix,
        batch_size=run.batch_size,
        damp=quant.damp,
        block_size=quant.block_size,
        act_order=quant.act_order,
        static_groups=quant.static_groups,
        mse_grid=quant.mse_grid,
        diag_shrink=quant.diag_shrink,
        refine_passes=quant.refine_passes,
        mse_weight=quant.mse_weight,
        true_sequential=quant.true_sequential,
        awq_grid=quant.awq_grid,
        awq_duo=quant.awq_duo,
        awq_clip=quant.awq_clip,
        awq_clip_search=quant.awq_clip_search,
        hessian_dtype=run.hessian_dtype,
        hidden_dtype=run.hidden_dtype,
        overlap_depth=run.overlap_depth,
        overlap_mode=run.overlap_mode,
        split_solves=run.split_solves,
        stage_cache=run.stage_cache,
        threads=threads,
        device=run.device,
        modules_to_not_convert=list(quant.modules_to_not_convert),
        skip_outliers=quant.skip_outliers,
        outlier_sigma=quant.outlier_sigma,
        nf4_blocksize=quant.nf4_blocksize,
        double_quant=quant.double_quant,
        fp8_type=quant.fp8_type,
        fp8_block=tuple(quant.fp8_block) if quant.fp8_block else None,
        spec_overrides=bits_spec_overrides(quant.bits_overrides),  # mixed precision (pipeline/overrides.py)
        sensitivity_bits=list(quant.sensitivity_bits),
        sensitivity_types=list(quant.sensitivity_types),
        collective_timeout_s=run.block_timeout_s,  # no collective waits longer than a block may take
        awq_relations=structure.awq_relations,
        awq_unfolded=structure.awq_unfolded,
        expert_sources=structure.expert_sources,
        moe_blocks=structure.moe_blocks,
        moe_renames=structure.moe_renames,
        moe_min_tokens=quant.moe.min_tokens,
        moe_policy=quant.moe.policy,
        moe_max_expert_stats=quant.moe.max_expert_stats,
        moe_expert_shapes=structure.expert_shapes,
        ggml_types=structure.ggml_types,
        keep_statistics=run.keep_statistics,
        kept_statistics=kept,
    )


class _Recorder:
    """The driver's account of one run: block records written in block order (each after its
    results are checked to be stored), the phases' seconds, the blocks solved / replayed, the
    lost workers, the progress bar."""

    def __init__(self, plan: RunPlan, progress: bool):
        from tqdm import tqdm

        self.plan = plan
        self.phase: dict[str, float] = {}
        self.records: dict[int, dict] = dict(plan.done)
        self.solved: list[int] = []
        self.resumed: list[int] = []
        self.restart_replays: list[int] = []
        self.losses: list[dict] = []
        self.block = -1  # the block the current worker group is on (-1: its setup)
        self.t_loop: float | None = None
        self.nodes: dict[str, str] = {}
        log.info(
            "run %s: %d blocks, %d workers × %d threads, %d samples × %d tokens, %d blocks already done",
            plan.run_id,
            plan.n_blocks,
            plan.workers,
            plan.threads,
            *plan.token_ids.shape,
            len(plan.done),
        )
        self.bar = tqdm(total=plan.n_blocks, desc="blocks", unit="blk", disable=not progress, dynamic_ncols=True)
        self.metrics = RunMetrics()

    def add_phases(self, timings_list: list[dict]) -> None:
        for timings in timings_list:
            for k, v in timings.items():
                self.phase[k] = self.phase.get(k, 0.0) + v / self.plan.workers

    def write_record(self, b: int, outs: list[dict], t_block: float) -> None:
        """Block b's record (last, after every result it lists is checked to be stored)."""
        plan = self.plan
        results = sorted((r for out in outs for r in out["results"]), key=lambda r: r["name"])
        check_block_results(plan.store, b, results, plan.linears[b])
        _log_solver_notes(b, results)
        digests = next((out["tensor_sha256"] for out in outs if out.get("tensor_sha256")), None)
        record = {
            "block": b,
            "complete": True,
            "results": results,
            **({"tensor_sha256": digests} if digests else {}),
            "timings": {str(out["rank"]): out["timings"] for out in outs},
            "peak_rss_mib": {str(out["rank"]): out.get("peak_rss_mib") for out in outs},
            **(
                {"peak_gpu_mib": {str(o["rank"]): o["peak_gpu_mib"] for o in outs}} if "peak_gpu_mib" in outs[0] else {}
            ),
            "wall_s": time.perf_counter() - t_block,
        }
        self.metrics.block_done(plan.run_id, record)
        plan.store.put_json(f"{plan.prefix}/blocks/{b:05d}/record.json", record)
        self.records[b] = record
        self.solved.append(b)
        self.bar.set_postfix_str(f"block {b} {record['wall_s']:.1f}s")
        self.bar.update(1)

    def note_finished(self, queued: dict[int, dict], reports: list[dict]) -> None:
        """Solves queued on the workers' solver threads (propagate float) that are stored now;
        records are written in block order, each once every worker has stored its part."""
        for report in reports:
            if report["block"] not in queued:
                raise RunError(f"worker {report['rank']} reported block {report['block']}, which was not queued")
            queued[report["block"]]["finished"][report["rank"]] = report
            self.add_phases([report["timings"]])
        while queued and len(queued[first := min(queued)]["finished"]) == self.plan.workers:
            entry = queued.pop(first)
            outs = []
            for out in entry["outs"]:
                report = entry["finished"][out["rank"]]
                rss = [m for m in (out.get("peak_rss_mib"), report.get("peak_rss_mib")) if m is not None]
                outs.append(
                    {
                        "rank": out["rank"],
                        "results": report["results"],
                        "timings": {**out["timings"], **report["timings"]},
                        "peak_rss_mib": max(rss) if rss else None,
                        **({"tensor_sha256": out["tensor_sha256"]} if out.get("tensor_sha256") else {}),
                    }
                )
            self.write_record(first, outs, entry["t"])

    def lost(self, err: Exception) -> None:
        """A worker of the group lost: noted, or past ``run.max_restarts`` the run stops."""
        cfg, b = self.plan.cfg, self.block
        self.losses.append({"block": b, "error": str(err)})
        log.warning(
            "lost a worker during %s (%s); worker loss %d, run.max_restarts = %d",
            f"block {b}" if b >= 0 else "setup",
            err,
            len(self.losses),
            cfg.run.max_restarts,
        )
        if len(self.losses) > cfg.run.max_restarts:
            self.bar.close()
            raise RunError(
                f"run {self.plan.run_id}: lost workers {len(self.losses)} times, more than run.max_restarts = "
                f"{cfg.run.max_restarts} allows (last: {err}); the {len(self.records)} finished block(s) are kept: "
                f"continue with `strata resume {self.plan.run_id} --store {cfg.run.store}`"
            ) from None


def _log_solver_notes(b: int, results: list[dict]) -> None:
    notes = solver_notes(results)
    if notes["damp_raised_linears"] or notes["dead_inputs"]:
        log.warning(
            "block %d: GPTQ damping raised in %d linear(s) (up to %.3g× quant.damp), %d dead input(s) "
            "(never active in the calibration data, weights zeroed) in %d linear(s)",
            b,
            notes["damp_raised_linears"],
            notes["damp_max_factor"],
            notes["dead_inputs"],
            notes["dead_input_linears"],
        )


def _run_groups(plan: RunPlan, rec: _Recorder, actor_cls, pg, gpus: int) -> None:
    """Worker groups, one after another, until every block is recorded: a group that loses a
    worker is torn down and a fresh one replays the finished blocks and goes on."""
    cfg, workers_n = plan.cfg, plan.workers
    env = worker_runtime_env(cfg.run.huge_pages, os.environ.get("GLIBC_TUNABLES"))
    env_option = {"runtime_env": env} if env else {}
    while True:
        actors = [
            actor_cls.options(
                num_cpus=1, num_gpus=gpus, max_concurrency=1, **env_option, **_placement_options(pg, rank)
            ).remote(rank, workers_n, plan.reader, plan.store, plan.job)
            for rank in range(workers_n)
        ]
        restarting = bool(rec.losses)
        rec.block = -1
        ok = False
        try:
            _setup_workers(plan, actors, rec)
            if rec.t_loop is None:
                rec.t_loop = time.perf_counter()
            _run_blocks(plan, actors, rec, restarting)
            ok = True
        except _WorkerLost as err:
            rec.lost(err)
        finally:
            _teardown(actors, graceful=ok)
        if ok:
            return
        log.warning(
            "starting %d fresh workers; replaying the %d finished block(s), then solving the rest (lost in block %d)",
            workers_n,
            len(rec.records),
            rec.block,
        )


def _setup_workers(plan: RunPlan, actors: list, rec: _Recorder) -> None:
    """Every actor up, the collective group formed, the store seen alike, the samples loaded.
    Starting the actors (a node to come up, torch and transformers to import) is not a block's
    work: it gets the watchdog or SETUP_MIN_S, whichever is longer."""
    cfg = plan.cfg
    setup, limit = max(cfg.run.block_timeout_s, SETUP_MIN_S), f"max(run.block_timeout_s, {SETUP_MIN_S:g} s)"
    # every actor up first: the group's rendezvous then waits for none of them to start
    ids = _collect([a.node_id.remote() for a in actors], setup, "worker setup", limit)
    rec.nodes = {str(rank): node for rank, node in enumerate(ids)}
    if plan.workers > 1:
        address, port = _collect(
            [actors[0].node_ip.remote(), actors[0].rendezvous.remote()], setup, "worker setup", limit
        )
        _collect([a.init_group.remote(address, port) for a in actors], setup, "worker setup", limit)
    check_store_seen(plan.store, cfg.run.store, plan.prefix, actors, rec.nodes, setup, limit)
    if plan.job.moe_expert_shapes:  # the statistics budget against each worker's free GPU memory, before block 0
        from strata_quant.pipeline.moe import check_expert_budget

        free = _collect([a.device_memory.remote() for a in actors], setup, "worker setup", limit)
        gpus = {rank: b for rank, b in enumerate(free) if b is not None}
        if gpus:  # the nodes' memory was checked before the workers started
            check_expert_budget(cfg.quant.moe.max_expert_stats, plan.job.moe_expert_shapes, math.inf, gpus)
    if plan.job.kept_statistics is None:  # solving from kept statistics: no samples, no forward
        _collect([a.load_samples.remote(shard) for a, shard in zip(actors, plan.shards)], setup, "worker setup", limit)


def _run_blocks(plan: RunPlan, actors: list, rec: _Recorder, restarting: bool) -> None:
    """One worker group through every block: finished blocks replayed, the others solved and
    recorded (queued solves recorded as they finish, then drained)."""
    watchdog = plan.cfg.run.block_timeout_s
    queues = job_overlaps(plan.job)  # propagate float: solves queued behind the forward
    queued: dict[int, dict] = {}  # block → its process_block outputs and the solver reports so far
    submitted: dict[int, list] = {}  # block → its process_block refs
    for b in range(plan.n_blocks):
        rec.block = b
        t_block = time.perf_counter()
        replay = rec.records.get(b)
        # queued solves: the next block's call waits in each worker's queue, so a worker
        # goes on without a round trip through the driver (workers then meet only in
        # their reductions); a lost worker can take a just-finished block's reply with it
        for ahead in (b, b + 1) if queues else (b,):
            if ahead < plan.n_blocks and ahead not in submitted:
                submitted[ahead] = [a.process_block.remote(ahead, rec.records.get(ahead)) for a in actors]
        outs = _collect(submitted.pop(b), watchdog, f"block {b}")
        if replay is not None:  # the same bytes as when it was solved
            check_block_data(plan.run_id, b, replay, outs)
        if not (restarting and replay is not None):  # a restart's replays are not counted twice
            rec.add_phases([out["timings"] for out in outs])
        if replay is None and all(out.get("queued") for out in outs):
            queued[b] = {"t": t_block, "outs": outs, "finished": {}}
        elif replay is None:
            rec.write_record(b, outs, t_block)
        elif b in plan.done and b not in rec.resumed:
            rec.resumed.append(b)
        else:
            rec.restart_replays.append(b)
        if replay is not None and not restarting:
            rec.bar.set_postfix_str(f"block {b} {time.perf_counter() - t_block:.1f}s (replayed)")
            rec.bar.update(1)
        rec.note_finished(queued, [r for out in outs for r in out.get("finished", [])])
    if queued:  # propagate float: wait for the solves still queued behind the forward
        drained = _collect([a.drain.remote() for a in actors], watchdog, f"the solves of {sorted(queued)}")
        rec.note_finished(queued, [r for reports in drained for r in reports])
    if queued:
        raise RunError(f"run {plan.run_id}: the solves of block(s) {sorted(queued)} never finished")


def _finish(plan: RunPlan, rec: _Recorder, t_start: float) -> RunOutcome:
    """The run's summary in the store, and its outcome."""
    wall = time.perf_counter() - t_start
    loop_s = time.perf_counter() - rec.t_loop if rec.t_loop is not None else 0.0
    plan.store.put_json(
        f"{plan.prefix}/summary.json",
        {
            "wall_s": wall,
            "loop_s": loop_s,
            "phase_s": rec.phase,
            "solved_blocks": rec.solved,
            "replayed_blocks": rec.resumed,
            "restarts": len(rec.losses),
            "lost_workers": rec.losses,
            "restart_replays": rec.restart_replays,
            "worker_nodes": rec.nodes,
        },
    )
    return RunOutcome(
        plan.run_id,
        plan.prefix,
        plan.store,
        plan.reader,
        rec.records,
        wall,
        rec.phase,
        rec.solved,
        rec.resumed,
        len(rec.losses),
        rec.restart_replays,
        loop_s,
        rec.nodes,
        calibration_prefix=plan.prefix_tokens,
    )


def resume_config(run_id: str, store_location: str, overrides: dict | None = None) -> JobConfig:
    """The config a run was started with (from its run.json), pointed at this store and run id."""
    store = open_store(store_location)
    key = f"runs/{run_id}/run.json"
    if not store.exists(key):
        raise ConfigError(f"no run {run_id!r} in {store_location} (no {key})")
    data = store.get_json(key)["config"]
    data["run"] = {**data.get("run", {}), "run_id": run_id, "store": store_location}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return parse_config(data, f"run.json of {run_id}")


def recorded_entries(store, run_id: str) -> tuple[dict, dict[str, dict]]:
    """A stored run's run.json and its record entries by linear name (every block must be done)."""
    key = f"runs/{run_id}/run.json"
    if not store.exists(key):
        raise ConfigError(f"no run {run_id!r} in the store (no {key})")
    run = store.get_json(key)
    return run, result_key_map(load_records(store, f"runs/{run_id}", int(run["num_blocks"])))


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
