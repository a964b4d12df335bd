"""The report a release engineer publishes: HTML, model-card markdown and PNG plots.

``build_report`` turns one job's report dict (pipeline.job.run_full_job) and its block
records (runs/<id>/blocks/<b>/record.json) into a folder holding

* ``report.html``  one self-contained file (inline CSS, plots embedded as base64 PNG),
* ``report.md``    markdown for a model card, with the plots linked relatively,
* ``block_error.png``  output / weight relative error per linear type across blocks,
* ``ppl_vs_bits.png``  held-out perplexity against bits per weight for every evaluated model,
* ``block_time.png``   wall time per block, stacked by worker phase (max over ranks),
* ``expert_tokens.png``  MoE: routed calibration tokens per expert and block, the quant.moe decisions marked.

``compare_reports`` puts several runs in one table and one perplexity-vs-bits plot.

Bits per weight (bpw) is the artifact's file size × 8 / the checkpoint's parameter count
when the report carries ``params`` ("file"; a baseline on the run's grid shares the
artifact's size, the reference is its dtype's width); otherwise the nominal bits + 16 /
group size of one fp16 scale per group ("nominal", starred in the tables), so file-level
and nominal numbers are never mixed silently.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import struct
from pathlib import Path

# Okabe-Ito (yellow swapped for wine, readable on white): distinguishable with the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#882255", "#000000"]
LINEAR_ORDER = ["q", "k", "v", "o", "gate", "up", "down"]
PHASE_ORDER = ["load", "stats", "reduce", "solve", "broadcast", "forward"]
PHASE_COLORS = {
    "load": "#999999",
    "stats": "#56B4E9",
    "reduce": "#E69F00",
    "solve": "#0072B2",
    "broadcast": "#CC79A7",
    "forward": "#009E73",
}
REFERENCE_RE = re.compile(r"\b(fp|bf)(16|32)\b", re.IGNORECASE)
GRID_RE = re.compile(r"\bW(\d+)\s*g(\d+)\b", re.IGNORECASE)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- data


def method_label(quant: dict, solved_mix: str | None = None) -> str:
    """The label of a run's method, e.g. ``strata NF4+DQ b64``, ``strata FP8 E4M3 channel`` or, for llama.cpp's
    mix solved in the run (each linear on its own type's grid), ``strata GPTQ Q4_K_M``."""
    method = quant["method"]
    if solved_mix:
        return f"strata {method.upper()} {solved_mix}"
    if method in ("nf4", "gptq_nf4"):
        name = "GPTQ-NF4" if method == "gptq_nf4" else "NF4"
        return f"strata {name}{'+DQ' if quant.get('double_quant', True) else ''} b{quant.get('nf4_blocksize', 64)}"
    if method == "fp8":
        block = quant.get("fp8_block")
        how = "channel" if not block else f"block {block[0]}x{block[1]}"
        return f"strata FP8 {str(quant.get('fp8_type', 'e4m3')).upper()} {how}"
    return f"strata {method.upper()} W{quant['bits']} g{quant['group_size']}"


def linear_type(name: str) -> str:
    """model.layers.3.self_attn.q_proj → q; ...mlp.down_proj → down."""
    last = name.rsplit(".", 1)[-1]
    return last[: -len("_proj")] if last.endswith("_proj") else last


def count_params(model_path: str | Path, weight_map: dict[str, str] | None = None) -> int:
    """Parameters stored in a safetensors checkpoint, read from the file headers only
    (``weight_map``: tensor name → file, as CheckpointReader has it; default every
    *.safetensors file in the folder)."""
    model_path = Path(model_path)
    files = (
        sorted(set(weight_map.values())) if weight_map else [p.name for p in sorted(model_path.glob("*.safetensors"))]
    )
    total = 0
    for file in files:
        with open(model_path / file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__" and (weight_map is None or weight_map.get(name) == file):
                total += math.prod(info["shape"])
    return total


def read_records(store, run_id: str) -> dict[int, dict]:
    """Every block record of a run, without re-hashing the result objects (the report
    only reads the numbers; `strata verify` is the check)."""
    prefix = f"runs/{run_id}/blocks/"
    records = {}
    for key in store.list(prefix):
        if key.endswith("/record.json"):
            record = store.get_json(key)
            records[int(record.get("block", key[len(prefix) :].split("/")[0]))] = record
    return records


def expert_tokens(records: dict[int, dict]) -> dict[str, dict[int, tuple[int, str]]]:
    """Each MoE module's experts as the block records hold them (entries with ``expert``): module (full name,
    ``model.layers.3.mlp``) → {expert: (routed calibration tokens, decision)}, modules in block order."""
    out: dict[str, dict[int, tuple[int, str]]] = {}
    for b in sorted(records):
        for e in records[b]["results"]:
            info = e.get("expert")
            if info:
                module = e["name"].split(".experts.")[0]
                out.setdefault(module, {})[int(info["index"])] = (int(info["tokens"]), str(info["decision"]))
    return out


def expert_summary(records: dict[int, dict]) -> dict | None:
    """For the report and the model card: experts per MoE module, routed tokens per expert (min, median,
    max over every expert of the model) and how many experts each decision took; None without experts."""
    by_module = expert_tokens(records)
    if not by_module:
        return None
    tokens = sorted(n for experts in by_module.values() for n, _ in experts.values())
    decisions: dict[str, int] = {}
    for experts in by_module.values():
        for _, d in experts.values():
            decisions[d] = decisions.get(d, 0) + 1
    return {
        "modules": len(by_module),
        "experts_per_module": max(len(experts) for experts in by_module.values()),
        "tokens_min": tokens[0],
        "tokens_median": tokens[len(tokens) // 2],
        "tokens_max": tokens[-1],
        "decisions": dict(sorted(decisions.items())),
    }


def expert_summary_line(summary: dict) -> str:
    """One line of :func:`expert_summary`: what the card and the report say about the experts."""
    low = ", ".join(f"{n} {d}" for d, n in summary["decisions"].items() if d != "routed") or "none"
    return (
        f"{summary['experts_per_module']} experts in each of {summary['modules']} MoE blocks; routed calibration "
        f"tokens per expert min {summary['tokens_min']}, median {summary['tokens_median']}, max "
        f"{summary['tokens_max']}; below quant.moe.min_tokens: {low}"
    )


def solver_notes(results: list[dict]) -> dict:
    """What GPTQ's solves did beyond the configured damping, over some record entries: how many
    linears needed more damping (and the largest factor over the configured value), and the
    dead inputs (H[k, k] = 0, their weights zeroed) in how many linears."""
    gptq = [e for e in results if "damp_used" in e]
    raised = [e for e in gptq if e["damp_used"] > e["damp"] * (1 + 1e-9)]
    dead = [e for e in gptq if e.get("dead_inputs")]
    return {
        "gptq_linears": len(gptq),
        "damp_raised_linears": len(raised),
        "damp_max_factor": max((e["damp_used"] / e["damp"] for e in raised), default=1.0),
        "dead_input_linears": len(dead),
        "dead_inputs": sum(e["dead_inputs"] for e in dead),
    }


def load_report(path: str | Path, store=None) -> dict:
    """A job's report JSON, with ``model`` and ``params`` filled in from the run record and
    the cached checkpoint when the report predates them (best effort: left out if the
    run or the model cannot be found). ``store``: a store object; default the report's."""
    report = json.loads(Path(path).read_text())
    if report.get("kind") == "strata-eval":
        return eval_to_report(report)
    if report.get("model") and report.get("params"):
        return report
    try:
        if store is None:
            from strata_quant.pipeline.store import open_store

            store = open_store(report["store"])
        model = store.get_json(f"runs/{report['run_id']}/run.json")["config"]["model"]
        report.setdefault("model", model)
        path = cached_model_path(model)
        if not report.get("params") and path is not None:
            report["params"] = count_params(path)
    except Exception:  # optional enrichment; the report stands without it
        pass
    return report


def eval_to_report(data: dict) -> dict:
    """A `strata eval` results JSON (pipeline.eval, schema 1) in the shape of a job report,
    so report tables and `strata compare` take it; rows carry their own size, memory and
    speed."""
    qe = data.get("quant_error") or {}
    w = data.get("windows") or {}
    rows = {}
    for m in data.get("models") or []:
        rows[m["name"]] = {**m, "bytes": m.get("bytes_on_disk"), "ours": not m.get("reference")}
    off = data.get("off_domain")
    if off:  # the same models on the second text: size and kind from the first, quality its own
        ow = off.get("windows") or {}
        off = {
            "text": (off.get("text") or {}).get("source", "?"),
            "windows": [ow.get("count"), ow.get("context")],
            "stride": ow.get("stride"),
            "rows": {m["name"]: {**rows.get(m["name"], {}), **m} for m in off.get("models") or []},
        }
    return {
        "run_id": qe.get("run_id") or f"eval {str(w.get('token_ids_sha256', ''))[:8]}",
        "model": (data.get("reference") or {}).get("path"),
        "params": data.get("params"),
        "method": "eval",
        "quant": {},
        "artifacts": {},
        "checks": [],
        "quality": {
            "text": (data.get("text") or {}).get("source", "?"),
            "windows": [w.get("count"), w.get("context")],
            "stride": w.get("stride"),
            "rows": rows,
            **({"off_domain": off} if off else {}),
        },
        "machine": data.get("machine"),
        "timings": {},
        "eval": True,
    }


def cached_model_path(model: str) -> Path | None:
    """The checkpoint folder of a model reference if it is already on disk; never fetches
    (a report must not start a download)."""
    if model.startswith("fixture:"):
        from strata_quant.pipeline import fixtures

        folder = {"smollm2-135m": "smollm2-135m-instruct", "tiny-llama": "tiny-llama"}.get(model[len("fixture:") :])
        path = fixtures.cache_dir() / "models" / folder if folder else None
    else:
        path = Path(model)
    return path if path is not None and (path / "config.json").is_file() else None


def row_artifact(name: str, report: dict) -> str | None:
    """Which artifact (format key) a quality row was measured on, if any."""
    artifacts = report.get("artifacts") or {}
    if "GGUF" in name and "gguf" in artifacts:
        return "gguf"
    if name.lower().startswith("strata"):
        for fmt in ("gptq", "gguf"):
            if fmt in artifacts:
                return fmt
    return None


def row_bits(name: str, row: dict, report: dict) -> tuple[float | None, str, int | None]:
    """(bits per weight, how it was obtained, size in bytes) for one quality row.

    A row measured on an artifact gets the artifact's size; a baseline on the same grid
    as the run (e.g. RTN W4 g64 next to GPTQ W4 g64) would be stored in exactly as many
    bytes, so it shares that size. Without a parameter count: bits + 16 / group size.
    """
    params = report.get("params")
    if row.get("bits_per_weight"):
        return float(row["bits_per_weight"]), "row", row.get("bytes")
    ref = REFERENCE_RE.search(name)
    if ref:
        bits = float(ref.group(2))
        return bits, "dtype", int(params * bits / 8) if params else None
    q = report.get("quant") or {}
    m = GRID_RE.search(name)
    grid = (int(m.group(1)), int(m.group(2))) if m else None
    fmt = row_artifact(name, report)
    if fmt is None and grid == (q.get("bits"), q.get("group_size")):
        ours = [row_artifact(n, report) for n in (report.get("quality") or {}).get("rows", {})]
        fmt = next((f for f in ours if f), None)
    size = report["artifacts"][fmt]["bytes"] if fmt else None
    if size and params:
        return size * 8 / params, "file", size
    if grid is None and fmt:
        grid = (q.get("bits"), q.get("group_size"))
    if grid is None or not grid[1]:
        return None, "", size
    return grid[0] + 16 / grid[1], "nominal", size


def quality_rows(report: dict) -> list[dict]:
    """The evaluated models of one report, flattened with bpw, size and time."""
    quality = report.get("quality") or {}
    out = []
    for name, row in (quality.get("rows") or {}).items():
        bpw, source, size = row_bits(name, row, report)
        fmt = row_artifact(name, report)
        memory, speed = row.get("memory") or {}, row.get("speed") or {}
        out.append(
            {
                "name": name,
                "run_id": report.get("run_id", ""),
                "ppl": row["ppl"],
                "ppl_increase": row.get("ppl_increase", 0.0),
                "kld": row.get("kld", 0.0),
                "kld_p99": row.get("kld_p99", 0.0),
                "top1": row.get("top1", 1.0),
                "tokens": row.get("tokens"),
                "bpw": bpw,
                "bpw_source": source,
                "bytes": size,
                "quantize_s": (report.get("timings") or {}).get("quantize_s") if fmt else None,
                "reference": bool(row.get("reference", REFERENCE_RE.search(name))),
                "ours": bool(row.get("ours", fmt is not None)),
                "memory_bytes": memory.get("param_bytes"),
                "rss_delta_bytes": memory.get("rss_delta_bytes"),
                "prefill_tps": speed.get("prefill_tokens_per_s"),
                "decode_tps": speed.get("decode_tokens_per_s"),
            }
        )
    return out


# ---------------------------------------------------------------------------- formatting


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def fmt_ppl(p: float) -> str:
    return f"{p:,.2f}" if p >= 1000 else f"{p:.3f}"


def fmt_bpw(row: dict) -> str:
    if row["bpw"] is None:
        return "—"
    return f"{row['bpw']:.2f}" + ("*" if row["bpw_source"] == "nominal" else "")


TABLE_HEAD = ["Model", "bpw", "Size", "PPL", "Δ PPL", "KLD", "KLD p99", "Top-1", "Quantize time"]


def fmt_rate(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


# optional columns, shown when any row has the value (`strata eval` results carry them)
EXTRA_COLUMNS = (
    ("In memory", "memory_bytes", fmt_bytes),
    ("RSS Δ at load", "rss_delta_bytes", fmt_bytes),
    ("Prefill tok/s", "prefill_tps", fmt_rate),
    ("Decode tok/s", "decode_tps", fmt_rate),
)


def extra_columns(rows: list[dict]) -> list[tuple[str, str, object]]:
    return [c for c in EXTRA_COLUMNS if any(r.get(c[1]) is not None for r in rows)]


def table_head(rows: list[dict], head: list[str] = TABLE_HEAD) -> list[str]:
    return head + [c[0] for c in extra_columns(rows)]


def extra_cells(row: dict, columns) -> list[str]:
    return [fmt(row.get(key)) for _, key, fmt in columns]


def table_cells(row: dict) -> list[str]:
    if row["reference"]:
        delta, kld, p99, top1 = "—", "—", "—", "—"
    else:
        delta = f"{row['ppl_increase']:+.2%}"
        kld, p99, top1 = f"{row['kld']:.4f}", f"{row['kld_p99']:.4f}", f"{row['top1']:.1%}"
    return [
        row["name"],
        fmt_bpw(row),
        fmt_bytes(row["bytes"]),
        fmt_ppl(row["ppl"]),
        delta,
        kld,
        p99,
        top1,
        fmt_seconds(row["quantize_s"]),
    ]


def config_items(report: dict) -> list[tuple[str, str]]:
    q = report.get("quant") or {}
    items = [("Run", report.get("run_id", "?"))]
    if report.get("model"):
        items.append(("Model", str(report["model"])))
    if report.get("params"):
        items.append(("Parameters", f"{report['params'] / 1e6:,.1f} M"))
    items.append(
        (
            "Method",
            f"{str(report.get('method', q.get('method', '?'))).upper()} W{q.get('bits', '?')} "
            f"group {q.get('group_size', '?')} {'symmetric' if q.get('sym', True) else 'asymmetric'}",
        )
    )
    solver = [
        f"{k} {q[k]}"
        for k in (
            "damp",
            "block_size",
            "act_order",
            "static_groups",
            "mse_grid",
            "mse_weight",
            "diag_shrink",
            "refine_passes",
        )
        if k in q
    ]
    if solver:
        items.append(("Solver", ", ".join(solver)))
    cal = report.get("calibration") or {}
    if "prefix_tokens" in cal:
        tokens = cal["prefix_tokens"]
        start = f"each starting with {' '.join(tokens)}" if tokens else "text only, no BOS"
        windows = f"{cal.get('num_samples', '?')} windows × {cal.get('seq_len', '?')} tokens"
        items.append(("Calibration", f"{cal.get('source', '?')}, {windows}, {start} (bos: {cal.get('bos', 'auto')})"))
    if cal.get("statistics"):
        items.append(
            ("Statistics", f"kept by run {cal['statistics']} (solved from its Hessians, no calibration forward)")
        )
    notes = report.get("solver_notes")
    if notes and notes.get("gptq_linears"):
        items.append(("Damping and dead inputs", solver_notes_line(notes)))
    if report.get("experts"):
        items.append(("Experts", expert_summary_line(report["experts"])))
    if "workers" in report:
        items.append(
            (
                "Workers",
                f"{report['workers']} ({report.get('solved_blocks', '?')} blocks solved, "
                f"{report.get('replayed_blocks', 0)} replayed)",
            )
        )
    quality = report.get("quality")
    if quality:
        w = quality.get("windows") or ["?", "?"]
        stride = f", stride {quality['stride']}" if quality.get("stride") not in (None, w[1]) else ""
        texts = quality.get("text", "?")
        if quality.get("off_domain"):
            texts = f"{texts} (in domain) and {quality['off_domain'].get('text', '?')} (off domain)"
        items.append(("Evaluation", f"{texts}, {w[0]} windows × {w[1]} tokens{stride}"))
    machine = report.get("machine")
    if machine:
        items.append(
            (
                "Machine",
                f"{machine.get('cpu_model', '?')}, nproc {machine.get('nproc', '?')}, "
                f"{machine.get('threads', '?')} threads",
            )
        )
    t = report.get("timings") or {}
    if t:
        items.append(("Wall time", ", ".join(f"{k.removesuffix('_s')} {fmt_seconds(v)}" for k, v in t.items())))
    return items


def solver_notes_line(notes: dict) -> str:
    """One line on what GPTQ's solves changed beyond the configuration (:func:`solver_notes`)."""
    n = notes["gptq_linears"]
    if notes["damp_raised_linears"]:
        damp = (
            f"damping raised in {notes['damp_raised_linears']} of {n} GPTQ linears "
            f"(up to {notes['damp_max_factor']:.3g}× quant.damp, for a Hessian that was not positive definite)"
        )
    else:
        damp = f"quant.damp sufficed in all {n} GPTQ linears"
    if notes["dead_inputs"]:
        dead = (
            f"{notes['dead_inputs']} dead input(s) (never active in the calibration data; their weights zeroed) "
            f"in {notes['dead_input_linears']} linear(s)"
        )
    else:
        dead = "no dead inputs"
    return f"{damp}; {dead}"


def check_lines(report: dict) -> list[str]:
    lines = []
    for c in report.get("checks") or []:
        total = c.get("quantized_linears")
        exact = c.get("bit_exact_linears", "?")
        line = f"{c.get('format', '?')}: {exact}" + (f"/{total}" if total is not None else "")
        line += " quantized linears bit-exact against the run record"
        if c.get("reader"):
            line += f" (read back with {c['reader']})"
        if c.get("other_tensors") is not None:
            line += f"; {c['other_tensors']} other tensors checked"
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "legend.frameon": False,
        }
    )
    return plt


def errors_by_type(records: dict[int, dict]) -> dict[str, dict[str, dict[int, float]]]:
    """linear type (q, k, ..., down) → {"output_rel_error"|"weight_rel_error": {block: value}},
    the types in the order of a decoder block."""
    by_type: dict[str, dict[str, dict[int, float]]] = {}
    for b in sorted(records):
        for e in records[b]["results"]:
            t = by_type.setdefault(linear_type(e["name"]), {"output_rel_error": {}, "weight_rel_error": {}})
            for key in t:
                if e.get(key) is not None:
                    t[key][b] = e[key]
    order = [t for t in LINEAR_ORDER if t in by_type] + sorted(set(by_type) - set(LINEAR_ORDER))
    return {t: by_type[t] for t in order}


def plot_block_error(records: dict[int, dict], path: Path) -> Path:
    plt = _pyplot()
    blocks = sorted(records)
    by_type = errors_by_type(records)
    types = list(by_type)
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for ax, key, title in (
        (axes[0], "output_rel_error", "Output relative error  ‖(W − Ŵ)X‖² / ‖WX‖²"),
        (axes[1], "weight_rel_error", "Weight relative error  ‖W − Ŵ‖² / ‖W‖²"),
    ):
        values = []
        for i, t in enumerate(types):
            pts = sorted(by_type[t][key].items())
            if not pts:
                continue
            xs, ys = zip(*pts)
            values.extend(ys)
            ax.plot(
                xs,
                ys,
                color=PALETTE[i % len(PALETTE)],
                marker="o",
                markersize=3.5 if len(blocks) > 12 else 5,
                linewidth=1.5,
                linestyle="-" if t in ("q", "k", "v", "o") else "--",
                label=f"{t}_proj" if t in LINEAR_ORDER else t,
            )
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        ax.set_title(title, loc="left")
        ax.set_ylabel("relative error")
    axes[1].set_xlabel("block (decoder layer)")
    if blocks:
        step = max(1, math.ceil(len(blocks) / 16))
        axes[1].set_xticks(blocks[::step])
    axes[0].legend(ncol=len(types), loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=9, handlelength=2.2)
    fig.align_ylabels(axes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_expert_tokens(records: dict[int, dict], path: Path) -> Path:
    """Routed calibration tokens per expert (columns) and MoE block (rows); an expert that took the
    quant.moe policy's decision is marked (R: rounded, A: statistics from all tokens)."""
    plt = _pyplot()
    by_module = expert_tokens(records)
    modules = list(by_module)
    n_exp = max(len(e) for e in by_module.values())
    grid = [[by_module[m].get(e, (0, "routed"))[0] for e in range(n_exp)] for m in modules]
    fig, ax = plt.subplots(figsize=(min(12, max(6, 2 + 0.35 * n_exp)), min(10, max(2.5, 1.5 + 0.3 * len(modules)))))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="routed tokens")
    marks = {"rtn": "R", "all_tokens": "A"}
    for i, m in enumerate(modules):
        for e, (_, decision) in by_module[m].items():
            if decision in marks:
                ax.text(e, i, marks[decision], ha="center", va="center", color="white", fontsize=8, weight="bold")
    ax.grid(False)
    ax.set_xticks(range(0, n_exp, max(1, math.ceil(n_exp / 32))))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE block")
    step = max(1, math.ceil(len(modules) / 16))
    ax.set_yticks(range(0, len(modules), step), [m.split(".")[-2] for m in modules[::step]])
    ax.set_title("Routed tokens per expert (R: rounded, A: all tokens)", loc="left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def block_phase_times(records: dict[int, dict]) -> tuple[list[int], dict[str, list[float]]]:
    """(blocks, phase → seconds per block): each phase's time is the slowest rank's, since
    the ranks wait for each other at the end of every phase."""
    blocks = sorted(records)
    seen: set[str] = set()
    for b in blocks:
        for ranked in (records[b].get("timings") or {}).values():
            seen.update(ranked)
    phases = [p for p in PHASE_ORDER if p in seen] + sorted(seen - set(PHASE_ORDER))
    per_phase = {
        p: [max((r.get(p, 0.0) for r in (records[b].get("timings") or {}).values()), default=0.0) for b in blocks]
        for p in phases
    }
    return blocks, per_phase


def plot_block_time(records: dict[int, dict], path: Path) -> Path:
    plt = _pyplot()
    blocks, per_phase = block_phase_times(records)
    phases = list(per_phase)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bottom = [0.0] * len(blocks)
    width = 0.8
    for i, p in enumerate(phases):
        ax.bar(
            blocks,
            per_phase[p],
            width,
            bottom=bottom,
            color=PHASE_COLORS.get(p, PALETTE[i % len(PALETTE)]),
            label=p,
            edgecolor="white",
            linewidth=0.4 if len(blocks) < 40 else 0,
        )
        bottom = [a + v for a, v in zip(bottom, per_phase[p])]
    walls = [records[b].get("wall_s") for b in blocks]
    if any(w is not None for w in walls):
        ax.plot(
            [b for b, w in zip(blocks, walls) if w is not None],
            [w for w in walls if w is not None],
            color="black",
            marker="_",
            markersize=14 if len(blocks) <= 40 else 6,
            markeredgewidth=2,
            linestyle="none",
            label="block wall time (driver)",
        )
    ax.set_title("Time per block, stacked by phase (slowest worker per phase)", loc="left")
    ax.set_xlabel("block (decoder layer)")
    ax.set_ylabel("seconds")
    ax.grid(axis="x", visible=False)
    if blocks:
        step = max(1, math.ceil(len(blocks) / 16))
        ax.set_xticks(blocks[::step])
        ax.set_xlim(blocks[0] - 0.7, blocks[-1] + 0.7)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] not in phases)  # phases, then the wall time
    ax.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        ncol=4,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


MARKERS = ["o", "s", "D", "^", "v", "P", "X", "*"]


def plot_ppl_vs_bits(rows: list[dict], path: Path, title: str = "Held-out perplexity vs bits per weight") -> Path:
    """One point per evaluated model; the reference also as a horizontal line."""
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 4.6))
    plotted = [r for r in rows if r["bpw"] is not None]
    refs = [r for r in plotted if r["reference"]]
    seen_ref = set()
    for r in refs:
        key = round(r["ppl"], 6)
        if key in seen_ref:
            continue
        seen_ref.add(key)
        ax.axhline(r["ppl"], color="#777777", linestyle=":", linewidth=1, zorder=1)
    for i, r in enumerate(plotted):
        label = r["name"] + (f"  [{r['run_id']}]" if r.get("show_run") else "")
        label += f"  ({r['bpw']:.2f} bpw{', nominal' if r['bpw_source'] == 'nominal' else ''})"
        ax.scatter(
            r["bpw"],
            r["ppl"],
            s=150 if r["reference"] else 70 if r["ours"] else 50,
            marker="*" if r["reference"] else MARKERS[i % len(MARKERS)],
            color="#444444" if r["reference"] else PALETTE[i % len(PALETTE)],
            edgecolor="black" if r["ours"] else "none",
            linewidth=0.8,
            zorder=3,
            label=label,
        )
    ax.set_xscale("log", base=2)
    xs = [r["bpw"] for r in plotted] or [4, 16]
    lo, hi = min(xs), max(xs)
    ticks = _ticks({round(x, 2) for x in xs}, [t for t in (2, 3, 4, 5, 6, 8, 12, 16, 32) if lo / 1.3 <= t <= hi * 1.3])
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlim(lo / 1.15, hi * 1.15)
    fmt = ScalarFormatter(useOffset=False)
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    ppls = [r["ppl"] for r in plotted]
    if ppls:
        span = max(ppls) - min(ppls) or abs(max(ppls)) * 0.01 or 1.0
        ax.set_ylim(min(ppls) - 0.15 * span, max(ppls) + 0.15 * span)
    ax.set_xlabel("bits per weight (log scale)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, loc="left")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _ticks(data: set[float], round_ticks: list[float], min_ratio: float = 1.08) -> list[float]:
    """The data's own x values, then the round values not so close on a log axis to a
    tick already placed that their labels would overlap."""
    out = sorted(_spread(sorted(data), min_ratio))
    for t in round_ticks:
        if all(max(t, o) / min(t, o) >= min_ratio for o in out):
            out.append(t)
    return sorted(out)


def _spread(values: list[float], min_ratio: float) -> list[float]:
    out: list[float] = []
    for v in values:
        if not out or v / out[-1] >= min_ratio:
            out.append(v)
    return out


# ---------------------------------------------------------------------------- documents

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --head:#f6f8fa; --ours:#fff8e6; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       max-width: 980px; margin: 32px auto; padding: 0 20px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 20px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 6px 10px; text-align: right; white-space: nowrap; }
th { background: var(--head); font-weight: 600; }
td.l, th.l { text-align: left; white-space: normal; }
tr.ours td { background: var(--ours); font-weight: 600; }
dl.cfg { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 0; }
dl.cfg dt { color: var(--muted); }
dl.cfg dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13.5px; }
ul { padding-left: 22px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px;
       background: var(--head); padding: 1px 5px; border-radius: 4px; }
li.ok::marker { content: "✓  "; color: #1a7f37; }
figure { margin: 18px 0; }
figure img { width: 100%; max-width: 900px; display: block; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
.note { color: var(--muted); font-size: 13px; }
"""

FIGURES = (
    ("ppl_vs_bits", "Held-out perplexity against bits per weight for every evaluated model."),
    ("block_error", "Relative error of each linear type across the decoder blocks (output error on calibration data)."),
    ("block_time", "Wall time per block by worker phase; each bar segment is the slowest worker in that phase."),
    ("expert_tokens", "Calibration tokens the model's router sends each expert, per MoE block."),
)


def _md_table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A markdown table; the first ``left`` columns are text (left-aligned), the rest numbers."""
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] * left + ["---:"] * (len(head) - left)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return lines


def _html_table(head: list[str], rows: list[list[str]], ours: list[bool], left: int = 1) -> str:
    def cls(i: int) -> str:
        return ' class="l"' if i < left else ""

    out = ["<table>", "<thead><tr>" + "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(head))]
    out += ["</tr></thead>", "<tbody>"]
    for cells, mine in zip(rows, ours):
        tr = ' class="ours"' if mine else ""
        out.append(f"<tr{tr}>" + "".join(f"<td{cls(i)}>{html.escape(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


BPW_NOTE = (
    "bpw: file size × 8 / parameter count (embeddings, norms and format metadata included), "
    "from the artifact; a baseline on the same grid shares its artifact's size. "
    "* marks a nominal value (bits + 16 / group size: one fp16 scale per group, quantized linears only)."
)


def build_report(report: dict, records: dict[int, dict], out_dir: Path) -> dict[str, Path]:
    """Write report.html, report.md and the PNG plots for one run into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    rows = quality_rows(report)
    if rows:
        files["ppl_vs_bits"] = plot_ppl_vs_bits(rows, out_dir / "ppl_vs_bits.png")
    if records:
        files["block_error"] = plot_block_error(records, out_dir / "block_error.png")
        if any(r.get("timings") for r in records.values()):
            files["block_time"] = plot_block_time(records, out_dir / "block_time.png")
        if expert_tokens(records):
            files["expert_tokens"] = plot_expert_tokens(records, out_dir / "expert_tokens.png")

    q = report.get("quant") or {}
    title = method_label(
        {"method": report.get("method", "?"), "bits": "?", "group_size": "?", **q}, report.get("solved_mix")
    )
    if report.get("model"):
        title += f" — {report['model']}"
    extras = extra_columns(rows)
    cells = [table_cells(r) + extra_cells(r, extras) for r in rows]
    off = (report.get("quality") or {}).get("off_domain")
    off_rows = quality_rows({**report, "quality": off}) if off else []
    off_cells = [table_cells(r) + extra_cells(r, extra_columns(off_rows)) for r in off_rows]
    cfg = config_items(report)
    checks = check_lines(report)
    artifacts = report.get("artifacts") or {}
    figures = [(k, cap) for k, cap in FIGURES if k in files]

    # markdown
    md = [f"# {title}", ""]
    md += [f"- **{k}:** {v}" for k, v in cfg]
    if rows:
        quality = report["quality"]
        md += ["", "## Quality", ""]
        md += [
            f"Held-out text `{quality.get('text', '?')}`; every model scored on the same token windows, "
            "KLD and top-1 agreement against the reference.",
            "",
        ]
        md += _md_table(table_head(rows), cells)
        if off_rows:
            md += ["", f"Off domain (unlike the calibration): held-out text `{off.get('text', '?')}`, same models.", ""]
            md += _md_table(table_head(off_rows), off_cells)
        md += ["", f"<sub>{BPW_NOTE}</sub>"]
    if artifacts:
        md += ["", "## Artifacts", ""]
        md += [f"- **{fmt}** `{Path(a['path']).name}` — {fmt_bytes(a.get('bytes'))}" for fmt, a in artifacts.items()]
    if checks:
        md += ["", "## Verification", ""]
        md += [f"- {line}" for line in checks]
    if figures:
        md += ["", "## Plots", ""]
        for key, cap in figures:
            md += [f"![{cap}]({files[key].name})", "", f"*{cap}*", ""]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md).rstrip() + "\n")

    # html
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">strata run <code>{html.escape(str(report.get("run_id", "?")))}</code></p>',
        "<h2>Configuration</h2>",
        '<dl class="cfg">' + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in cfg) + "</dl>",
    ]
    if rows:
        parts += [
            "<h2>Quality</h2>",
            f"<p>In domain: held-out text <code>{html.escape(str(report['quality'].get('text', '?')))}</code></p>",
            _html_table(table_head(rows), cells, [r["ours"] for r in rows]),
        ]
        if off_rows:
            parts += [
                f"<p>Off domain (unlike the calibration): <code>{html.escape(str(off.get('text', '?')))}</code></p>",
                _html_table(table_head(off_rows), off_cells, [r["ours"] for r in off_rows]),
            ]
        parts.append(f'<p class="note">{html.escape(BPW_NOTE)}</p>')
    if artifacts:
        parts += ["<h2>Artifacts</h2>", "<ul>"]
        parts += [
            f"<li><b>{html.escape(fmt)}</b> <code>{html.escape(str(a['path']))}</code> — "
            f"{html.escape(fmt_bytes(a.get('bytes')))}</li>"
            for fmt, a in artifacts.items()
        ]
        parts.append("</ul>")
    if checks:
        parts += ["<h2>Verification</h2>", "<ul>"] + [f'<li class="ok">{html.escape(c)}</li>' for c in checks]
        parts.append("</ul>")
    if figures:
        parts.append("<h2>Plots</h2>")
        for key, cap in figures:
            parts.append(f"<figure>{_img_tag(files[key], cap)}<figcaption>{html.escape(cap)}</figcaption></figure>")
    parts.append("</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return {"html": html_path, "markdown": md_path, **files}


COMPARE_HEAD = ["Run", "Model", "bpw", "Size", "PPL", "Δ PPL", "KLD", "KLD p99", "Top-1", "Quantize time"]


def compare_reports(reports: list[dict], out_dir: Path) -> dict[str, Path]:
    """Several runs in one table (one row per evaluated model, the reference once per
    distinct value) and one perplexity-vs-bits plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    seen: set[tuple] = set()
    for rep in reports:
        for r in quality_rows(rep):
            key = (r["name"], round(r["ppl"], 6))
            if not r["ours"] and key in seen:
                continue  # the same reference / baseline measured again
            seen.add(key)
            r["show_run"] = r["ours"] and len(reports) > 1
            rows.append(r)
    cells = []
    extras = extra_columns(rows)
    for r in rows:
        ref = r["reference"]
        cells.append(
            [
                r["run_id"] if r["ours"] else "—",
                r["name"],
                fmt_bpw(r),
                fmt_bytes(r["bytes"]),
                fmt_ppl(r["ppl"]),
                "—" if ref else f"{r['ppl_increase']:+.2%}",
                "—" if ref else f"{r['kld']:.4f}",
                "—" if ref else f"{r['kld_p99']:.4f}",
                "—" if ref else f"{r['top1']:.1%}",
                fmt_seconds(r["quantize_s"]),
            ]
            + extra_cells(r, extras)
        )
    files: dict[str, Path] = {}
    if rows:
        files["ppl_vs_bits"] = plot_ppl_vs_bits(rows, out_dir / "ppl_vs_bits.png", "Perplexity vs bits per weight")
    texts = sorted({(rep.get("quality") or {}).get("text", "?") for rep in reports if rep.get("quality")})
    md = ["# strata comparison", "", f"{len(reports)} runs; held-out text: " + ", ".join(f"`{t}`" for t in texts), ""]
    md += _md_table(table_head(rows, COMPARE_HEAD), cells, left=2)
    md += ["", f"<sub>{BPW_NOTE}</sub>"]
    if "ppl_vs_bits" in files:
        md += ["", "![Perplexity vs bits per weight](ppl_vs_bits.png)"]
    md_path = out_dir / "compare.md"
    md_path.write_text("\n".join(md) + "\n")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>strata comparison</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>strata comparison</h1>",
        f'<p class="sub">{len(reports)} runs; held-out text: {html.escape(", ".join(texts))}</p>',
        _html_table(table_head(rows, COMPARE_HEAD), cells, [r["ours"] for r in rows], left=2),
        f'<p class="note">{html.escape(BPW_NOTE)}</p>',
    ]
    if "ppl_vs_bits" in files:
        parts.append(f"<figure>{_img_tag(files['ppl_vs_bits'], 'Perplexity vs bits per weight')}</figure>")
    parts.append("</body></html>")
    html_path = out_dir / "compare.html"
    html_path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return {"html": html_path, "markdown": md_path, **files}
