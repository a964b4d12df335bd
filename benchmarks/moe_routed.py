"""Routed against all-token expert Hessians on a SmolLM2 MoE fixture, per expert.

    .venv/bin/python -m benchmarks.moe_routed [--fixture smollm2-mixtral] [--blocks 0 15 29]
        [--tokens 1024] [--out benchmarks/results/moe-routed.json]

The hidden states entering each chosen block's MoE module are taken from the fixture in float32
on Emma (calibration) and on Persuasion (held out). Each expert's gate/up and down matrices are
quantized with GPTQ W4 g64 (act-order off, damping 0.01) under (a) its routed Hessian (the
tokens the router sends it), (b) its Hessian over every token of the block, and (c) by RTN. The
score is the relative output error tr(E H Eᵀ) / tr(W H Wᵀ) under the expert's routed Hessian on
the held-out text, i.e. on the tokens that expert will actually serve.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from strata_quant.pipeline.fixtures import austen, smollm2
from strata_quant.pipeline.moe_fixtures import smollm2_moe
from strata_quant.workers.gptq import gptq_quantize, relative_output_error
from strata_quant.workers.moe import (
    ALL_TOKENS,
    DOWN,
    GATE_UP,
    ROUTED,
    ExpertStatistics,
    add_expert_statistics,
)
from strata_quant.workers.result import QuantSpec
from strata_quant.workers.rtn import rtn_quantize


def moe_inputs(model, ids: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        model.model.layers[b].mlp.register_forward_pre_hook(lambda _m, a, b=b: seen.__setitem__(b, a[0]))
        for b in blocks
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default="smollm2-mixtral")
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/moe-routed.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(smollm2())

    def ids(novel: str) -> torch.Tensor:
        stream = tok(austen(novel).read_text()[: 8 * args.tokens]).input_ids[: args.tokens]
        return torch.tensor(stream).reshape(-1, 256)

    model = AutoModelForCausalLM.from_pretrained(smollm2_moe(args.fixture), dtype=torch.float32).eval()
    cal, held = moe_inputs(model, ids("emma"), args.blocks), moe_inputs(model, ids("persuasion"), args.blocks)
    spec = QuantSpec(bits=4, group_size=64)
    rows = []
    t0 = time.perf_counter()
    for b in args.blocks:
        moe = model.model.layers[b].mlp
        n_exp = moe.experts.gate_up_proj.shape[0]
        routed, everyone, heldout = (ExpertStatistics.empty(moe.experts) for _ in range(3))
        add_expert_statistics(moe, cal[b], routed, [ROUTED] * n_exp)
        add_expert_statistics(moe, cal[b], everyone, [ALL_TOKENS] * n_exp)
        add_expert_statistics(moe, held[b], heldout, [ROUTED] * n_exp)
        for e in range(n_exp):
            row = {"block": b, "expert": e, "cal_tokens": int(routed.counts[e]), "held_tokens": int(heldout.counts[e])}
            for which in (GATE_UP, DOWN):
                w = getattr(moe.experts, which)[e].detach()
                if heldout.accumulators[(e, which)].count == 0:
                    continue
                h_eval = heldout.hessian(e, which)
                for label, stats in (("routed", routed), ("all_tokens", everyone)):
                    if stats.accumulators[(e, which)].count == 0:
                        continue
                    q = gptq_quantize(w, stats.hessian(e, which), spec).dequantize()
                    row[f"{which}.{label}"] = relative_output_error(w, q, h_eval)
                row[f"{which}.rtn"] = relative_output_error(w, rtn_quantize(w, spec).dequantize(), h_eval)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for label in ("routed", "all_tokens", "rtn"):
        for which in (GATE_UP, DOWN):
            vals = [r[f"{which}.{label}"] for r in rows if f"{which}.{label}" in r and f"{which}.routed" in r]
            summary[f"{which}.{label}.mean"] = sum(vals) / max(len(vals), 1)
    better = sum(r[f"{w}.routed"] < r[f"{w}.all_tokens"] for r in rows for w in (GATE_UP, DOWN) if f"{w}.routed" in r)
    total = sum(f"{w}.routed" in r for r in rows for w in (GATE_UP, DOWN))
    summary["routed_better"] = f"{better}/{total}"
    out = {"args": vars(args), "machine": machine(), "seconds": time.perf_counter() - t0, "rows": rows, **summary}
    print(json.dumps(summary, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
