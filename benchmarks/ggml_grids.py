"""GPTQ on llama.cpp's grids against llama.cpp's own quantizers, linear by linear, held out.

For chosen linears of a model, H_cal = 2·XᵀX/n from calibration windows of one text and H_eval
from windows of another; each ggml type that fits the row length is solved four ways — strata's
GPTQ on the grid (H_cal), strata's grid search with round-to-nearest (importance diag H_cal),
llama.cpp's quantizer with the importance matrix of the same calibration (mean x²), and without
one — and scored by the output error on the held-out text, tr(E H_eval Eᵀ) / tr(W H_eval Wᵀ).
``--shrink α`` solves GPTQ with H_α; ``--refine N`` adds GPTQ followed by N passes of coordinate
descent over its codes (workers.ggml.refine_codes), with its time and its error ÷ GPTQ's.
llama.cpp runs in llama-cpp-python's libggml (tests/ggml_reference.py).

    python -m benchmarks.ggml_grids --model fixture:smollm2-135m --layers 5,20 --types Q4_K,Q6_K
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine
from strata_quant.workers.ggml import GRIDS, gptq_ggml, refine_ggml, rtn_ggml
from strata_quant.workers.gptq import relative_output_error, shrink_to_diagonal
from tests.ggml_reference import ggml_dequantize, ggml_quantize

LINEARS = {"q": "self_attn.q_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj"}


def hessians(model_path, text: str, layers: list[int], windows: int, seq_len: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata_quant.pipeline.calibration import calibration_windows, load_text, tokenize_stream

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = calibration_windows(tokenize_stream(tok, load_text(text)), windows, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    sums, mods = {}, {}
    for i in layers:
        for short, path in LINEARS.items():
            mod = model.model.layers[i].get_submodule(path)
            mods[(i, short)] = mod
            sums[(i, short)] = 0

    def hook(key):
        def f(_m, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            sums[key] = sums[key] + x.t() @ x

        return f

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in mods.items()]
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0))
    for h in handles:
        h.remove()
    n = ids.numel()
    return {k: (mods[k].weight.detach().float().clone(), (2 * s / n).float()) for k, s in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fixture:smollm2-135m")
    ap.add_argument("--layers", default="5,20")
    ap.add_argument("--types", default=",".join(GRIDS))
    ap.add_argument("--cal", default="fixture:austen/emma")
    ap.add_argument("--eval", default="fixture:austen/persuasion")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--shrink", type=float, default=0.0, help="GPTQ's diag_shrink α")
    ap.add_argument("--refine", type=int, default=0, help="also GPTQ with this many refine passes")
    args = ap.parse_args()
    from strata_quant.pipeline.fixtures import resolve

    path = resolve(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    print(machine())
    print(f"{args.model}: layers {layers}, H_cal from {args.windows}×{args.seq_len} of {args.cal}, "
          f"H_eval from {args.windows}×{args.seq_len} of {args.eval}")  # fmt: skip
    cal = hessians(path, args.cal, layers, args.windows, args.seq_len)
    held = hessians(path, args.eval, layers, args.windows, args.seq_len)
    extra = f" {'refined':>10s}  refined/gptq" if args.refine else ""
    print(f"{'linear':14s} {'type':5s} {'gptq':>10s} {'ours-rtn':>10s} {'llama-imat':>10s} {'llama':>10s}  gptq/imat"
          + extra)  # fmt: skip
    for key, (w, h_cal) in cal.items():
        h_eval = held[key][1]
        h_shrunk = shrink_to_diagonal(h_cal, args.shrink) if args.shrink else h_cal  # the H the solve factored
        for name in args.types.split(","):
            if w.shape[1] % GRIDS[name].block:
                continue
            t = time.perf_counter()
            solved = gptq_ggml(w, h_cal, name, diag_shrink=args.shrink)
            t = time.perf_counter() - t
            g = solved.dequantize()
            r = rtn_ggml(w, name, torch.diag(h_cal)).dequantize()
            imat = (torch.diag(h_cal) / 2).numpy()
            li = torch.from_numpy(ggml_dequantize(ggml_quantize(w.numpy(), name, imat), name, w.shape[1]))
            lp = torch.from_numpy(ggml_dequantize(ggml_quantize(w.numpy(), name, None), name, w.shape[1]))
            e = [relative_output_error(w, x, h_eval) for x in (g, r, li, lp)]
            line = f"{key[0]:>3d}.{key[1]:10s} {name:5s} " + " ".join(f"{v:10.3e}" for v in e)
            line += f"  {e[0] / e[2]:.2f}  ({t:.1f} s)"
            if args.refine:  # GPTQ's result refined: the time is GPTQ's and the descent's
                t0 = time.perf_counter()
                f = refine_ggml(w, h_shrunk, solved, args.refine).dequantize()
                er = relative_output_error(w, f, h_eval)
                line += f" {er:10.3e}  {er / e[0]:.3f}  ({t + time.perf_counter() - t0:.1f} s)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
