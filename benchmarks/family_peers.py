"""fp16 / RTN / strata GPTQ / GPTQModel GPTQ side by side on one family model, scored on two texts.

One command per model (issues #20 and #22)::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.family_peers qwen2.5-coder-0.5b
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.family_peers gemma3-270m
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.family_peers smollm2-135m --group-size 64 --eval-windows 32

Both tools get the same calibration token ids (``--calib-windows`` × 512 of *Emma*, or of
``--calibration`` (e.g. ``fixture:calib-mix``), strata's evenly spaced windows,
benchmarks.peers.calibration_ids) at W4 g``--group-size`` symmetric:

* strata: a ``strata-row`` subprocess of benchmarks/peers.py (pipeline.run.run_job on 2 Ray
  workers, configs/smollm2-135m-gptq-w4g64.yaml's solver: act-order with static groups, MSE
  scale grid 100, damp 0.01, true-sequential; model, group and calibration overridden);
* GPTQModel 7.6.0 in .venv-gptqmodel (benchmarks/peers_gptqmodel.py, its own defaults: damp
  0.05, act_group_aware), its checkpoint decoded by pipeline.formats.gptq;
* RTN at the same grid (pipeline.eval.rtn_weights).

Every row is scored by pipeline.eval.evaluate against the fp32 reference on the same
``--eval-windows`` × 512 windows of two texts, each window starting as the tokenizer starts a prompt
(Gemma's BOS, none for SmolLM2 and Qwen; pipeline.calibration.tokenizer_prefix): *Persuasion* (the calibration's author) and one
unlike the calibration (:data:`FAMILIES`: Python's standard library source for the code model, the
King James Bible otherwise). The table gives ppl, Δppl, KLD and top-1 per text and the ratio
strata Δppl / GPTQModel Δppl (the bar: ≤ 0.8). The JSON (rows, text and calibration SHA-256,
command, commit, machine) goes to benchmarks/results/family-peers-<model without dots>-w4g<G>.json.
Quantized rows are kept under out/peers/table/ (a rerun scores them again without requantizing).

``--quant KEY=VALUE`` overrides strata's solver (the config's ``quant:`` section, checked before any
work; its own row file and run name, and ``--out`` required so the stored figures stay), and so does
``--calibration`` (both tools' rows);
``--peers-from`` takes the skipped tools' rows from a stored result scored on the same ids,
windows and texts (checked, and the fp16 ppl must agree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PERSUASION = "fixture:austen/persuasion"
# model fixture → the off-domain text scored beside Persuasion
FAMILIES = {
    "smollm2-135m": "fixture:kjv",  # the off-domain issue's W4 g64 bar against GPTQModel
    "qwen2.5-coder-0.5b": "fixture:code/python-stdlib",
    "gemma3-270m": "fixture:kjv",
    "tiny-qwen2": "fixture:code/python-stdlib",  # the fast test's model
}
ROWS = ("RTN", "strata GPTQ", "GPTQModel GPTQ")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def text_identity(ref: str) -> dict:
    """The file a text reference reads and its SHA-256 (the fixture texts are pinned by it)."""
    from strata_quant.pipeline import fixtures

    name = ref[len("fixture:") :]
    path = fixtures.text_path(name) if name in fixtures.TEXTS else fixtures.austen(name.split("/", 1)[1])
    return {"source": ref, "file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}


def score_text(ref, rows: dict, windows, per_call: int) -> dict:
    """pipeline.eval.evaluate of every row against ``ref`` on ``windows``, ``per_call`` rows (each
    a function building its model) per call so at most ``per_call`` + 1 models are in memory; the
    reference's row is the fp16 row."""
    from strata_quant.pipeline.eval import evaluate

    keys = ("ppl", "ppl_increase", "kld", "top1")
    out, names = {}, list(rows)
    for i in range(0, len(names), per_call):
        models = {"fp16": ref, **{n: rows[n]() for n in names[i : i + per_call]}}
        scored = evaluate(models, windows, reference="fp16", batch_size=1)
        out.update({n: {k: r[k] for k in keys} for n, r in scored.items()})
        del models
    return out


def render(result: dict) -> str:
    """The side-by-side table (one column group per text) and the ratio line per text."""
    texts = result["texts"]
    head = "| row | " + " | ".join(f"{t['label']} ppl | Δppl | KLD | top-1" for t in texts) + " |"
    lines = [head, "|---|" + "---|" * (4 * len(texts))]
    for row in ("fp16", *ROWS):
        cells = []
        for t in texts:
            r = result["scores"][t["label"]].get(row)
            if r is None:
                cells.append("— | — | — | —")
            elif row == "fp16":
                cells.append(f"{r['ppl']:.3f} | — | — | —")
            else:
                cells.append(f"{r['ppl']:.3f} | {r['ppl_increase'] * 100:+.2f} % | {r['kld']:.4f} | {r['top1']:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for t in texts:
        s = result["scores"][t["label"]]
        if "strata GPTQ" in s and "GPTQModel GPTQ" in s:
            ratio = s["strata GPTQ"]["ppl_increase"] / s["GPTQModel GPTQ"]["ppl_increase"]
            verdict = "meets" if ratio <= 0.8 else "does not meet"
            lines.append(f"{t['label']}: strata Δppl / GPTQModel Δppl = {ratio:.2f} ({verdict} the ≤ 0.8 bar)")
    return "\n".join(lines)


def quantize_rows(args, model_dir: Path, ids_path: Path) -> dict[str, Path]:
    """strata's and GPTQModel's rows (benchmarks.peers.produce_row; kept rows are reused)."""
    from benchmarks import peers

    out = {}
    for label, tool in (("strata GPTQ", "strata"), ("GPTQModel GPTQ", "gptqmodel")):
        if tool in args.skip:
            continue
        out[label] = peers.produce_row(tool, "gptq", 4, args.group_size, args, ids_path, model_dir)
    return out


def adopt_rows(result: dict, stored: dict, source: str) -> None:
    """The rows of ``stored`` missing from ``result`` (the tools skipped here), only when both were
    scored on the same texts, windows and calibration ids; the fp16 ppl must agree to 1e-6
    (the same reference on the same windows), else nothing is taken and the reason raised."""
    same = (
        stored["calibration_ids_sha256"] == result["calibration_ids_sha256"]
        and stored["eval_windows"] == result["eval_windows"]
        and stored.get("eval_prefix", []) == result.get("eval_prefix", [])
        and [t["sha256"] for t in stored["texts"]] == [t["sha256"] for t in result["texts"]]
        and stored["grid"] == result["grid"]
    )
    if not same:
        raise SystemExit(f"--peers-from {source}: other texts, windows, grid or calibration ids; rows not comparable")
    for label, rows in result["scores"].items():
        ref, kept = rows["fp16"]["ppl"], stored["scores"][label]["fp16"]["ppl"]
        if abs(ref - kept) > 1e-6 * ref:
            raise SystemExit(f"--peers-from {source}: fp16 ppl on {label} {kept} here {ref}; rows not comparable")
        for row, r in stored["scores"][label].items():
            rows.setdefault(row, r)
    for row, meta in stored.get("meta", {}).items():
        result["meta"].setdefault(row, {**meta, "from": source, "commit": stored.get("commit")})


def run(args) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from benchmarks import peers
    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream, tokenizer_prefix
    from strata_quant.pipeline.eval import load_reference, rtn_weights, with_weights
    from strata_quant.workers.result import QuantSpec

    torch.set_num_threads(args.threads)
    model_dir = fixtures.resolve(args.model)
    ids_path = peers.calibration_ids(model_dir, args.calib_windows, f"-{model_dir.name}", args.calibration)
    t = time.perf_counter()
    row_files = quantize_rows(args, model_dir, ids_path)
    quantize_wall = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = load_reference(model_dir)
    spec = QuantSpec(4, args.group_size, True)
    builders = {"RTN": lambda: with_weights(ref, rtn_weights(ref, spec))}
    for label, path in row_files.items():
        builders[label] = lambda path=path: peers.row_model(ref, load_file(str(path)))
    texts = [{"label": "Persuasion", **text_identity(PERSUASION)}]
    texts.append({"label": args.off_domain.split("/")[-1].split(":")[-1], **text_identity(args.off_domain)})
    result = {
        "model": args.model,
        "grid": f"W4 g{args.group_size} sym",
        "calibration": {"text": args.calibration, "windows": args.calib_windows, "seq_len": peers.SEQ_LEN},
        "calibration_ids_sha256": sha256(ids_path),
        "eval_windows": args.eval_windows,
        "eval_prefix": tokenizer_prefix(tok),  # each scored window starts as the model is prompted (Gemma: BOS)
        "texts": texts,
        "scores": {},
        "meta": {},
    }
    for label, path in row_files.items():
        meta = path.with_suffix(".json")
        result["meta"][label] = json.loads(meta.read_text()) if meta.is_file() else {}
    t = time.perf_counter()
    for text in texts:
        stream = tokenize_stream(tok, load_text(text["source"]))
        w = eval_windows(stream, args.eval_windows, peers.SEQ_LEN, result["eval_prefix"])
        result["scores"][text["label"]] = score_text(ref, builders, w, args.per_call)
        print(f"# scored {text['label']}: {time.perf_counter() - t:.0f} s", flush=True)
    result["wall_s"] = {"quantize": quantize_wall, "score": time.perf_counter() - t}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a family fixture: " + ", ".join(FAMILIES))
    parser.add_argument("--calib-windows", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--calibration", help="both tools' calibration text (a calibration.source; default Emma)")
    parser.add_argument("--eval-windows", type=int, default=8, help="windows of 512 tokens per text")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (scoring, GPTQModel)")
    parser.add_argument("--workers", type=int, default=2, help="strata's Ray workers")
    parser.add_argument("--per-call", type=int, default=2, help="rows scored per reference pass")
    parser.add_argument("--skip", default="", help="tools left out (strata,gptqmodel)")
    parser.add_argument(
        "--quant", action="append", help="strata's solver: KEY=VALUE of the config's quant: section (repeatable)"
    )
    parser.add_argument(
        "--peers-from", help="a stored result JSON: its rows of the tools skipped here, when windows and ids match"
    )
    parser.add_argument(
        "--out", help="the JSON (default: benchmarks/results/family-peers-<model without dots>-w4g<G>.json)"
    )
    args = parser.parse_args(argv)
    if args.model not in FAMILIES:
        parser.error(f"unknown family model {args.model!r} (known: {', '.join(FAMILIES)})")
    args.off_domain, args.model = FAMILIES[args.model], f"fixture:{args.model}"
    args.skip = set(filter(None, args.skip.split(",")))
    for flag, given in (("--quant", args.quant), ("--calibration", args.calibration)):
        if given and not args.out:  # the stored default figures are not overwritten
            parser.error(f"{flag} needs --out (a JSON name of its own)")
    sys.path.insert(0, str(ROOT))
    import benchmarks  # noqa: F401  (binds strata_quant to this checkout where it is not installed)
    from benchmarks import peers
    from benchmarks.common import machine
    from strata_quant.pipeline.calibration import CalibrationError, load_text
    from strata_quant.pipeline.config import ConfigError, load_config
    from strata_quant.pipeline.fixtures import FixtureError

    args.quant_overrides = peers.parse_quant(args.quant)
    args.calibration = args.calibration or peers.EMMA
    try:  # before any work: an unknown key or a bad value names itself here
        load_config(ROOT / peers.STRATA_CONFIGS["gptq"], {f"quant.{k}": v for k, v in args.quant_overrides.items()})
    except ConfigError as err:
        parser.error(f"--quant: {err}")
    try:  # a calibration text that cannot be read is refused before any tool runs
        load_text(args.calibration)
    except (CalibrationError, FixtureError) as err:
        parser.error(f"--calibration: {err}")
    stored = json.loads(Path(args.peers_from).read_text()) if args.peers_from else None

    result = run(args)
    result["quant_overrides"] = args.quant_overrides
    if stored is not None:
        adopt_rows(result, stored, args.peers_from)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result.update(command=" ".join(["python -m benchmarks.family_peers", *(argv or sys.argv[1:])]))
    result.update(commit=commit.stdout.strip(), machine=machine(), load_avg=os.getloadavg()[0])
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"family-peers-{args.model[8:].replace('.', '')}-w4g{args.group_size}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    cal = result["calibration"]
    print(
        f"# {args.model}, {result['grid']}, calibration {cal['windows']} × {cal['seq_len']} of {cal['text']} (same ids)"
    )
    print(f"# {args.eval_windows} × 512 windows per text; {result['machine']}; commit {result['commit']}")
    if args.quant_overrides:
        print(f"# strata's solver with quant overrides {args.quant_overrides}")
    if stored is not None:
        print(f"# rows not run here read from {args.peers_from} (same ids, windows and texts)")
    print(render(result))
    print(f"# JSON: {out}")
    return result


if __name__ == "__main__":
    main()
