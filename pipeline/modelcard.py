"""Model cards: a README.md in every artifact folder (``<name>.gguf.md`` beside a GGUF file).

Each card says how the weights were made (method, bits, group, symmetry, act-order, calibration
data, tool version), how well they do (the report's held-out evaluation, when there is one), what
was verified, and which readers accept the artifact (FORMATS.md).
"""

from __future__ import annotations

from pathlib import Path

from strata_quant.pipeline.report import expert_summary_line

VLLM_GPTQ_GROUPS = (-1, 32, 64, 128)

FORMAT_TITLES = {
    "gptq": "GPTQ (safetensors)",
    "awq": "AWQ GEMM (safetensors)",
    "compressed-tensors": "compressed-tensors pack-quantized (safetensors)",
    "gguf": "GGUF (llama.cpp)",
}


def partial_group_widths(quant: dict, model_config: dict | None) -> list[int]:
    """Input widths of the model's linears that the group size does not divide (a last, partial group)."""
    g = int(quant.get("group_size", -1))
    if g == -1 or not model_config:
        return []
    widths = {int(model_config[k]) for k in ("hidden_size", "intermediate_size") if k in model_config}
    return sorted(k for k in widths if k % g)


def readers(fmt: str, quant: dict, model_config: dict | None = None, check: dict | None = None) -> list[str]:
    """Which readers accept the artifact, with the conditions that decide it (FORMATS.md)."""
    bits, g, sym = int(quant.get("bits", 4)), int(quant.get("group_size", -1)), bool(quant.get("sym", True))
    act_order = bool(quant.get("act_order")) and not quant.get("static_groups", True)
    partial = partial_group_widths(quant, model_config)
    out: list[str] = []
    if fmt == "gptq":
        out.append("transformers + GPTQModel (`pip install gptqmodel`): loads it")
        if bits in (4, 8) and sym and g in VLLM_GPTQ_GROUPS and not (act_order and g != -1):
            out.append(f"vLLM: accepts {bits}-bit symmetric, group {g}")
        else:
            why = []
            if bits not in (4, 8):
                why.append(f"{bits}-bit")
            if not sym:
                why.append("asymmetric")
            if g not in VLLM_GPTQ_GROUPS:
                why.append(f"group {g}")
            if act_order and g != -1:
                why.append("act-order without static groups")
            out.append(f"vLLM: does not accept it ({', '.join(why)}; it takes 4/8-bit symmetric, G ∈ {{-1,32,64,128}})")
    elif fmt == "awq":
        out.append("transformers + AutoAWQ or GPTQModel: loads it")
        out.append("vLLM: accepts AWQ GEMM 4-bit")
    elif fmt == "compressed-tensors":
        out.append("transformers + compressed-tensors: loads it")
        out.append(
            "vLLM: accepts compressed-tensors pack-quantized" + ("" if bits in (4, 8) else f" (check {bits}-bit)")
        )
    elif fmt == "gguf":
        out.append("llama.cpp, Ollama, LM Studio and other ggml readers")
        out.append("transformers (`gguf_file=`): loads it, dequantized to float")
        if check and check.get("llamacpp"):
            lc = check["llamacpp"]
            out.append(
                f"checked in llama.cpp: top-1 agreement {lc['top1_agreement']:.1%} with transformers on "
                f"{lc['tokens']} tokens, mean |Δ logit| {lc['mean_abs_diff']:.4f}"
            )
    if partial and fmt != "gguf":
        out.append(
            f"partial last group: input width(s) {partial} are not multiples of {g}, so the last group is shorter "
            "(nG = ceil(K / G)). transformers / GPTQModel and our verifier read it; fast kernels that need "
            "K % G == 0 (vLLM Marlin / Machete, AWQ GEMM) may refuse or fall back"
        )
    return out


def _carry_line(check: dict | None) -> str | None:
    if not check or check.get("format") != "gguf":
        return None
    carry = check.get("carry", "exact")
    t = check.get("gguf_type") or "?"
    if carry == "exact":
        return f"{t}: carries the solver's codes and scales exactly (bit-exact on reload)"
    types = ", ".join(f"{k} ×{v}" for k, v in sorted((check.get("linear_types") or {}).items()))
    if carry == "solved":  # a llama.cpp mix solved by strata: each linear's codes are the solver's, on its own type
        return f"{t}: every linear solved by strata on the type llama.cpp's mix gives it (bit-exact on reload; {types})"
    err = check.get("weight_error") or {}
    measured = (
        f"max |Δ| {err.get('max_abs', float('nan')):.3g}, mean |Δ| {err.get('mean_abs', float('nan')):.3g}, "
        f"relative RMS {err.get('rel_rms', float('nan')):.3g} vs the solver's weights"
    )
    if carry == "nearly":
        return f"{t}: the solver's codes and scales with the offset −scale·z rounded to fp16 ({measured})"
    return (
        f"{t}: **re-quantized** by llama.cpp from {check.get('source_type') or 'the dequantized solver output'} "
        f"— not the solver's rounding ({measured}; linear types: {types})"
    )


def _quality_table(quality: dict) -> list[str]:
    rows = quality.get("rows") or {}
    w = quality.get("windows") or ["?", "?"]
    lines = [
        f"Held-out evaluation on `{quality.get('text', '?')}`, {w[0]} windows × {w[1]} tokens:",
        "",
        "| Model | PPL | Δ PPL | KLD | Top-1 |",
        "|:--|--:|--:|--:|--:|",
    ]
    for name, r in rows.items():
        ref = not name.lower().startswith(("strata", "rtn")) and r.get("kld", 0.0) == 0.0
        delta = "—" if ref else f"{r.get('ppl_increase', 0.0):+.2%}"
        kld = "—" if ref else f"{r.get('kld', 0.0):.4f}"
        top1 = "—" if ref else f"{r.get('top1', 1.0):.1%}"
        lines.append(f"| {name} | {r['ppl']:.3f} | {delta} | {kld} | {top1} |")
    return lines


def model_card(report: dict, fmt: str, model_config: dict | None = None) -> str:
    """The markdown card of one artifact of a job report."""
    q = report.get("quant") or {}
    cal = report.get("calibration") or {}
    artifact = (report.get("artifacts") or {}).get(fmt, {})
    check = next((c for c in report.get("checks") or [] if c.get("format") == fmt), None)
    name = Path(artifact.get("path", fmt)).name
    g = q.get("group_size", "?")
    act = bool(q.get("act_order"))
    lines = [
        f"# {name}",
        "",
        f"{FORMAT_TITLES.get(fmt, fmt)} of `{report.get('model', '?')}`, quantized with strata "
        f"{report.get('tool_version', '')}.".replace(" .", "."),
        "",
        "## Quantization",
        "",
        "| | |",
        "|:--|:--|",
        f"| Method | {str(report.get('method', q.get('method', '?'))).upper()} |",
        f"| Bits | {q.get('bits', '?')} |",
        f"| Group size | {g}{' (whole row)' if g == -1 else ''} |",
        f"| Symmetric | {'yes' if q.get('sym', True) else 'no (zero points)'} |",
        f"| Act-order | {'yes' + (', static groups' if q.get('static_groups', True) else '') if act else 'no'} |",
    ]
    if "damp" in q:
        lines.append(f"| Damping | {q['damp']} |")
    if cal:
        n, t = cal.get("num_samples", "?"), cal.get("seq_len", "?")
        total = f" = {n * t:,} tokens" if isinstance(n, int) and isinstance(t, int) else ""
        lines.append(f"| Calibration | `{cal.get('source', '?')}`, {n} × {t}{total} ({cal.get('sampling', 'even')}) |")
        if cal.get("statistics"):  # solved from another run's kept Hessians: that run's calibration
            lines.append(f"| Statistics | kept by run `{cal['statistics']}` (no calibration forward in this run) |")
    if report.get("experts"):  # MoE: each expert's statistics from the tokens its router sent it
        lines.append(f"| Experts | {expert_summary_line(report['experts'])} |")
    lines.append(f"| Tool | strata {report.get('tool_version', '?')}, run `{report.get('run_id', '?')}` |")
    if artifact.get("bytes"):
        size = artifact["bytes"]
        params = report.get("params")
        bpw = f", {size * 8 / params:.2f} bits per weight" if params else ""
        lines.append(f"| Size | {size / 1e6:,.1f} MB{bpw} |")
    carry = _carry_line(check)
    if carry:
        lines.append(f"| GGUF type | {carry} |")
    lines.append("")

    quality = report.get("quality")
    if quality and quality.get("rows"):
        lines += ["## Quality", "", *_quality_table(quality), ""]
        gate = report.get("gate")
        if gate:
            verdict = "passed" if gate["passed"] else "**failed**"
            lines += [f"Release gate (perplexity increase ≤ {gate['max_ppl_increase']:.2%}): {verdict}.", ""]
    lines += ["## Readers", ""]
    lines += [f"- {r}" for r in readers(fmt, q, model_config, check)]
    lines.append("")
    if check:
        lines += ["## Verification", ""]
        total = check.get("quantized_linears")
        exact = check.get("bit_exact_linears")
        if exact is not None:
            of = f"/{total}" if total is not None else ""
            lines.append(f"- {exact}{of} quantized linears bit-exact against the run record")
        if check.get("reader"):
            lines.append(f"- read back with {check['reader']}")
        lc = check.get("llamacpp")
        if lc:
            lines.append(
                f"- llama.cpp vs transformers logits: max |Δ| {lc['max_abs_diff']:.4f}, mean |Δ| "
                f"{lc['mean_abs_diff']:.4f} (logit std {lc['logit_std']:.3f}), top-1 {lc['top1_agreement']:.1%}"
            )
        lines.append("")
    return "\n".join(lines)


def card_path(fmt: str, artifact_path: Path) -> Path:
    return artifact_path.with_name(artifact_path.name + ".md") if fmt == "gguf" else artifact_path / "README.md"


def write_model_cards(report: dict, model_config: dict | None = None) -> dict[str, Path]:
    """A card for every artifact in the report; returns {format: card path}."""
    out = {}
    for fmt, artifact in (report.get("artifacts") or {}).items():
        path = Path(artifact["path"])
        if not path.exists():
            continue
        card = card_path(fmt, path)
        card.write_text(model_card(report, fmt, model_config), encoding="utf-8")
        out[fmt] = card
    return out


__all__ = ["model_card", "readers", "write_model_cards", "card_path", "partial_group_widths"]
