"""Would a whole-model measure make strata's own GGUF mix win? The probe's measure against an oracle, on SmolLM2.

strata's own mix (``strata plan --gguf-mix``) chooses each linear's llama.cpp type by a *block-local* sensitivity
(``workers.mixed.ggml_sensitivity``): the run's own solve's output error per channel, weighted by the block's output
Fisher F̂_r under an isotropic gradient and divided by the residual scale ē of the stream the block writes. At Q2_K it
lost to strata's file of llama.cpp's own mix on Δppl (docs/quality.md, "A mix of strata's own"). The measure a run
cannot compute is the loss's own: Σ_r F_r (ΔW H ΔWᵀ)_rr with F_r the empirical Fisher of the next-token loss at
output channel r, from one backward of the whole model. If that plan does not win either, the block-local measure is
not what holds the mix back, and a reverse block-by-block pass that would compute F_r in a run is not worth building.

On the float model and the run's calibration windows (``--calibration``, ``--cal-windows`` × ``--seq-len``): H per
linear, the empirical F_r, and the probe's F̂_r and ē per block. Every linear is solved once per candidate type by the
run's solve (``workers.methods.quantize_ggml``, gptq with ``--quant`` options; at most 512 evenly spaced rows, as the
probe), and the per-row errors are weighted by each measure:

* ``in-run``  — the probe's: Σ_r F̂_r e_r / ē (``workers.mixed.ggml_sensitivity``'s definition);
* ``fisher``  — the oracle: Σ_r F_r e_r;
* ``in-run-rest``, ``fisher-rest`` — the same with e_r measured on H without each window's first position (the
  attention sink, whose inputs to some down projections are ~500× the others' and make most of their H);
* ``fisher-tok`` — the oracle with e_r measured on H weighted per token by its loss gradient at the linear's
  output (``benchmarks.mixed.calibrate``'s ``tok``): the sink, whose output barely reaches the loss, weighs
  what its gradient says.

The solve is always on the whole H, as the run's.

Each measure's plan at each mix is the knapsack under llama.cpp's bytes (``pipeline.plan.plan_gguf_types``); its file
is solved by strata from the probe run's kept statistics (``--probe-out``: a ``benchmarks.gguf_mix_run --own-mix
--kept-statistics`` folder), into ``OUT/MEASURE/MIX/out``, and scored there beside the others:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gguf_oracle_mix --probe-out /tmp/own-out --out /tmp/oracle \\
        --mixes Q2_K --quant diag_shrink=0.3
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gguf_mix_run ... --out /tmp/own-out \\
        --peer 'strata (fisher mix)=/tmp/oracle/fisher/{mix}/out/*.gguf' \\
        --peer 'strata (in-run mix, float H)=/tmp/oracle/in-run/{mix}/out/*.gguf'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine
from benchmarks.mixed import calibrate, decoder_linears

#: measure: (its row weight, the H its e_r is measured on: benchmarks.mixed.calibrate's kinds)
MEASURES = {"in-run": ("local", "all"), "fisher": ("fisher", "all"), "in-run-rest": ("local", "rest"),
            "fisher-rest": ("fisher", "rest"), "fisher-tok": ("fisher", "tok")}  # fmt: skip


def row_errors(
    weight: torch.Tensor, hessians: dict[str, torch.Tensor], types: list[str], options: dict, max_rows: int = 512
):
    """(rows, {type: {kind: e}}) with e_r = ((W − Ŵ_t) H_kind (W − Ŵ_t)ᵀ)_rr of the run's solve on type t (on
    ``hessians["all"]``), on at most ``max_rows`` evenly spaced rows (GPTQ's rows are independent given H); types
    that cannot hold the rows are absent."""
    from strata_quant.workers.ggml import GRIDS
    from strata_quant.workers.methods import quantize_ggml

    n, cols = weight.shape
    rows = torch.linspace(0, n - 1, min(n, max_rows)).round().long()
    w = weight[rows]
    out = {}
    for t in types:
        if cols % GRIDS[t].block:
            continue
        err = w.double() - quantize_ggml("gptq", w, hessians["all"], t, options).dequantize().double()
        out[t] = {k: ((err @ h.double()) * err).sum(1) for k, h in hessians.items()}
    return rows, out


def run_calibration(config: dict):
    """(model path, tokenizer, windows) of a run's config: its calibration windows exactly as the run drew them
    (pipeline.run's draw, on the config as stored: a raw mapping, so its defaults are parse_config's)."""
    from transformers import AutoTokenizer

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import calibration_prefix, calibration_windows, load_text, tokenize_stream
    from strata_quant.pipeline.config import parse_config

    cal = parse_config(config).calibration
    path = fixtures.resolve(config["model"])
    tok = AutoTokenizer.from_pretrained(path)
    stream = tokenize_stream(tok, load_text(cal.source, cal.text_field))
    prefix = calibration_prefix(tok, cal.bos)
    windows = calibration_windows(stream, cal.num_samples, cal.seq_len, cal.sampling, cal.seed, prefix=prefix)
    return path, tok, windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe-out", required=True, help="a gguf_mix_run --own-mix --kept-statistics folder")
    ap.add_argument("--probe-mix", default="Q2_K", help="the mix whose run probed (the first of its --mixes)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mixes", default="Q2_K")
    ap.add_argument("--candidates", default="Q4_0,Q5_0,Q8_0,Q2_K,Q3_K,Q6_K")
    ap.add_argument("--quant", action="append", default=[], help="KEY=VALUE of the run's quant options")
    ap.add_argument("--measures", default=",".join(MEASURES), help=", ".join(MEASURES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def note(step: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {step}", flush=True)

    import yaml

    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.eval import load_reference
    from strata_quant.pipeline.formats.gguf_mix import linear_types
    from strata_quant.pipeline.job import run_full_job
    from strata_quant.pipeline.plan import plan_gguf_types, probe_entries, write_gguf_mix_config
    from strata_quant.pipeline.store import open_store
    from strata_quant.workers.mixed import output_fisher, residual_scale

    probe_out, out = Path(args.probe_out), Path(args.out)
    mixes, candidates, measures = args.mixes.split(","), args.candidates.split(","), args.measures.split(",")
    options = {k: float(v) for k, v in (q.split("=", 1) for q in args.quant)}
    probe = (probe_out / args.probe_mix / "run-id").read_text()
    store = open_store(str(probe_out / "store"))
    config, entries = probe_entries(store, probe)
    cal = config["calibration"]
    print(machine())
    print(f"probe run {probe}: calibration {cal['num_samples']}×{cal['seq_len']} {cal['source']}; solve {options}")

    path, _, windows = run_calibration(config)
    model = load_reference(path)
    weights = {n: m.weight.data.float().clone() for n, m in decoder_linears(model).items()}
    hs, fisher, block_inputs = calibrate(model, windows)
    note(f"calibration: H and the empirical Fisher of {len(weights)} linears over {windows.numel():,} tokens")
    local, scale = {}, {}
    for i, layer in enumerate(model.model.layers):
        names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        probe = output_fisher(layer, block_inputs.pop(i), names, seed=i)
        scale[i] = residual_scale(probe.energy)
        for n, sums in probe.fisher.items():
            local[f"model.layers.{i}.{n}"] = sums[:-1] / sums[-1]
    note("the probe's F̂ and ē per block")

    sens: dict[str, dict[str, dict]] = {m: {} for m in measures}
    for k, (n, w) in enumerate(weights.items()):
        rows, errs = row_errors(w, {k: h[n] for k, h in hs.items()}, candidates, options)
        factor = w.shape[0] / len(rows)
        block = int(n.split(".layers.")[1].split(".")[0])
        weight_of = {"local": local[n][rows] / scale[block], "fisher": fisher[n][rows]}
        for m in measures:
            row_weight, kind = MEASURES[m]
            s = {t: factor * float((weight_of[row_weight] * e[kind]).sum()) for t, e in errs.items()}
            sens[m][n] = {"shape": list(w.shape), "sensitivity": s}
        if k % 21 == 20:
            note(f"solved {k + 1}/{len(weights)} linears on {len(candidates)} types")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivities.json").write_text(json.dumps(sens))
    reader = open_checkpoint(config["model"])
    plans = {}
    for mix in mixes:
        mix_types = linear_types(reader, mix, sorted(entries))
        for m in measures:
            plan = plan_gguf_types(sens[m], mix, mix_types, candidates)
            d = out / m / mix
            cfg_path = write_gguf_mix_config(config, plan, d / "own.yaml", run_id=probe, name=f"smollm2-{mix}-{m}")
            plans[f"{m}/{mix}"] = plan.summary()
            print(f"{m} at {mix}: {plan.summary()}", flush=True)
            if next((d / "out").glob("*.gguf"), None) is None:
                data = yaml.safe_load(cfg_path.read_text())
                data["output"] |= {"dir": str(d / "out"), "overwrite": True}
                data["run"]["store"] = str(probe_out / "store")
                (check,) = run_full_job(parse_config(data), progress=False)["checks"]
                note(f"{m} at {mix}: {check['bit_exact_linears']}/{check['quantized_linears']} linears bit-exact")
    (out / "plans.json").write_text(json.dumps(plans, indent=1) + "\n")
    note("done")


if __name__ == "__main__":
    main()
