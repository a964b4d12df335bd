"""Mixed precision by sensitivity: ``strata plan`` turns a probe run into per-linear bits.

A probe run is an ordinary run with ``quant.sensitivity_bits: [3, 4, 8]`` (``propagate: float``
makes it cheap): the owner of every linear records, in the linear's record entry, its
sensitivity at each of those widths (``workers.mixed``; the ``sensitivity`` field,
{"bits": error}). :func:`plan_bits` chooses one width per linear that minimises the summed
sensitivity under a budget of *stored bits* — the exact size of the linears in a GPTQ checkpoint
(:func:`workers.mixed.gptq_stored_bits`: codes, zeros, fp16 scales and g_idx), so "the same size as
uniform 4-bit" means the same bytes on disk. :func:`write_planned_config` writes the probe's config
with ``quant.bits_overrides`` (the linears whose width differs from ``quant.bits``); running it
quantizes each linear at its own width, and the GPTQ export carries the widths as ``dynamic``
per-module overrides, the GGUF as per-tensor types.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from strata_quant.pipeline.config import ConfigError
from strata_quant.pipeline.run import recorded_entries
from strata_quant.workers.mixed import choose_bits_by_cost, gptq_stored_bits


@dataclass
class Plan:
    """A per-linear width assignment and what it costs."""

    bits: dict[str, int]  # linear name → chosen width
    base_bits: int  # quant.bits of the probe
    group_size: int
    budget_bits: int  # the allowed total stored bits of the quantized linears
    stored_bits: int  # what the choice takes (≤ budget)
    weights: int  # Σ weights of the quantized linears
    sensitivity: float  # Σ recorded error of the choice
    uniform_sensitivity: dict[int, float] = field(default_factory=dict)  # Σ error, every linear at b

    @property
    def bpw(self) -> float:
        return self.stored_bits / self.weights

    @property
    def overrides(self) -> dict[str, int]:
        """The linears whose width differs from ``base_bits`` (what ``quant.bits_overrides`` holds)."""
        return {n: b for n, b in self.bits.items() if b != self.base_bits}

    def summary(self) -> str:
        hist = Counter(self.bits.values())
        widths = ", ".join(f"{b}-bit × {hist[b]}" for b in sorted(hist))
        uniform = ", ".join(f"{b}-bit {e:.4g}" for b, e in sorted(self.uniform_sensitivity.items()))
        return (
            f"{len(self.bits)} linears: {widths}; {self.bpw:.4f} stored bits/weight "
            f"(budget {self.budget_bits / self.weights:.4f}); Σ sensitivity {self.sensitivity:.4g} "
            f"(uniform: {uniform})"
        )


def probe_entries(store, run_id: str) -> tuple[dict, dict[str, dict]]:
    """The probe run's config and its record entries by linear name (every block must be done and
    every entry must carry a ``sensitivity``)."""

    run, entries = recorded_entries(store, run_id)
    missing = [n for n, e in entries.items() if not e.get("sensitivity")]
    if missing:
        raise ConfigError(
            f"run {run_id!r} recorded no sensitivity for {len(missing)} linear(s) (e.g. {missing[0]}); "
            "probe with quant.sensitivity_bits, e.g. --set 'quant.sensitivity_bits=[3,4,8]'"
        )
    return run["config"], entries


def plan_bits(
    entries: dict[str, dict],
    *,
    base_bits: int,
    target_bpw: float | None = None,
    match_bits: int | None = None,
    match_group: int | None = None,
    candidates: list[int] | None = None,
) -> Plan:
    """Choose each linear's width from its recorded sensitivities.

    The budget is ``target_bpw`` stored bits per weight (GPTQ layout, over the quantized linears)
    or, with ``match_bits``, exactly the stored bits of every linear at ``match_bits`` (the size of
    the uniform checkpoint; at group size ``match_group`` when given, e.g. the size of uniform 4-bit
    g32 for a g64 run). ``candidates`` defaults to the recorded widths.
    """
    if (target_bpw is None) == (match_bits is None):
        raise ValueError("give exactly one of target_bpw and match_bits")
    errors: dict[str, dict[int, float]] = {}
    costs: dict[str, dict[int, int]] = {}
    weights = 0
    group_size = None
    for name, entry in entries.items():
        recorded = {int(b): float(e) for b, e in entry["sensitivity"].items()}
        widths = sorted(recorded) if candidates is None else sorted(candidates)
        absent = [b for b in widths if b not in recorded]
        if absent:
            raise ValueError(f"{name}: no sensitivity recorded at {absent} bits (recorded: {sorted(recorded)})")
        rows, cols = entry["shape"]
        group_size = int(entry["group_size"])
        errors[name] = {b: recorded[b] for b in widths}
        costs[name] = {b: gptq_stored_bits(b, rows, cols, group_size) for b in widths}
        weights += rows * cols
    if not errors:
        raise ValueError("the run has no quantized linears")
    if match_bits is not None:
        budget = 0
        for entry in entries.values():
            rows, cols = entry["shape"]
            group = int(entry["group_size"]) if match_group is None else match_group
            budget += gptq_stored_bits(match_bits, rows, cols, group)
    else:
        budget = int(target_bpw * weights)
    try:
        choice = choose_bits_by_cost(errors, costs, budget, max_states=200_000)
    except ValueError:
        least = sum(min(c.values()) for c in costs.values()) / weights
        raise ValueError(
            f"no assignment fits {budget / weights:.4f} stored bits per weight (the smallest takes {least:.4f})"
        ) from None
    uniform = {}
    for b in sorted({b for e in errors.values() for b in e}):
        if all(b in e for e in errors.values()):
            uniform[b] = sum(e[b] for e in errors.values())
    return Plan(
        bits=choice,
        base_bits=base_bits,
        group_size=int(group_size),
        budget_bits=budget,
        stored_bits=sum(costs[n][b] for n, b in choice.items()),
        weights=weights,
        sensitivity=sum(errors[n][b] for n, b in choice.items()),
        uniform_sensitivity=uniform,
    )


def write_planned_config(config: dict, plan: Plan, dest: Path, *, name: str | None = None) -> Path:
    """The probe's config with ``quant.bits_overrides`` from ``plan`` (and no sensitivity probe,
    no fixed run id), written as YAML to ``dest`` (through a temporary name)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    data["quant"] = {**data["quant"], "bits_overrides": plan.overrides, "sensitivity_bits": []}
    data["run"] = {**data.get("run", {}), "run_id": None}
    data["name"] = name or f"{data.get('name', 'job')}-mixed{plan.bpw:.2f}".replace(".", "p")
    return _write_config(data, dest, f"strata plan: {plan.summary()}")


def _write_config(data: dict, dest: Path, header: str) -> Path:
    """A planned config, checked to load, written as YAML under a ``# header`` line to ``dest`` (through a
    temporary name, so a reader never sees half a file)."""
    from strata_quant.pipeline.config import parse_config

    parse_config(data, f"planned config {dest}")  # what we write must load
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(f"# {header}\n" + yaml.safe_dump(data, sort_keys=False))
    tmp.replace(dest)
    return dest


# ------------------------------------------------------------------------------ a GGUF mix of strata's own


def gguf_bytes(ggml_type: str, rows: int, cols: int) -> int:
    """Bytes a [rows, cols] tensor takes in a GGUF as ``ggml_type`` (gguf-py's block sizes)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    if cols % block:
        raise ValueError(f"{ggml_type} cannot hold rows of {cols} values (block {block})")
    return rows * (cols // block) * size


@dataclass
class TypePlan:
    """A per-linear llama.cpp type assignment at the byte size of one of llama.cpp's mixes."""

    mix: str  # the llama.cpp mix whose linears' bytes are the budget (and whose other tensors the file keeps)
    types: dict[str, str]  # linear name → chosen type
    mix_types: dict[str, str]  # linear name → the type llama.cpp's mix gives it
    budget_bytes: int  # Σ bytes of the linears in llama.cpp's mix
    stored_bytes: int  # what the choice takes (≤ budget)
    sensitivity: float  # Σ recorded sensitivity of the choice
    mix_sensitivity: float  # Σ recorded sensitivity of llama.cpp's types (nan where one was not recorded)

    @property
    def overrides(self) -> dict[str, str]:
        """The linears whose type differs from the mix's (what ``output.gguf_types`` holds)."""
        return {n: t for n, t in self.types.items() if t != self.mix_types[n]}

    def summary(self) -> str:
        hist = Counter(self.types.values())
        kinds = ", ".join(f"{t} × {hist[t]}" for t in sorted(hist))
        return (
            f"{len(self.types)} linears: {kinds}; {self.stored_bytes:,} bytes (llama.cpp's {self.mix}: "
            f"{self.budget_bytes:,}); Σ sensitivity {self.sensitivity:.4g} (llama.cpp's types: "
            f"{self.mix_sensitivity:.4g}); {len(self.overrides)} linears differ from the mix"
        )


def plan_gguf_types(
    entries: dict[str, dict], mix: str, mix_types: dict[str, str], candidates: list[str] | None = None
) -> TypePlan:
    """Each linear's llama.cpp type from its recorded sensitivities (``quant.sensitivity_types``) that minimises
    Σ s_i(t_i) subject to Σ bytes_i(t_i) ≤ Σ bytes_i(mix_i): the multiple-choice knapsack of
    :func:`workers.mixed.choose_bits_by_cost` over the exact GGUF bytes of every linear (:func:`gguf_bytes`), with
    llama.cpp's own ``mix_types`` as the budget, so the file is no larger than llama.cpp's (its other tensors, the
    embedding and the head, keep the mix's types). ``candidates`` defaults to the recorded types."""
    missing = [n for n in entries if n not in mix_types]
    if missing:
        raise ValueError(f"llama.cpp's {mix} gives no type to {missing[0]}")
    names = sorted(entries)
    all_types = sorted({t for n in names for t in _recorded_types(entries[n])} | set(mix_types.values()))
    index = {t: i for i, t in enumerate(all_types)}
    errors: dict[str, dict[int, float]] = {}
    costs: dict[str, dict[int, int]] = {}
    budget = 0
    for n in names:
        rows, cols = entries[n]["shape"]
        recorded = _recorded_types(entries[n])
        offered = {t: s for t, s in recorded.items() if candidates is None or t in candidates}
        if not recorded:
            raise ValueError(f"{n}: no sensitivity recorded on a llama.cpp type (probe with quant.sensitivity_types)")
        if not offered:
            raise ValueError(f"{n}: none of the candidates {candidates} holds its rows (recorded: {sorted(recorded)})")
        errors[n] = {index[t]: s for t, s in offered.items()}
        costs[n] = {index[t]: gguf_bytes(t, rows, cols) for t in offered}
        budget += gguf_bytes(mix_types[n], rows, cols)
    try:
        choice = choose_bits_by_cost(errors, costs, budget, max_states=400_000)
    except ValueError:
        raise ValueError(f"no choice of the recorded types fits llama.cpp's {mix} ({budget:,} bytes)") from None
    types = {n: all_types[i] for n, i in choice.items()}
    mix_s = sum(_recorded_types(entries[n]).get(mix_types[n], float("nan")) for n in names)
    return TypePlan(
        mix=mix,
        types=types,
        mix_types={n: mix_types[n] for n in names},
        budget_bytes=budget,
        stored_bytes=sum(costs[n][choice[n]] for n in names),
        sensitivity=sum(errors[n][choice[n]] for n in names),
        mix_sensitivity=mix_s,
    )


def _recorded_types(entry: dict) -> dict[str, float]:
    """{llama.cpp type: sensitivity} of a record entry (its widths' keys are digits)."""
    return {k: float(v) for k, v in (entry.get("sensitivity") or {}).items() if not k.isdigit()}


def write_gguf_mix_config(config: dict, plan: TypePlan, dest: Path, *, run_id: str, name: str | None = None) -> Path:
    """The probe's config solving ``plan``: ``output.gguf_type`` the mix, ``output.gguf_types`` the linears that
    differ from it, method gptq, no probe; from the probe's kept statistics (``calibration.statistics``) when it
    kept them, so the run costs solves, not a forward. Written as YAML to ``dest`` (through a temporary name)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    data["quant"] = {**data["quant"], "method": "gptq", "sensitivity_bits": [], "sensitivity_types": []}
    formats = list(data.get("output", {}).get("formats") or [])
    data["output"] = {
        **data.get("output", {}),
        "formats": formats if "gguf" in formats else [*formats, "gguf"],
        "gguf_type": plan.mix,
        "gguf_types": plan.overrides,
    }
    kept = bool(data.get("run", {}).get("keep_statistics"))
    data["run"] = {**data.get("run", {}), "run_id": None, "keep_statistics": False}
    if kept:
        data["calibration"] = {**data["calibration"], "statistics": run_id}
    data["name"] = name or f"{data.get('name', 'job')}-{plan.mix}-own".replace("_", "-").lower()
    return _write_config(data, dest, f"strata plan --gguf-mix {plan.mix}: {plan.summary()}")


def plan_own_mix(
    store, run_id: str, mix: str, dest: Path, *, candidates: list[str] | None = None, name: str | None = None
) -> tuple[TypePlan, Path]:
    """``strata plan RUN --gguf-mix MIX``: the probe run's sensitivities, llama.cpp's own types of ``mix`` on the
    checkpoint (its quantize dry run, :func:`pipeline.formats.gguf_mix.linear_types`) as the budget,
    :func:`plan_gguf_types`, and the config :func:`write_gguf_mix_config` writes to ``dest``."""
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.formats.gguf_mix import linear_types
    from strata_quant.pipeline.formats.gguf_solved import SOLVED_MIXES

    if mix.upper() not in SOLVED_MIXES:
        raise ValueError(f"--gguf-mix {mix}: one of {', '.join(SOLVED_MIXES)}")
    mix = mix.upper()
    config, entries = probe_entries(store, run_id)
    mix_types = linear_types(open_checkpoint(config["model"]), mix, sorted(entries))
    plan = plan_gguf_types(entries, mix, mix_types, candidates)
    return plan, write_gguf_mix_config(config, plan, dest, run_id=run_id, name=name)
