"""Does a sensitivity predict what a type change does to the loss? Single swaps and whole plans, measured, on SmolLM2.

A GGUF mix of strata's own (``strata plan --gguf-mix``) sums per-linear sensitivities and trusts the sum: each
linear's s_i(t) stands for the loss increase of putting that linear alone on type t, and the plan's loss for the
sum over linears. This checks both on the float model in torch, starting from llama.cpp's own mix solved as the run
solves it (every linear on its mix type by ``workers.methods.quantize_ggml``, gptq with ``--quant``, on the float
model's H over the run's calibration):

* per linear that a plan moves off the mix type: the measured change of the mean next-token NLL when only that
  linear moves, against each measure's predicted change s(t) − s(t_mix) (``benchmarks.gguf_oracle_mix``'s
  ``sensitivities.json``: ``in-run``, the probe's block-local measure, and ``fisher``, the whole-model oracle);
* per plan: the measured change when all its linears move together, against the sum of the single changes.

NLL over ``--windows`` evenly chosen windows of the run's calibration (the measures' own data), and of Persuasion.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.gguf_oracle_check --probe-out /tmp/own-out \\
        --oracle /tmp/oracle --mix Q2_K --quant diag_shrink=0.3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from benchmarks.gguf_oracle_mix import run_calibration
from benchmarks.mixed import decoder_linears
from benchmarks.sink_hessian import hessians, mean_nll


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe-out", required=True, help="the gguf_mix_run --own-mix --kept-statistics folder")
    ap.add_argument("--probe-mix", default="Q2_K")
    ap.add_argument("--oracle", required=True, help="benchmarks.gguf_oracle_mix's --out")
    ap.add_argument("--mix", default="Q2_K")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--quant", action="append", default=[], help="KEY=VALUE of the run's quant options")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def note(step: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {step}", flush=True)

    import yaml

    from strata_quant.pipeline.calibration import (
        eval_windows,
        load_text,
        tokenize_stream,
    )
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.eval import load_reference
    from strata_quant.pipeline.formats.gguf_mix import linear_types
    from strata_quant.pipeline.plan import probe_entries
    from strata_quant.pipeline.store import open_store
    from strata_quant.workers.methods import quantize_ggml

    options = {k: float(v) for k, v in (q.split("=", 1) for q in args.quant)}
    probe_out, oracle = Path(args.probe_out), Path(args.oracle)
    probe = (probe_out / args.probe_mix / "run-id").read_text()
    config, entries = probe_entries(open_store(str(probe_out / "store")), probe)
    cal = config["calibration"]
    path, tok, calw = run_calibration(config)
    texts = {
        "calibration": calw[torch.linspace(0, calw.shape[0] - 1, args.windows).round().long()],
        "Persuasion": eval_windows(
            tokenize_stream(tok, load_text("fixture:austen/persuasion")), args.windows, cal["seq_len"]
        ),
    }
    print(machine())
    model = load_reference(path)
    lin = decoder_linears(model)
    floats = {n: m.weight.data.clone() for n, m in lin.items()}
    hs, _ = hessians(model, calw)
    note(f"H of {len(hs)} linears over {calw.numel():,} calibration tokens")
    float_nll = {k: mean_nll(model, w) for k, w in texts.items()}
    mix_types = linear_types(open_checkpoint(config["model"]), args.mix, sorted(entries))
    solved: dict[tuple[str, str], torch.Tensor] = {}

    def weight(n: str, t: str) -> torch.Tensor:
        if (n, t) not in solved:
            solved[(n, t)] = quantize_ggml("gptq", floats[n], hs[n], t, options).dequantize().float()
        return solved[(n, t)]

    for n in lin:
        lin[n].weight.data = weight(n, mix_types[n])
    base = {k: mean_nll(model, w) for k, w in texts.items()}
    note(f"llama.cpp's {args.mix} solved: ΔNLL " + ", ".join(f"{k} {base[k] - float_nll[k]:+.4f}" for k in texts))

    plans = {"probe's own mix": probe_out / args.mix / "own" / "own.yaml"}
    plans |= {f"{m} (float H)": oracle / m / args.mix / "own.yaml" for m in ("in-run", "fisher")}
    moves = {
        p: {n: t for n, t in yaml.safe_load(f.read_text())["output"]["gguf_types"].items() if t != mix_types[n]}
        for p, f in plans.items()
    }
    sens = json.loads((oracle / "sensitivities.json").read_text())
    singles = {}
    for n, t in sorted({(n, t) for m in moves.values() for n, t in m.items()}):
        lin[n].weight.data = weight(n, t)
        got = {k: mean_nll(model, w) - base[k] for k, w in texts.items()}
        lin[n].weight.data = weight(n, mix_types[n])
        pred = {m: s[n]["sensitivity"][t] - s[n]["sensitivity"][mix_types[n]] for m, s in sens.items()}
        singles[f"{n}:{t}"] = {"from": mix_types[n], "measured": got, "predicted": pred}
        note(f"{n} {mix_types[n]} → {t}: " + ", ".join(f"{k} {v:+.5f}" for k, v in got.items()))
    joint = {}
    for p, m in moves.items():
        for n, t in m.items():
            lin[n].weight.data = weight(n, t)
        got = {k: mean_nll(model, w) - base[k] for k, w in texts.items()}
        for n in m:
            lin[n].weight.data = weight(n, mix_types[n])
        summed = {k: sum(singles[f"{n}:{t}"]["measured"][k] for n, t in m.items()) for k in texts}
        joint[p] = {"moves": len(m), "measured": got, "sum_of_singles": summed}
        note(f"{p}: {len(m)} moves, joint " + ", ".join(f"{k} {got[k]:+.5f} (singles {summed[k]:+.5f})" for k in texts))

    print(f"\nSmolLM2-135M, llama.cpp's {args.mix} mix solved by GPTQ {options} on float H; mean NLL change per token "
          f"({args.windows} windows of 512 per text)\n")  # fmt: skip
    print("| plan | moves | calibration: joint | sum of singles | Persuasion: joint | sum of singles |")
    print("|---|---|---|---|---|---|")
    for p, j in joint.items():
        m, s = j["measured"], j["sum_of_singles"]
        print(f"| {p} | {j['moves']} | {m['calibration']:+.4f} | {s['calibration']:+.4f} | {m['Persuasion']:+.4f} "
              f"| {s['Persuasion']:+.4f} |")  # fmt: skip
    print("\n| measure | Spearman ρ with the measured single moves (calibration) | sign agreement |")
    print("|---|---|---|")
    measured = [v["measured"]["calibration"] for v in singles.values()]
    for m in sens:
        pred = [v["predicted"][m] for v in singles.values()]
        agree = sum((a > 0) == (b > 0) for a, b in zip(measured, pred)) / len(pred)
        print(f"| {m} | {spearman(measured, pred):.3f} | {agree:.0%} |")
    if args.json:
        result = {"mix": args.mix, "options": options, "windows": args.windows, "float_nll": float_nll,
                  "mix_nll": base, "singles": singles, "plans": joint}  # fmt: skip
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    note("done")


if __name__ == "__main__":
    main()
