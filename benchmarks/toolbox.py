"""The quantization toolbox on SmolLM2-135M: NF4, NF4 + double quant, GPTQ on NF4, FP8 E4M3,
INT8 per-channel, mixed precision at 4.25 bits/weight (RTN g64 at 2/3/4/8 bits chosen by an exact knapsack on
absolute or relative Hessian-weighted error) and uniform W4 g64 RTN. These two mixed rows are the
bare local-error proxies (both lose to uniform); benchmarks/mixed.py measures the sensitivity a run
records (workers.mixed.linear_sensitivity) and a Fisher oracle against uniform GPTQ at equal bytes.

Each variant fake-quantizes every linear inside the decoder layers (lm_head and embeddings stay
fp32) and is scored with pipeline.eval.evaluate on Persuasion (perplexity, KLD and top-1 against
the fp32 model). Hessians for GPTQ and the mixed-precision sensitivities come from Emma
(calibration windows through the float model). bits/weight counts the stored codes and scales of
the quantized linears.

    .venv/bin/python benchmarks/toolbox.py [--windows 8 --seq-len 512 --calib 16]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from strata_quant.pipeline import fixtures
from strata_quant.pipeline.calibration import calibration_windows, eval_windows, tokenize_stream
from strata_quant.pipeline.eval import evaluate, load_reference, with_weights
from strata_quant.workers.fp8 import fp8_quantize
from strata_quant.workers.mixed import average_bits, choose_bits_dp, hessian_error
from strata_quant.workers.nf4 import gptq_nf4, nf4_quantize
from strata_quant.workers.result import QuantSpec
from strata_quant.workers.rtn import rtn_quantize

SHARED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gateup", "up_proj": "gateup"}
COST = {2: 2.25, 3: 3.25, 4: 4.25, 8: 8.25}  # bits/weight with fp16 scales per 64 weights


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}."}


def hessians(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """H = 2·XᵀX / n per linear, from the float model's own inputs."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in linears(model).items():

        def hook(_m, args, _out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, windows.shape[0], 2):
            model(input_ids=windows[i : i + 2])
    for h in hooks:
        h.remove()
    return {n: 2 * s / counts[n] for n, s in sums.items()}


def gptq_nf4_weights(weights: dict[str, torch.Tensor], hs: dict[str, torch.Tensor]) -> tuple[dict, float]:
    """GPTQ on NF4 (+ double quant); linears that share an input (q/k/v, gate/up) solved stacked."""
    groups: dict[str, list[str]] = {}
    for name in weights:
        parent, _, leaf = name.rpartition(".")
        groups.setdefault(f"{parent}.{SHARED.get(leaf, leaf)}", []).append(name)
    out, bits, count = {}, 0.0, 0
    for members in groups.values():
        stacked = torch.cat([weights[m] for m in members])
        result = gptq_nf4(stacked, hs[members[0]], double_quant=True)
        deq = result.dequantize()
        bits += result.bits_per_weight() * stacked.numel()
        count += stacked.numel()
        row = 0
        for m in members:
            n = weights[m].shape[0]
            out[m] = deq[row : row + n]
            row += n
    return out, bits / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib", type=int, default=16, help="calibration windows (of --seq-len) from Emma")
    parser.add_argument("--target-bpw", type=float, default=4.25)
    args = parser.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    path = fixtures.smollm2()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ref = load_reference(path)
    evalw = eval_windows(tokenize_stream(tok, fixtures.austen("persuasion").read_text()), args.windows, args.seq_len)
    calw = calibration_windows(tokenize_stream(tok, fixtures.austen("emma").read_text()), args.calib, args.seq_len)
    weights = {n: m.weight.data.float() for n, m in linears(ref).items()}
    numel = {n: w.numel() for n, w in weights.items()}
    total = sum(numel.values())

    def avg(per: dict[str, float]) -> float:
        return sum(per[n] * numel[n] for n in weights) / total

    timings: dict[str, float] = {}

    def done(step: str, since: float) -> None:
        timings[step] = time.perf_counter() - since
        print(f"[{time.perf_counter() - t_start:7.1f}s] {step}: {timings[step]:.1f}s", flush=True)

    variants: dict[str, tuple[dict[str, torch.Tensor], float]] = {}

    t = time.perf_counter()
    hs = hessians(ref, calw)
    done("hessians", t)

    t = time.perf_counter()
    res = {n: nf4_quantize(w, double_quant=False) for n, w in weights.items()}
    variants["NF4 (bnb, no DQ)"] = (
        {n: r.dequantize() for n, r in res.items()},
        avg({n: r.bits_per_weight() for n, r in res.items()}),
    )
    res = {n: nf4_quantize(w, double_quant=True) for n, w in weights.items()}
    variants["NF4 + DQ (bnb)"] = (
        {n: r.dequantize() for n, r in res.items()},
        avg({n: r.bits_per_weight() for n, r in res.items()}),
    )
    done("nf4", t)

    t = time.perf_counter()
    variants["GPTQ on NF4 + DQ"] = gptq_nf4_weights(weights, hs)
    done("gptq-nf4", t)

    t = time.perf_counter()
    res8 = {n: fp8_quantize(w) for n, w in weights.items()}
    variants["FP8 E4M3 per-channel"] = (
        {n: r.dequantize() for n, r in res8.items()},
        avg({n: r.bits_per_weight() for n, r in res8.items()}),
    )
    int8 = QuantSpec(8, -1, True)
    variants["INT8 per-channel RTN"] = (
        {n: rtn_quantize(w, int8).dequantize() for n, w in weights.items()},
        avg({n: 8 + 16 / w.shape[1] for n, w in weights.items()}),
    )
    done("fp8+int8", t)

    t = time.perf_counter()
    rtn_by_bits = {
        b: {n: rtn_quantize(w, QuantSpec(b, 64, True)).dequantize() for n, w in weights.items()} for b in COST
    }
    errors = {n: {b: hessian_error(w, rtn_by_bits[b][n], hs[n]) for b in COST} for n, w in weights.items()}
    # absolute tr(ΔW H ΔWᵀ) is in each layer's own output units; dividing by tr(W H Wᵀ) (the
    # layer's output energy) makes the errors comparable across depth
    energy = {n: hessian_error(w, torch.zeros_like(w), hs[n]) for n, w in weights.items()}
    relative = {n: {b: e / energy[n] for b, e in per.items()} for n, per in errors.items()}
    choice = choose_bits_dp(errors, numel, args.target_bpw, COST)
    choice_rel = choose_bits_dp(relative, numel, args.target_bpw, COST)
    variants[f"mixed abs-err @{args.target_bpw}"] = (
        {n: rtn_by_bits[b][n] for n, b in choice.items()},
        average_bits(choice, numel, COST),
    )
    variants[f"mixed rel-err @{args.target_bpw}"] = (
        {n: rtn_by_bits[b][n] for n, b in choice_rel.items()},
        average_bits(choice_rel, numel, COST),
    )
    variants["uniform W4 g64 RTN"] = (rtn_by_bits[4], COST[4])
    done("mixed", t)
    hist = {b: sum(1 for c in choice.values() if c == b) for b in COST}
    hist_rel = {b: sum(1 for c in choice_rel.values() if c == b) for b in COST}
    err_mixed = sum(errors[n][choice[n]] for n in weights)
    err_w4 = sum(errors[n][4] for n in weights)
    rel_mixed = sum(relative[n][choice_rel[n]] for n in weights)
    rel_w4 = sum(relative[n][4] for n in weights)

    t = time.perf_counter()
    models = {"fp32 reference": ref, **{k: with_weights(ref, v[0]) for k, v in variants.items()}}
    rows = evaluate(models, evalw, reference="fp32 reference")
    done("eval", t)

    print(
        f"\nSmolLM2-135M, Persuasion {args.windows} x {args.seq_len} tokens, calibration Emma "
        f"{args.calib} x {args.seq_len}; decoder linears only ({total / 1e6:.1f} M weights)\n"
    )
    print(f"| {'variant':<26} | {'bits/w':>6} | {'ppl':>7} | {'Δppl':>7} | {'KLD':>7} | {'top-1':>6} |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
    for name, row in rows.items():
        bpw = 16.0 if name == "fp32 reference" else variants[name][1]
        print(
            f"| {name:<26} | {bpw:6.3f} | {row['ppl']:7.3f} | {100 * row['ppl_increase']:6.2f}% | "
            f"{row['kld']:7.4f} | {row['top1']:6.3f} |"
        )
    print(f"\nmixed abs-err: bits per linear {hist}; Σ tr(ΔW H ΔWᵀ) {err_mixed:.4g} vs uniform 4-bit {err_w4:.4g}")
    print(f"mixed rel-err: bits per linear {hist_rel}; Σ relative error {rel_mixed:.4g} vs uniform 4-bit {rel_w4:.4g}")
    print(
        "timings (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        + f"; total {time.perf_counter() - t_start:.1f}"
    )


if __name__ == "__main__":
    main()
