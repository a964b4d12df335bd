"""The whole job: quantize on Ray, assemble the artifacts, verify them, evaluate, report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from strata_quant.pipeline.assemble import (
    ResultSource,
    artifact_paths,
    assemble,
    format_for,
    options_of,
    parse_size,
    quantized_only,
    registered,
)
from strata_quant.pipeline.config import JobConfig
from strata_quant.pipeline.modelcard import write_model_cards
from strata_quant.pipeline.report import build_report, expert_summary, method_label, solver_notes, solver_notes_line
from strata_quant.pipeline.run import STRATA_VERSION, run_job
from strata_quant.pipeline.verify import QualityGateError, gate_message, gate_rows, verify_artifact
from strata_quant.workers.result import QuantSpec

log = logging.getLogger("strata.job")


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_full_job(cfg: JobConfig, progress: bool = True) -> dict:
    """Run, assemble, verify and evaluate; returns the report (also written as JSON)."""
    from strata_quant.pipeline.preflight import check_job

    t0 = time.perf_counter()
    paths = artifact_paths(cfg)
    pf = check_job(cfg)  # every refusal before hours of work, not after (as `strata check`)
    for note in pf.notes:
        log.warning("%s", note)
    outcome = run_job(cfg, progress=progress, prepared=(pf.reader, pf.token_ids, pf.tokenizer, pf.structure))
    timings = {"quantize_s": outcome.wall_s}
    # assembly, verification and eval hold a tensor or a block at a time, like a worker: they run in
    # a process of their own on this node (the artifacts land in output.dir here), so the driver's
    # memory stays the plan's whatever the model's size
    published = on_driver_node(publish, cfg, outcome, paths)
    checks, quality = published["checks"], published["quality"]
    timings.update(published["timings"])
    timings["total_s"] = time.perf_counter() - t0

    report = {
        "run_id": outcome.run_id,
        "store": str(getattr(outcome.store, "root", outcome.store)),
        "model": cfg.model,
        "params": outcome.reader.num_params(),
        "method": cfg.quant.method,
        "quant": cfg.quant.model_dump(),
        "solved_mix": solved_mix(cfg),
        "calibration": {**cfg.calibration.model_dump(), "prefix_tokens": outcome.calibration_prefix},
        "tool_version": STRATA_VERSION,
        "workers": cfg.run.workers,
        "artifacts": {fmt: {"path": str(p), "bytes": size_of(p)} for fmt, p in paths.items()},
        "checks": checks,
        "quality": quality,
        "timings": timings,
        "phase_s": outcome.phase_s,
        "solved_blocks": len(outcome.solved_blocks),
        "replayed_blocks": len(outcome.resumed_blocks),
        "solver_notes": solver_notes([e for r in outcome.records.values() for e in r["results"]]),
    }
    if (experts := expert_summary(outcome.records)) is not None:  # MoE: routed tokens and decisions per expert
        report["experts"] = experts
    if quality is not None and cfg.output.max_ppl_increase is not None:
        report["gate"] = gate_rows(quality["rows"], cfg.output.max_ppl_increase)
    report["model_cards"] = {k: str(p) for k, p in write_model_cards(report, outcome.reader.config).items()}
    report_path = Path(cfg.output.dir) / f"{cfg.name}-report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1))
    report["report_path"] = str(report_path)
    try:
        files = build_report(report, outcome.records, report_path.with_suffix(""))
        report["report_files"] = {kind: str(path) for kind, path in files.items()}
    except Exception:  # the artifacts and the JSON are written; `strata report` can redo this part
        log.exception("writing the HTML/markdown report failed; retry with `strata report %s`", report_path)
        report["report_files"] = {}
    if report.get("gate") and not report["gate"]["passed"]:
        raise QualityGateError(
            f"{gate_message(report['gate'])}; artifacts kept in {cfg.output.dir}, report {report_path}", report
        )
    return report


def publish(cfg: JobConfig, outcome, paths: dict[str, Path]) -> dict:
    """Assemble every artifact, verify each against the record, evaluate: {"checks", "quality", "timings"}."""
    import os

    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the workers are gone: the node's cores are free
    # linears kept in 16-bit (modules_to_not_convert / outliers) are published as the checkpoint's floats
    results = quantized_only(outcome.store, outcome.records)
    timings = {}
    t = time.perf_counter()
    for fmt, path in paths.items():
        log.info("assembling %s → %s", fmt, path)
        assemble_artifact(cfg, fmt, path, outcome.reader, results)
    timings["assemble_s"] = time.perf_counter() - t

    t = time.perf_counter()
    checks = []
    order = registered()  # artifacts are verified (and reported) in the registry's order
    for fmt in sorted(paths, key=lambda f: order.index(format_for(f, cfg.quant.method))):
        summary = verify_artifact(
            format_for(fmt, cfg.quant.method),
            paths[fmt],
            outcome.reader,
            results,
            llamacpp=llamacpp_available(),
            whole_model_limit=parse_size(cfg.output.whole_model_check_limit),
        )
        if "whole_model_checks" in summary:
            log.warning("GGUF whole-model checks %s", summary["whole_model_checks"])
        checks.append(summary)
    timings["verify_s"] = time.perf_counter() - t

    quality = None
    if cfg.eval is not None:
        t = time.perf_counter()
        quality = evaluate_job(cfg, outcome, results, paths.get("gguf"))
        timings["eval_s"] = time.perf_counter() - t
    return {"checks": checks, "quality": quality, "timings": timings}


def assemble_artifact(cfg: JobConfig, fmt: str, path: Path, reader, results: ResultSource) -> None:
    """The ``fmt`` artifact of this job's results, by the registry's format for its method."""
    assemble(fmt, reader, results, path, options_of(cfg, STRATA_VERSION), method=cfg.quant.method)


def on_driver_node(fn, *args):
    """``fn(*args)`` in a Ray task on the driver's node (a process of its own; files it writes land
    where the driver reads them); the task's own error is raised as it was raised."""
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(fn).options(num_cpus=1, max_retries=0, scheduling_strategy=here)
    try:
        return ray.get(task.remote(*args))
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def llamacpp_available() -> bool:
    """Whether llama-cpp-python is installed (then GGUF files are also checked in llama.cpp)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def evaluate_job(cfg: JobConfig, outcome, results: ResultSource, gguf_path: Path | None) -> dict:
    """fp16 reference, the RTN baseline on the same grid, and strata's result (the GGUF as gguf-py
    reads it when there is one, else the dequantized stored results), streamed block by block
    (pipeline.layerwise: nothing holds a whole model), on ``eval.text``; with ``eval.off_domain``
    the same models on that text too, under ``"off_domain"``."""
    quality = evaluate_text(cfg, outcome, results, gguf_path, cfg.eval.text)
    if cfg.eval.off_domain:
        quality["off_domain"] = evaluate_text(cfg, outcome, results, gguf_path, cfg.eval.off_domain)
    return quality


def evaluate_text(cfg: JobConfig, outcome, results: ResultSource, gguf_path: Path | None, text: str) -> dict:
    """The models of :func:`evaluate_job` on ``eval.windows`` windows of one text."""
    from transformers import AutoTokenizer

    from strata_quant.pipeline import layerwise
    from strata_quant.pipeline.eval import evaluate, prompted_windows

    model_path = outcome.reader.path  # the model folder (of an s3:// model: its local metadata folder)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    wins = prompted_windows(tokenizer, text, cfg.eval.windows, cfg.eval.seq_len)  # scored as prompted
    spec = QuantSpec(cfg.quant.bits, cfg.quant.group_size, cfg.quant.sym)
    label = method_label(cfg.quant.model_dump(), solved_mix(cfg))
    variants = {"fp16 (reference)": layerwise.reference()}
    if "rtn" in cfg.eval.baselines and cfg.quant.method != "rtn":
        variants[f"RTN W{cfg.quant.bits} g{cfg.quant.group_size}"] = layerwise.rtn(spec)
    if gguf_path is not None:
        variants[f"{label} (GGUF via gguf-py)"] = layerwise.gguf_file(gguf_path, outcome.reader.config)
    else:  # AWQ's folded norms and biases come with its results
        variants[label] = layerwise.stored_results(results)
    log.info("evaluating %d models on %d × %d tokens of %s, block by block", len(variants), *wins.ids.shape, text)
    heads = layerwise.layerwise_models(outcome.reader, outcome.store, wins, variants)
    rows = evaluate(heads, wins, reference="fp16 (reference)")
    return {"text": text, "windows": list(wins.ids.shape), "token_ids_sha256": wins.sha256(), "rows": rows}


def solved_mix(cfg: JobConfig) -> str | None:
    """llama.cpp's mix (Q4_K_M …) when the run solves it, with how many linears ``output.gguf_types`` retypes,
    else None: then bits and group size mean nothing."""
    from strata_quant.pipeline.formats.gguf_solved import solves_mix

    if not solves_mix(cfg.output.gguf_type, cfg.quant.method):
        return None
    own = cfg.output.gguf_types
    return f"{cfg.output.gguf_type}, {len(own)} linear type(s) of strata's own" if own else cfg.output.gguf_type


def quality_lines(quality: dict, role: str) -> list[str]:
    """The printed table of one held-out text (``role``: which text it is)."""
    rows = quality["rows"]
    w = max(len(n) for n in rows)
    lines = [
        f"{role} perplexity: {quality['text']}, {quality['windows'][0]} windows × {quality['windows'][1]} tokens",
        f"{'model'.ljust(w)}  {'ppl':>8}  {'Δ ppl':>8}  {'KLD':>7}  {'top-1':>6}",
    ]
    for name, r in rows.items():
        lines.append(f"{name.ljust(w)}  {r['ppl']:8.3f}  {r['ppl_increase']:+8.2%}  {r['kld']:7.4f}  {r['top1']:6.1%}")
    return lines


def format_report(report: dict) -> str:
    lines = []
    q = report["quant"]
    lines.append(
        f"strata run {report['run_id']}: {method_label(q, report.get('solved_mix'))}, {report['workers']} worker(s)"
    )
    if (report.get("solver_notes") or {}).get("gptq_linears"):
        lines.append(f"  {solver_notes_line(report['solver_notes'])}")
    if report.get("quality"):
        lines.append("")
        lines.extend(quality_lines(report["quality"], "held-out (in domain)"))
        if report["quality"].get("off_domain"):
            lines.append("")
            lines.extend(quality_lines(report["quality"]["off_domain"], "held-out (off domain)"))
    lines.append("")
    lines.append("artifacts:")
    for fmt, a in report["artifacts"].items():
        lines.append(f"  {fmt:5s} {a['bytes'] / 1e6:9.1f} MB  {a['path']}")
    for check in report["checks"]:
        lines.append(
            f"  verified {check['format']}: {check['bit_exact_linears']} linears bit-exact"
            + (f" in {check['reader']}" if "reader" in check else "")
        )
        if check.get("weight_error"):
            e = check["weight_error"]
            how = "re-quantized by llama.cpp" if check.get("requantized") else check.get("carry", "")
            lines.append(
                f"    {check.get('gguf_type')} {how}: max |Δ| {e['max_abs']:.3g}, mean |Δ| {e['mean_abs']:.3g}, "
                f"rel RMS {e['rel_rms']:.3g} vs the solver's weights"
            )
        if check.get("llamacpp"):
            lc = check["llamacpp"]
            lines.append(
                f"    llama.cpp vs transformers logits: top-1 {lc['top1_agreement']:.1%}, "
                f"mean |Δ| {lc['mean_abs_diff']:.4f} (std {lc['logit_std']:.3f})"
            )
    if report.get("gate"):
        lines.append("")
        lines.append(gate_message(report["gate"]))
    t = report["timings"]
    lines.append("")
    lines.append("wall time: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items()))
    ph = report.get("phase_s") or {}
    if ph:
        lines.append("per-worker phases (summed over blocks): " + ", ".join(f"{k} {v:.1f}s" for k, v in ph.items()))
    lines.append(f"record: {report['store']}/runs/{report['run_id']}   report: {report.get('report_path', '')}")
    if (report.get("report_files") or {}).get("html"):
        lines.append(
            f"html report: {report['report_files']['html']}   model card: {report['report_files']['markdown']}"
        )
    return "\n".join(lines)
