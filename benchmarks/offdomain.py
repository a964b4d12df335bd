"""What carries the calibration's style into the weights: GPTQ variants scored on and off domain (issue #22).

SmolLM2-135M, every decoder linear solved by ``workers.gptq.gptq_quantize`` at W4 g32 symmetric (the
Q4_0 grid: a Q4_0 GGUF of these results is exact), each linear on the float model's inputs. The
Hessians H = 2·XᵀX/n are collected once per calibration text (one forward pass with hooks); each
variant then only solves and is scored by ``pipeline.eval.evaluate`` against the fp32 model on two
held-out texts: Austen's *Persuasion* (in domain for an Austen calibration) and the King James
Bible (``fixture:kjv``: another author, era and genre). Variants change one thing at a time from
the demo's solver (damp 0.01, act-order with static groups, MSE scale grid of 100):

* ``damp``: λ in H + λ·mean(diag H)·I;
* ``act-order off`` / ``min/max scales`` (mse_grid 0);
* ``weighted grid``: the MSE scale search weights each input's error by diag(H) (mean x², the
  statistic of llama.cpp's importance matrix), before the error feedback (static groups);
* ``shrink α``: H ← (1 − α)·H + α·diag(H) (``quant.diag_shrink``; α = 1: no error feedback),
  alone and with the weighted grid;
* ``Q4_0 grid fit``: ``workers.ggml.gptq_ggml`` on the Q4_0 grid: each block's scale fitted by
  the importance-weighted search llama.cpp runs with an imatrix (diag H as the importance, the
  asymmetric −8…7 range), then GPTQ's feedback in natural column order, with shrink α;
* the calibration text: *Emma* or the mix (``fixture:calib-mix``), and fewer windows.

The Hessians are kept between invocations (``--hessians``, safetensors named by the calibration
tokens' SHA-256), so ``--only`` can run a few rows at a time without recollecting them.

The anchors: RTN, and llama.cpp's own Q4_0 with and without an importance matrix of the same Emma
tokens (llama-quantize, as benchmarks/gguf_mix_file.py runs it), its decoder linears read back by
transformers into the same fp32 model, so every row differs from the reference in the same tensors.
Each row's ratio is against the imatrix Q4_0 of that row's own calibration tokens (the mix and
fewer-windows rows get an anchor of their own).

True-sequential inputs need a real run (each stage on quantized inputs); compare
``strata run ... --set quant.true_sequential=false`` there.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.offdomain --calib 32 --few 8 --windows 4 [--only a,b]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine
from benchmarks.gguf_mix_file import TOOLS
from strata_quant.pipeline import fixtures
from strata_quant.pipeline.calibration import calibration_windows, eval_windows, load_text, tokenize_stream
from strata_quant.pipeline.eval import evaluate, load_reference, rtn_weights, with_weights
from strata_quant.workers.ggml import gptq_ggml
from strata_quant.workers.gptq import gptq_quantize
from strata_quant.workers.result import QuantSpec

TEXTS = {"Persuasion": "fixture:austen/persuasion", "KJV": "fixture:kjv"}
CALIB = {"Emma": "fixture:austen/emma", "mix": "fixture:calib-mix"}
BASE = {"damp": 0.01, "act_order": True, "static_groups": True, "mse_grid": 100, "diag_shrink": 0.0}


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}."}


def hessians(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """H = 2·XᵀX/n of every decoder linear's input over the windows (the float model's inputs); the
    linears that read one input (q/k/v, gate/up) share one matrix."""
    lin = decoder_linears(model)
    readers = [n for n in lin if not n.endswith(("k_proj", "v_proj", "up_proj"))]
    sums = {n: torch.zeros(lin[n].in_features, lin[n].in_features) for n in readers}
    hooks = []
    for n in readers:

        def fwd(_m, args, _out, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[n].addmm_(x.T, x)

        hooks.append(lin[n].register_forward_hook(fwd))
    with torch.no_grad():
        for w in range(windows.shape[0]):
            model.model(input_ids=windows[w : w + 1], use_cache=False)  # the decoder only: no logits needed
    for h in hooks:
        h.remove()
    tokens = windows.numel()
    out = {n: 2 * s / tokens for n, s in sums.items()}
    for n in lin:
        out.setdefault(n, out[_reader(n)])
    return out


def cached_hessians(model: nn.Module, windows: torch.Tensor, path: Path | None) -> dict[str, torch.Tensor]:
    """:func:`hessians`, kept in ``path`` (safetensors, one matrix per reading linear) when given: a
    later invocation with the same model, text and windows reads them instead of recomputing."""
    from safetensors.torch import load_file, save_file

    if path is not None and path.exists():
        kept = load_file(str(path))
        lin = decoder_linears(model)
        return {n: kept[_reader(n)] for n in lin}
    out = hessians(model, windows)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        readers = {_reader(n) for n in out}
        save_file({n: out[n].contiguous() for n in sorted(readers)}, str(path))
    return out


def _reader(name: str) -> str:
    """The linear whose input ``name`` reads (q for q/k/v, gate for gate/up)."""
    return name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")


def llamacpp_q4_0(ref: nn.Module, h: dict[str, torch.Tensor], tokens: int, out_dir: Path) -> dict[str, dict]:
    """llama.cpp's Q4_0 of the source GGUF without and with an importance matrix of the same
    calibration tokens (in_sum2 = Σ x² = diag(H)·n/2, the statistic llama-imatrix collects), made as
    benchmarks/gguf_mix_file.py makes them and read back by transformers: the decoder linears'
    dequantized weights (llama.cpp's embedding / output types are left out: the solvers compared)."""
    from benchmarks.gguf_mix_file import LINEARS, llama_quantize, write_imatrix
    from strata_quant.pipeline.eval import load_gguf_transformers

    src = fixtures._fetch_smollm2_gguf()
    n_layers = ref.config.num_hidden_layers
    sums = {
        (i, path): h[f"model.layers.{i}.{path}"].double() * (tokens / 2)
        for i in range(n_layers)
        for path in {p for _, p in LINEARS.values()}
    }
    imatrix = write_imatrix(out_dir / "calib.imatrix.gguf", sums, tokens, n_layers)
    out = {}
    for label, im in (("llama.cpp Q4_0 (no imatrix)", None), ("llama.cpp Q4_0 + imatrix", imatrix)):
        dst = out_dir / ("q4_0-imatrix.gguf" if im else "q4_0.gguf")
        llama_quantize(src, dst, "Q4_0", im)
        model = load_gguf_transformers(dst)
        out[label] = {n: m.weight.data.float().clone() for n, m in decoder_linears(model).items()}
        del model
    return out


class CachedReference:
    """The reference model's logits, computed once per batch of windows and kept: every group of
    variants is scored against the same logits without running the reference again."""

    def __init__(self, model: nn.Module):
        self.model, self.kept = model, {}

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        key = (tuple(ids.shape), ids.numpy().tobytes())
        if key not in self.kept:
            with torch.no_grad():
                self.kept[key] = self.model(input_ids=ids).logits.float()
        return self.kept[key]


def solve_all(weights: dict[str, torch.Tensor], h: dict[str, torch.Tensor], spec: QuantSpec, opts: dict) -> dict:
    """Dequantized GPTQ weights of every linear; the linears that share an input (q/k/v, gate/up) are
    stacked and solved as one matrix (rows are independent given H: the same result, fewer solves)."""
    groups: dict[str, list[str]] = {}
    for n in weights:
        groups.setdefault(_reader(n), []).append(n)
    out = {}
    for key, names in groups.items():
        rows = torch.cat([weights[n] for n in names])
        if "ggml" in opts:  # llama.cpp's grid, fitted by its importance-weighted search, then GPTQ's feedback
            solved = gptq_ggml(rows, h[key], opts["ggml"], damp=opts["damp"], diag_shrink=opts["diag_shrink"])
        else:
            solved = gptq_quantize(rows, h[key], spec, **opts)
        stacked = solved.dequantize()
        for n, part in zip(names, stacked.split([weights[n].shape[0] for n in names])):
            out[n] = part
    return out


def variants(calib_windows: int, few: int) -> dict[str, tuple[str, int, dict]]:
    """name → (calibration text, windows, solver options); one change at a time from the demo's solver,
    in the order they are run (the most telling first)."""
    out = {"demo solver": ("Emma", calib_windows, BASE)}
    out["MSE grid weighted by diag H"] = ("Emma", calib_windows, {**BASE, "mse_weight": "hessian"})
    out["shrink α=0.2"] = ("Emma", calib_windows, {**BASE, "diag_shrink": 0.2})
    out["shrink α=0.5"] = ("Emma", calib_windows, {**BASE, "diag_shrink": 0.5})
    out["shrink α=1 (no error feedback)"] = ("Emma", calib_windows, {**BASE, "diag_shrink": 1.0})
    out["shrink α=0.2 + weighted grid"] = ("Emma", calib_windows, {**BASE, "diag_shrink": 0.2, "mse_weight": "hessian"})
    out["shrink α=0.5 + weighted grid"] = ("Emma", calib_windows, {**BASE, "diag_shrink": 0.5, "mse_weight": "hessian"})
    out["damp 0.1"] = ("Emma", calib_windows, {**BASE, "damp": 0.1})
    out["act-order off"] = ("Emma", calib_windows, {**BASE, "act_order": False})
    out["min/max scales (no MSE grid)"] = ("Emma", calib_windows, {**BASE, "mse_grid": 0})
    out["mix"] = ("mix", calib_windows, BASE)
    out[f"{few} windows"] = ("Emma", few, BASE)
    out["mix + weighted grid"] = ("mix", calib_windows, {**BASE, "mse_weight": "hessian"})
    out["shrink α=1 + weighted grid"] = ("Emma", calib_windows, {**BASE, "diag_shrink": 1.0, "mse_weight": "hessian"})
    out["shrink α=0.1 + weighted grid"] = ("Emma", calib_windows, {**BASE, "diag_shrink": 0.1, "mse_weight": "hessian"})
    out["shrink α=0.3 + weighted grid"] = ("Emma", calib_windows, {**BASE, "diag_shrink": 0.3, "mse_weight": "hessian"})
    both = {**BASE, "diag_shrink": 0.2, "mse_weight": "hessian"}
    out["mix, shrink α=0.2 + weighted grid"] = ("mix", calib_windows, both)
    out[f"{few} windows, shrink α=0.2 + weighted grid"] = ("Emma", few, both)
    for alpha in (0.0, 0.2, 0.3, 0.5):  # Q4_0's own grid as llama.cpp fits it (workers.ggml), GPTQ on it
        out[f"Q4_0 grid fit + shrink α={alpha:g}"] = (
            "Emma",
            calib_windows,
            {"ggml": "Q4_0", "damp": 0.01, "diag_shrink": alpha},
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--few", type=int, default=8, help="calibration windows of the fewer-windows variant")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of each text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--json", default="", help="also write the rows here (after each row)")
    parser.add_argument(
        "--hessians",
        default=str(fixtures.cache_dir() / "offdomain-hessians"),
        help="folder that keeps the Hessians between invocations ('' : recompute every time)",
    )
    args = parser.parse_args()
    t0 = time.perf_counter()

    def note(step: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {step}", flush=True)

    from transformers import AutoTokenizer

    print(machine(), f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    path = fixtures.resolve("fixture:smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    ref = load_reference(path)
    spec = QuantSpec(4, 32, True)
    held = {
        t: eval_windows(tokenize_stream(tok, load_text(src)), args.windows, args.seq_len) for t, src in TEXTS.items()
    }
    chosen = variants(args.calib, args.few)
    if args.only:  # in the order given
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in chosen]
        if unknown:
            parser.error(f"unknown variants {unknown}; the variants: {list(chosen)}")
        chosen = {n: chosen[n] for n in names}
    streams = {c: tokenize_stream(tok, load_text(CALIB[c])) for c in {"Emma"} | {v[0] for v in chosen.values()}}
    note("texts tokenised")
    hs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def hessians_of(calib: str, n_win: int) -> dict[str, torch.Tensor]:
        if (calib, n_win) not in hs:
            wins = calibration_windows(streams[calib], n_win, args.seq_len)
            digest = hashlib.sha256(wins.numpy().tobytes()).hexdigest()[:16]  # the tokens themselves name the file
            kept = Path(args.hessians) / f"smollm2-135m-{calib}-{n_win}x{args.seq_len}-{digest}.safetensors"
            kept = kept if args.hessians else None
            how = "read" if kept is not None and kept.exists() else "computed"
            hs[(calib, n_win)] = cached_hessians(ref, wins, kept)
            note(f"Hessians ({how}): {calib}, {n_win} × {args.seq_len}")
        return hs[(calib, n_win)]

    rows: dict[str, dict[str, float]] = {}
    cached = {text: CachedReference(ref) for text in held}
    label = {n: f"{c} {w} × {args.seq_len}" for n, (c, w, _) in chosen.items()}
    print(
        "\n| variant | calibration | Δ ppl Persuasion | Δ ppl KJV | KLD Persuasion | KLD KJV | ÷ imatrix Persuasion | ÷ imatrix KJV |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)

    def anchor_name(calib: str, n_win: int) -> str:
        """llama.cpp's imatrix row of that calibration (the protocol's Emma × --calib: the plain name)."""
        plain = (calib, n_win) == ("Emma", args.calib)
        return "llama.cpp Q4_0 + imatrix" + ("" if plain else f" ({calib} {n_win} × {args.seq_len})")

    def score(name: str, weights: dict[str, torch.Tensor], calib: str, anchor: str = "") -> None:
        """One row against the reference's kept logits, printed (and written) at once; its ratios
        against ``anchor`` (llama.cpp's imatrix Q4_0 from the same calibration tokens)."""
        model, row = with_weights(ref, weights), {}
        for text, wins in held.items():
            r = evaluate({"fp32": cached[text], name: model}, wins, reference="fp32")
            row[text], row[f"{text} kld"], row[f"{text} ppl_ref"] = (
                100 * r[name]["ppl_increase"], r[name]["kld"], r["fp32"]["ppl"]
            )  # fmt: skip
        del model
        row["anchor"] = anchor or name
        rows[name] = row
        base = rows.get(anchor or name, row)
        ratio = " | ".join(f"{row[t] / base[t]:.2f}×" for t in held)
        cells = " | ".join([f"{row[t]:+.2f} %" for t in held] + [f"{row[t + ' kld']:.4f}" for t in held])
        print(f"| {name} | {calib} | {cells} | {ratio} |", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)

    have_llamacpp = (TOOLS / "llama-quantize").exists()
    plain = ("Emma", args.calib)
    for calib, n_win in dict.fromkeys([plain, *((c, w) for c, w, _ in chosen.values())]) if have_llamacpp else ():
        with tempfile.TemporaryDirectory() as tmp:  # one imatrix anchor per calibration the rows use
            h = hessians_of(calib, n_win)
            anchors = llamacpp_q4_0(ref, h, n_win * args.seq_len, Path(tmp))
        name = anchor_name(calib, n_win)
        score(name, anchors.pop("llama.cpp Q4_0 + imatrix"), f"{calib} {n_win} × {args.seq_len}")
        if (calib, n_win) == plain:
            score("llama.cpp Q4_0 (no imatrix)", anchors["llama.cpp Q4_0 (no imatrix)"], "—", name)
    first = anchor_name(*plain) if have_llamacpp else ""
    score("RTN W4 g32", rtn_weights(ref, spec), "—", first)  # the cheap rows first: the solver rows take minutes
    weights = {n: m.weight.data.float().clone() for n, m in decoder_linears(ref).items()}
    for name, (calib, n_win, opts) in chosen.items():
        anchor = anchor_name(calib, n_win) if have_llamacpp else ""
        score(name, solve_all(weights, hessians_of(calib, n_win), spec, opts), label[name], anchor)
    ppl = {t: f"{rows['RTN W4 g32'][t + ' ppl_ref']:.3f}" for t in held}
    print(
        f"\nSmolLM2-135M W4 g32 sym (the Q4_0 grid), each linear solved on the float model's inputs; held out "
        f"{args.windows} × {args.seq_len} tokens of each text; fp32 ppl {ppl}; total {time.perf_counter() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
