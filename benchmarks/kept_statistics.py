"""One calibration run, every mix: llama.cpp K mixes of SmolLM2 solved from one run's kept statistics.

Run ``--keep`` (a full job, ``run.keep_statistics``) calibrates and solves its mix; each mix of ``--mixes``
is then made twice: by its own full run (calibration forward and solves) and by a run that solves from the
kept statistics (``calibration.statistics``: no forward). The two are compared in time (the job's quantize
seconds and phases) and in llama.cpp (llama-cpp-python) on windows of Persuasion and the King James Bible,
Δppl and KLD against the source GGUF, as ``benchmarks.gguf_mix_run`` scores. The keep mix solved again from
its own statistics must give the keep run's tensors byte for byte (checked, printed; the files differ in
``general.name``, the job's name).

    python -m benchmarks.kept_statistics --keep Q4_K_M --mixes Q3_K_M --out /tmp/strata-kept --eval-windows 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import machine
from benchmarks.gguf_mix_run import TEXTS, score, source_gguf

MODEL = "smollm2-135m"


def job(out: Path, name: str, mix: str, args, statistics: str | None = None, keep: bool = False):
    """The config of one mix's job in the shared store (``statistics``: the run it solves from)."""
    from strata_quant.pipeline.config import parse_config

    calibration = {"source": args.calibration, "num_samples": args.cal_windows, "seq_len": 512}
    if statistics:
        calibration["statistics"] = statistics
    return parse_config(
        {
            "name": name,
            "model": f"fixture:{MODEL}",
            "calibration": calibration,
            "quant": {"method": "gptq", "bits": 4, "group_size": 32, **args.quant_overrides},
            "run": {"workers": args.workers, "store": str(out / "store"), "keep_statistics": keep},
            "output": {"dir": str(out / name), "formats": ["gguf"], "gguf_type": mix, "overwrite": True},
            "eval": None,
        }
    )


def made(out: Path, name: str, cfg) -> dict:
    """The job's report (its full job run unless an earlier invocation left it) and its GGUF."""
    from strata_quant.pipeline.job import run_full_job

    saved = out / f"{name}.json"
    if not saved.exists():
        report = run_full_job(cfg, progress=False)
        (check,) = report["checks"]
        entry = {
            "run_id": report["run_id"],
            "quantize_s": report["timings"]["quantize_s"],
            "phase_s": report["phase_s"],
            "bit_exact": f"{check['bit_exact_linears']}/{check['quantized_linears']}",
            "gguf": str(next((out / name).glob("*.gguf"))),
        }
        saved.write_text(json.dumps(entry, indent=1))
    entry = json.loads(saved.read_text())
    print(f"{name}: quantize {entry['quantize_s']:.0f} s, phases "
          + ", ".join(f"{k} {v:.0f} s" for k, v in entry["phase_s"].items() if v >= 0.5)
          + f"; {entry['bit_exact']} linears bit-exact", flush=True)  # fmt: skip
    return entry


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors (names, types and bytes)."""
    from gguf import GGUFReader

    ta, tb = ({t.name: t for t in GGUFReader(p).tensors} for p in (a, b))
    return ta.keys() == tb.keys() and all(
        ta[k].tensor_type == tb[k].tensor_type and ta[k].data.tobytes() == tb[k].data.tobytes() for k in ta
    )


def table(runs: dict[str, dict], scores: dict[str, dict]) -> list[str]:
    """Each mix's direct and kept-statistics rows: quantize seconds, the seconds of its statistics and forward
    phases (per worker; a kept run's statistics phase is reading the kept H), file bytes, Δppl / KLD per text."""
    texts = list(next(iter(scores.values())))
    head = (
        "| file | quantize s | stats + forward s | bytes | " + " | ".join(f"{t} Δppl | {t} KLD" for t in texts) + " |"
    )
    lines = [head, "|" + "---|" * (4 + 2 * len(texts))]
    for name, run in runs.items():
        cells = " | ".join(f"{100 * scores[name][t]['dppl']:+.2f} % | {scores[name][t]['kld']:.4f}" for t in texts)
        passes = run["phase_s"].get("stats", 0.0) + run["phase_s"].get("forward", 0.0)
        lines.append(
            f"| {name} | {run['quantize_s']:.0f} | {passes:.0f} | {scores[name][texts[0]]['bytes']:,} | {cells} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", default="Q4_K_M", help="the mix of the run that keeps its statistics")
    ap.add_argument("--mixes", default="Q3_K_M", help="mixes made both ways (comma-separated)")
    ap.add_argument("--cal-windows", type=int, default=64)
    ap.add_argument("--calibration", default="fixture:austen/emma")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", action="append", help="KEY=VALUE of the config's quant: section (repeatable)")
    ap.add_argument("--out", default="/tmp/strata-kept")
    ap.add_argument("--json", help="write the result (command, commit, machine, runs, scores) here")
    args = ap.parse_args()
    from benchmarks.peers import parse_quant

    args.quant_overrides = parse_quant(args.quant) or {}
    import torch
    from transformers import AutoTokenizer

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(machine())
    keep = made(out, f"keep-{args.keep}", job(out, f"keep-{args.keep}", args.keep, args, keep=True))
    again = made(out, f"kept-{args.keep}", job(out, f"kept-{args.keep}", args.keep, args, keep["run_id"]))
    same = same_tensors(Path(keep["gguf"]), Path(again["gguf"]))
    print(f"{args.keep} solved again from its own kept statistics: the same tensors byte for byte: {same}")
    runs = {}
    for mix in args.mixes.split(","):
        runs[f"{mix} direct"] = made(out, f"direct-{mix}", job(out, f"direct-{mix}", mix, args))
        runs[f"{mix} from {args.keep}'s statistics"] = made(
            out, f"kept-{mix}", job(out, f"kept-{mix}", mix, args, keep["run_id"])
        )
    tok = AutoTokenizer.from_pretrained(fixtures.resolve(f"fixture:{MODEL}"))
    held = {t: eval_windows(tokenize_stream(tok, load_text(v)), args.eval_windows, 512) for t, v in TEXTS.items()}
    src = source_gguf(MODEL)
    saved = out / f"scores-{args.eval_windows}.json"
    scores = json.loads(saved.read_text()) if saved.exists() else {}
    todo = {k: Path(r["gguf"]) for k, r in runs.items() if k not in scores}
    if todo:
        per_text = {t: score(src, todo, w, args.threads, t) for t, w in held.items()}
        for k in todo:
            scores[k] = {t: per_text[t][k] for t in held}
        saved.write_text(json.dumps(scores, indent=1))
    print("\n".join(table(runs, scores)))
    for mix in args.mixes.split(","):
        direct, kept = runs[f"{mix} direct"], runs[f"{mix} from {args.keep}'s statistics"]
        print(f"- {mix}: from kept statistics {kept['quantize_s'] / direct['quantize_s']:.2f}× the direct run's "
              "quantize time")  # fmt: skip
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        result = {
            "model": f"fixture:{MODEL}",
            "command": "python -m benchmarks.kept_statistics " + " ".join(sys.argv[1:]),
            "commit": commit,
            "machine": machine(),
            "quant": args.quant_overrides,
            "calibration": {"text": args.calibration, "windows": args.cal_windows, "seq_len": 512},
            "eval_windows": args.eval_windows,
            "keep": {**keep, "same_tensors_from_own_statistics": same},
            "runs": runs,
            "scores": scores,
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"result: {args.json}")


if __name__ == "__main__":
    main()
