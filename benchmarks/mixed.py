"""Mixed precision by sensitivity against uniform 4-bit at equal size, on SmolLM2-135M (issue #9).

Every linear inside the decoder layers is quantized with GPTQ (act-order, static groups, group 64,
symmetric; each on the float model's inputs) at 3, 4 and 8 bits. A sensitivity per linear and width
is turned into per-linear widths by the exact knapsack of ``workers.mixed.choose_bits_by_cost`` under
a budget of *stored GPTQ bits* (``gptq_stored_bits``: codes, zeros, fp16 scales, g_idx), so "equal
size" means equal bytes of the quantized tensors in the checkpoint:

* budget = uniform W4 g64: the mixed model is compared with GPTQ W4 g64;
* budget = uniform W4 g32 (the next size up): compared with GPTQ W4 g32.

Sensitivities (the names used in the table):

* ``in-run``  — what a probe run records (``workers.mixed.linear_sensitivity`` with
  ``output_fisher`` row weights, the block's residual scale ē and H' over every position but each
  window's first, the attention sink): Σ_r F̂_r (ΔW H' ΔWᵀ)_rr / ē;
* ``in-run on the whole H`` — the same weighed by H (the sink included), as the probe was;
* ``hessian`` — the plain Hessian-weighted output error tr(ΔW H ΔWᵀ) (the first proxy strata used);
* ``fisher``  — an oracle the run cannot compute (it needs the whole model's backward):
  Σ_r F_r (ΔW H ΔWᵀ)_rr with F_r the empirical Fisher of the loss w.r.t. output channel r;
* ``fisher on token-weighted H`` — the oracle on H weighted per token by its loss gradient
  (``calibrate``'s ``tok``), which gives the sink the weight its gradient says.

Scored with pipeline.eval.evaluate on Persuasion (perplexity, KLD and top-1 against the fp32 model).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mixed.py [--windows 8 --calib 8 --seq-len 512]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from strata_quant.pipeline import fixtures
from strata_quant.pipeline.calibration import calibration_windows, eval_windows, tokenize_stream
from strata_quant.pipeline.eval import evaluate, load_reference, with_weights
from strata_quant.workers.gptq import gptq_quantize
from strata_quant.workers.mixed import (
    choose_bits_by_cost,
    gptq_stored_bits,
    output_fisher,
    residual_scale,
)
from strata_quant.workers.result import QuantSpec

WIDTHS = (3, 4, 8)


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}."}


def calibrate(model: nn.Module, windows: torch.Tensor):
    """One forward + backward per calibration window: Hessians per linear, the empirical row Fisher
    F_r = mean_t (∂ NLL_t / ∂ z_r)² per linear output, and every block's inputs (for the local measures).
    Hessians ``{kind: {linear: H}}``: ``all`` H = 2·XᵀX/n; ``rest`` the same without each window's first
    position (the attention sink, whose inputs to some linears are outsized), over the same n; ``tok``
    weighted per token by its loss gradient at the linear's output, H = 2·Σ_t a_t x_t x_tᵀ / Σ_t a_t with
    a_t = ‖∂ NLL / ∂ z_t‖² (with F_r, a rank-one split of the per-token, per-channel gradient that K-FAC
    pools into F_r alone)."""
    lin = decoder_linears(model)
    kinds = ("all", "rest", "tok")
    H = {k: {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lin.items()} for k in kinds}
    weight_sum = dict.fromkeys(lin, 0.0)
    F = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in lin.items()}
    block_inputs: dict[int, list] = {}
    grads: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for n, m in lin.items():

        def fwd(_m, args, out, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            inputs[n] = x
            H["all"][n] += x.T @ x
            rest = args[0].detach()[:, 1:].reshape(-1, x.shape[-1]).double()
            H["rest"][n] += rest.T @ rest
            out.register_hook(lambda g, n=n: grads.__setitem__(n, g.detach()))

        hooks.append(m.register_forward_hook(fwd))
    for i, layer in enumerate(model.model.layers):

        def pre(_m, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            keep = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
            block_inputs.setdefault(i, []).append((hidden.detach(), keep))

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    for p in model.parameters():
        p.requires_grad_(True)
    tokens = 0
    for w in range(windows.shape[0]):
        ids = windows[w : w + 1]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        loss = nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
        grads.clear()
        loss.backward()
        model.zero_grad(set_to_none=True)
        for n in lin:
            g = grads[n].reshape(-1, grads[n].shape[-1]).double()
            F[n] += (g * g).sum(0)
            a = (g * g).sum(1)
            H["tok"][n] += (inputs[n] * a[:, None]).T @ inputs[n]
            weight_sum[n] += float(a.sum())
        inputs.clear()
        tokens += ids.shape[1]
    for h in hooks:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(False)
    hessians = {k: {n: 2 * h / tokens for n, h in H[k].items()} for k in ("all", "rest")}
    hessians["tok"] = {n: 2 * h / weight_sum[n] for n, h in H["tok"].items()}
    return hessians, {n: f / tokens for n, f in F.items()}, block_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=8, help="held-out Persuasion windows")
    parser.add_argument("--calib", type=int, default=8, help="calibration windows from Emma")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()

    def note(step: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {step}", flush=True)

    path = fixtures.smollm2()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ref = load_reference(path)
    evalw = eval_windows(tokenize_stream(tok, fixtures.austen("persuasion").read_text()), args.windows, args.seq_len)
    calw = calibration_windows(tokenize_stream(tok, fixtures.austen("emma").read_text()), args.calib, args.seq_len)
    lin = decoder_linears(ref)
    weights = {n: m.weight.data.float().clone() for n, m in lin.items()}
    hessians, fisher, block_inputs = calibrate(ref, calw)
    hs = hessians["all"]
    note("calibration: Hessians, empirical Fisher, block inputs")

    # what a probe run records: per block, ē and the local output Fisher F̂ (workers.mixed)
    scale, local, past_sink = {}, {}, {}
    for i, layer in enumerate(ref.model.layers):
        names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        probe = output_fisher(layer, block_inputs[i], names, seed=i)
        scale[i] = residual_scale(probe.energy)  # of the block's output, as the probe
        for n, sums in probe.fisher.items():
            local[f"model.layers.{i}.{n}"] = sums[:-1] / sums[-1]
            past_sink[f"model.layers.{i}.{n}"] = probe.rest_hessian(n).float()
    del block_inputs
    note("local output Fisher + residual scales")

    deq: dict[tuple[str, int, int], torch.Tensor] = {}
    for bits, group in [(b, 64) for b in WIDTHS] + [(4, 32)]:
        spec = QuantSpec(bits, group, True)
        for n, w in weights.items():
            deq[(n, bits, group)] = gptq_quantize(w, hs[n], spec, act_order=True, static_groups=True).dequantize()
        note(f"GPTQ {bits}-bit g{group}")

    def block_of(n: str) -> int:
        return int(n.split(".layers.")[1].split(".")[0])

    # measure: (row weight, the H the error is weighed by); the solve is always on the whole H
    measures = {
        "in-run": ("local", "past sink"),
        "in-run on the whole H": ("local", "all"),
        "hessian": ("one", "all"),
        "fisher": ("fisher", "all"),
        "fisher on token-weighted H": ("fisher", "tok"),
    }
    sens: dict[str, dict[str, dict[int, float]]] = {key: {} for key in measures}
    for n, w in weights.items():
        on = {"all": hs[n].float(), "past sink": past_sink[n], "tok": hessians["tok"][n].float()}
        weigh = {"local": local[n] / scale[block_of(n)], "one": torch.ones_like(fisher[n]), "fisher": fisher[n]}
        for key in sens:
            sens[key][n] = {}
        for b in WIDTHS:
            err = w - deq[(n, b, 64)]
            rows = {k: ((err @ h) * err).sum(1).double() for k, h in on.items()}
            for key, (row_weight, kind) in measures.items():
                sens[key][n][b] = float((weigh[row_weight] * rows[kind]).sum())
    shape = {n: tuple(w.shape) for n, w in weights.items()}
    numel = sum(w.numel() for w in weights.values())
    costs = {n: {b: gptq_stored_bits(b, *shape[n], 64) for b in WIDTHS} for n in weights}

    def size(bits: int, group: int) -> int:
        return sum(gptq_stored_bits(bits, *shape[n], group) for n in weights)

    variants: dict[str, tuple[dict[str, torch.Tensor], int, str]] = {}
    variants["GPTQ W4 g64 (uniform)"] = ({n: deq[(n, 4, 64)] for n in weights}, size(4, 64), "")
    plans = {}
    for budget_name, budget in [("W4 g64", size(4, 64)), ("W4 g32", size(4, 32))]:
        for key in measures:
            if budget_name == "W4 g32" and key == "hessian":
                continue
            choice = choose_bits_by_cost(sens[key], costs, budget, max_states=200_000)
            plans[(budget_name, key)] = choice
            hist = {b: sum(1 for c in choice.values() if c == b) for b in WIDTHS}
            stored = sum(costs[n][b] for n, b in choice.items())
            widths = " ".join(f"{hist[b]}×{b}" for b in WIDTHS)
            variants[f"mixed {{3,4,8}} g64, {key}, size of {budget_name}"] = (
                {n: deq[(n, b, 64)] for n, b in choice.items()},
                stored,
                widths,
            )
        if budget_name == "W4 g64":
            variants["GPTQ W4 g32 (uniform)"] = ({n: deq[(n, 4, 32)] for n in weights}, size(4, 32), "")
    note("allocations")

    models = {"fp32": ref, **{name: with_weights(ref, ws) for name, (ws, _, _) in variants.items()}}
    rows = evaluate(models, evalw, reference="fp32")  # one pass: every model on the same windows
    note("eval")
    ref_ppl = rows["fp32"]["ppl"]

    print(
        f"\nSmolLM2-135M, GPTQ sym act-order static groups on float inputs; calibration Emma {args.calib} × "
        f"{args.seq_len}; held-out Persuasion {args.windows} × {args.seq_len}; fp32 ppl {ref_ppl:.3f}; "
        f"decoder linears {numel / 1e6:.1f} M weights\n"
    )
    print("| variant | widths (count × bits) | stored MB | bits/weight | ppl | Δ ppl | KLD | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (_, stored, widths) in variants.items():
        r = rows[name]
        print(
            f"| {name} | {widths or '—'} | {stored / 8e6:.3f} | {stored / numel:.4f} | {r['ppl']:.3f} | "
            f"{100 * r['ppl_increase']:+.2f} % | {r['kld']:.4f} | {100 * r['top1']:.1f} % |"
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
