"""A run solved from another run's kept statistics (``calibration.statistics``).

A run with ``run.keep_statistics`` stores each shared-input group's Hessian H beside its results
(``workers.records.ResultWriter.statistics``). A later run on the same checkpoint names it and
solves GPTQ from those H on any grid, mix or solver setting, with no calibration forward: an
extra GGUF mix costs its solves, not the passes. The statistics are the source run's: with
true-sequential stages and quantized propagation, a stage's inputs went through the source
run's quantized weights, so the later run's record says where they came from, and what they
depend on (calibration, propagation, stages, dtypes) must be the same in both configs.
Everything is checked here, at plan time, before block 0.
"""

from __future__ import annotations

from collections.abc import Callable

from strata_quant.pipeline.config import ConfigError, JobConfig

# what a group's H depends on besides the checkpoint: (section, key) of the config
STATISTICS_DEPEND_ON = (
    ("calibration", "source"),
    ("calibration", "num_samples"),
    ("calibration", "seq_len"),
    ("calibration", "sampling"),
    ("calibration", "seed"),
    ("calibration", "text_field"),
    ("calibration", "bos"),
    ("run", "propagate"),
    ("run", "hessian_dtype"),
    ("run", "hidden_dtype"),
    ("quant", "true_sequential"),
)


def kept_statistics(
    store,
    cfg: JobConfig,
    fingerprint: str,
    linears: dict[int, list[str]],
    moe_blocks: list[int],
    finished: Callable[..., dict | None],
) -> tuple[str, dict[int, list[dict]]]:
    """``(source, entries)``: the source run named with its fingerprint (the later run's calibration
    part of its own fingerprint) and, per block, the statistics entries of its groups, together
    covering every linear of the block once. ``fingerprint``: this run's checkpoint's; ``finished``:
    ``(store, record key, linears)`` → the block's record if it is complete (pipeline.run's check).
    A ConfigError names what is missing or differs."""
    source = cfg.calibration.statistics
    where = f"calibration.statistics: run {source!r} in {cfg.run.store}"
    if not store.exists(f"runs/{source}/run.json"):
        raise ConfigError(f"{where} does not exist")
    run = store.get_json(f"runs/{source}/run.json")
    old = run["config"]
    if not old["run"].get("keep_statistics"):  # absent from records older than the key
        raise ConfigError(f"{where} did not keep its statistics (rerun it with run.keep_statistics: true)")
    if run["parts"]["model"] != fingerprint:
        raise ConfigError(f"{where} was made from another checkpoint than {cfg.model}")
    if moe_blocks:
        raise ConfigError(f"{where}: blocks {moe_blocks[:4]} hold routed experts, whose statistics are not kept")
    mine = cfg.model_dump()
    differ = [
        f"{section}.{key} {old[section][key]!r} there, {mine[section][key]!r} here"
        for section, key in STATISTICS_DEPEND_ON
        if old[section][key] != mine[section][key]
    ]
    if differ:
        raise ConfigError(f"{where} collected its statistics otherwise: {'; '.join(differ)}")
    entries: dict[int, list[dict]] = {}
    for b, names in linears.items():
        record = finished(store, f"runs/{source}/blocks/{b:05d}/record.json", names)
        if record is None:
            raise ConfigError(f"{where}: block {b} is not finished (resume that run first)")
        kept = [(r["name"], r["statistics"]) for r in record["results"] if "statistics" in r]
        covered = sorted(leader[: -len(e["group"][0])] + n for leader, e in kept for n in e["group"])
        if covered != sorted(names):
            missing = sorted(set(names) - set(covered)) or sorted(set(covered) - set(names))
            raise ConfigError(f"{where}: block {b} has no kept statistics for {', '.join(missing[:3])}")
        entries[b] = [e for _, e in kept]
    return f"statistics:{source}:{run['fingerprint']}", entries
