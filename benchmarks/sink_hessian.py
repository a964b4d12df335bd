"""The attention sink in H: how much of each linear's Hessian the first position makes, and what leaving it out does.

Every calibration window starts a sequence, and its first position is the attention sink: in SmolLM2 its input to
the down projections is hundreds of times any other token's. Over the run's calibration (``--calibration``, 64 × 512)
on the float model this prints

* per linear role, the share of tr(H) that each window's first position makes (H = 2·XᵀX/n), median and max over
  the blocks;
* for one linear (``--linear``), the output error of GPTQ on llama.cpp types, solved on H (as the run solves),
  measured on H and on H' (H without the first position): what a sensitivity weighed by H ranks;
* every decoder linear solved on H and on H' (llama.cpp's ``--mix`` types with α ``--diag-shrink``, and GPTQ W4 g64
  act-order with the demo's scale search), scored by Δppl on ``--windows`` × 512 of Persuasion in torch.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.sink_hessian
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from benchmarks.common import machine
from benchmarks.mixed import decoder_linears


def hessians(model: nn.Module, windows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(H, H') per decoder linear over ``windows``: H = 2·XᵀX/n over every position, H' the same sum without each
    window's first position (over the same n, so H − H' is the first positions' part)."""
    lin = decoder_linears(model)
    h = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lin.items()}
    rest = {n: torch.zeros_like(v) for n, v in h.items()}

    def hook(n):
        def add(_m, args, _out):
            x = args[0].detach().double()
            flat, tail = x.reshape(-1, x.shape[-1]), x[:, 1:].reshape(-1, x.shape[-1])
            h[n].add_(flat.T @ flat)
            rest[n].add_(tail.T @ tail)

        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in lin.items()]
    with torch.no_grad():
        for w in range(windows.shape[0]):
            model(input_ids=windows[w : w + 1], use_cache=False)
    for x in handles:
        x.remove()
    k = 2 / windows.numel()
    return {n: v * k for n, v in h.items()}, {n: v * k for n, v in rest.items()}


def mean_nll(model: nn.Module, windows: torch.Tensor) -> float:
    """The mean next-token NLL over ``windows``, each from an empty context."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows.shape[0]):
            ids = windows[w : w + 1]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += float(nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibration", default="fixture:calib-mix")
    ap.add_argument("--cal-windows", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--linear", default="model.layers.11.mlp.down_proj")
    ap.add_argument("--mix", default="Q2_K")
    ap.add_argument("--diag-shrink", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def note(step: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {step}", flush=True)

    from transformers import AutoTokenizer

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import (
        calibration_prefix,
        calibration_windows,
        eval_windows,
        load_text,
        tokenize_stream,
    )
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.eval import load_reference
    from strata_quant.pipeline.formats.gguf_mix import linear_types
    from strata_quant.workers.gptq import gptq_quantize
    from strata_quant.workers.methods import quantize_ggml
    from strata_quant.workers.result import QuantSpec

    print(machine())
    path = fixtures.resolve("fixture:smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    calw = calibration_windows(tokenize_stream(tok, load_text(args.calibration)), args.cal_windows, 512, "even",
                               prefix=calibration_prefix(tok))  # fmt: skip
    evalw = eval_windows(tokenize_stream(tok, load_text("fixture:austen/persuasion")), args.windows, 512)
    model = load_reference(path)
    lin = decoder_linears(model)
    floats = {n: m.weight.data.clone() for n, m in lin.items()}
    h, rest = hessians(model, calw)
    note(f"H and H' of {len(h)} linears over {args.cal_windows} × 512 tokens of {args.calibration}")

    print("\n| linear | first position's share of tr(H): median over blocks | max |")
    print("|---|---|---|")
    roles = sorted({n.split(".", 3)[3] for n in h})
    for role in roles:
        shares = [1 - float(rest[n].trace() / h[n].trace()) for n in h if n.endswith(role)]
        print(f"| {role} | {100 * statistics.median(shares):.1f} % | {100 * max(shares):.1f} % |")

    w, hn, rn = floats[args.linear], h[args.linear], rest[args.linear]
    print(f"\n{args.linear}, GPTQ (α {args.diag_shrink}) solved on H; output error tr(ΔW H ΔWᵀ)\n")
    print("| type | on H | on H' (no first position) |")
    print("|---|---|---|")
    for t in ("Q2_K", "Q3_K", "Q4_0", "Q6_K"):
        err = w.double() - quantize_ggml("gptq", w, hn, t, {"diag_shrink": args.diag_shrink}).dequantize().double()
        print(f"| {t} | {float(((err @ hn) * err).sum()):.2f} | {float(((err @ rn) * err).sum()):.2f} |")
    note("one linear's errors")

    ref = mean_nll(model, evalw)
    mix = linear_types(open_checkpoint("fixture:smollm2-135m"), args.mix, sorted(lin))
    solves = {
        f"llama.cpp's {args.mix} types, GPTQ α {args.diag_shrink}": lambda n, hh: quantize_ggml(
            "gptq", floats[n], hh, mix[n], {"diag_shrink": args.diag_shrink}
        ),
        "GPTQ W4 g64 act-order, scale search": lambda n, hh: gptq_quantize(
            floats[n], hh, QuantSpec(4, 64, True), act_order=True, static_groups=True, mse_grid=100
        ),
    }
    print(f"\nevery decoder linear solved on H or on H'; Persuasion {args.windows} × 512 in torch, float ppl "
          f"{math.exp(ref):.3f}\n")  # fmt: skip
    print("| solve | on H | on H' |")
    print("|---|---|---|")
    for name, solve in solves.items():
        got = {}
        for kind, hs in (("H", h), ("H'", rest)):
            for n in lin:
                lin[n].weight.data = solve(n, hs[n]).dequantize().float()
            got[kind] = 100 * (math.exp(mean_nll(model, evalw) - ref) - 1)
        for n in lin:
            lin[n].weight.data = floats[n]
        on_h, on_rest = got["H"], got["H'"]
        print(f"| {name} | {on_h:+.2f} % | {on_rest:+.2f} % |")
    note("done")


if __name__ == "__main__":
    main()
