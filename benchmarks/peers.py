"""strata against GPTQModel, side by side (MEASURE.md protocol).

Two measurements:

* ``solve`` — the GPTQ solve of one linear: strata's ``gptq_quantize`` against GPTQModel's
  own ``GPTQ.quantize`` on the same W and the same H, same torch thread count, median of
  ``--repeats`` runs each, with and without act-order; plus the relative output error
  tr(E H Eᵀ) / tr(W H Wᵀ) of both results on that H. W is SmolLM2 block ``--block``'s
  ``mlp.down_proj`` [576×1536] and ``self_attn.q_proj`` [576×576] from the fp16 checkpoint;
  H = 2·XᵀX / n from ``--calib`` windows × 512 tokens of Emma (calibration_windows) through
  the fp32 model, captured with forward pre-hooks (cached under out/peers/). Runs in the
  venv that has gptqmodel (strata's workers/ only need torch)::

      GPTQMODEL_CPU_WORKERS=2 PYTHONPATH=. .venv-gptqmodel/bin/python benchmarks/peers.py solve

* ``--quality`` — GPTQModel GPTQ W4 g64 sym on the whole of SmolLM2 with strata's exact
  calibration ids (64 × 512 of Emma), its checkpoint decoded with
  pipeline.formats.gptq.unpack_linear, the fake-quant model scored on Persuasion (32 × 512)
  against the fp32 reference with pipeline.eval.evaluate. Runs in the main venv; the
  quantization itself runs in .venv-gptqmodel (benchmarks/peers_gptqmodel.py)::

      .venv/bin/python benchmarks/peers.py --quality [--threads 2] [--dtype auto|float32|float16|bfloat16]

  (smoke test of the same path: --model fixture:tiny-llama --calib-windows 4 --eval-windows 2)

GPTQModel's solve is fed H directly (its ``H`` / ``nsamples`` attributes, as its own
``materialize_global_hessian`` leaves them), so both solvers see bit-identical Hessians.
GPTQModel's GPTQ defaults differ from strata's (damp 0.05 vs 0.01, and "act_group_aware"
reordering on when desc_act is off); the solve table pins both to the same damp and plain
or desc-act ordering, and adds one row with GPTQModel's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "peers"
SEQ_LEN = 512
LINEARS = ("self_attn.q_proj", "mlp.down_proj")


# ---------------------------------------------------------------------------- Hessians


def collect_hessians(block: int, windows: int, threads: int) -> Path:
    """W and H = 2·XᵀX / n of block ``block``'s q_proj and down_proj; cached safetensors."""
    import torch
    from safetensors.torch import load_file, save_file

    path = OUT / f"hessians-b{block}-c{windows}x{SEQ_LEN}.safetensors"
    if path.is_file():
        return path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import fixtures
    from pipeline.calibration import calibration_windows, load_text, tokenize_stream

    torch.set_num_threads(threads)
    model_dir = fixtures.smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = calibration_windows(tokenize_stream(tok, load_text("fixture:austen/emma")), windows, SEQ_LEN)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layer = model.model.layers[block]
    modules = {name: layer.get_submodule(name) for name in LINEARS}
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in modules.items()}
    count = dict.fromkeys(LINEARS, 0)

    class Stop(Exception):
        pass

    def hook(name):
        def pre(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] += (x.t() @ x).double()
            count[name] += x.shape[0]
            if name == LINEARS[-1]:
                raise Stop  # nothing after this block's down_proj is needed

        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    t = time.perf_counter()
    with torch.no_grad():
        for row in ids:
            try:
                model(input_ids=row.unsqueeze(0))
            except Stop:
                pass
    for h in handles:
        h.remove()
    print(f"# Hessians of block {block} from {windows}×{SEQ_LEN} Emma tokens: {time.perf_counter() - t:.1f} s")
    weights = load_file(str(model_dir / "model.safetensors"))
    tensors = {}
    for name in LINEARS:
        tensors[f"{name}.H"] = (sums[name] * (2.0 / count[name])).float().contiguous()
        tensors[f"{name}.W"] = weights[f"model.layers.{block}.{name}.weight"].float().contiguous()
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"tokens": str(count[LINEARS[0]]), "block": str(block)})
    return path


# ---------------------------------------------------------------------------- solve timing


def gptqmodel_solve(weight, hessian, *, desc_act: bool, damp: float | None, group_aware: bool | None, static: bool):
    """GPTQModel's own GPTQ.quantize on an nn.Linear carrying W, with H set directly.
    Returns (dequantized Q [N, K] float32, wall seconds, this thread's CPU seconds)."""
    import torch
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    kw = {"bits": 4, "group_size": 64, "sym": True, "desc_act": desc_act, "static_groups": static}
    if damp is not None:
        kw["damp_percent"] = damp
    if group_aware is not None:
        kw["act_group_aware"] = group_aware
    qcfg = QuantizeConfig(**kw)
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight.clone()
    g = GPTQ(lin, qcfg)
    g.quantizer.configure(perchannel=True)  # as GPTQModel's GPTQProcessor does
    g.H = hessian.clone()  # quantize() edits H in place
    g.nsamples = g._hessian_total_samples = g.expected_nsamples = 8192
    g._hessian_dirty = False
    t, c = time.perf_counter(), time.thread_time()
    q, *_ = g.quantize(blocksize=128)
    return q.float(), time.perf_counter() - t, time.thread_time() - c


def strata_solve(weight, hessian, *, act_order: bool, damp: float, static: bool):
    from workers.gptq import gptq_quantize
    from workers.result import QuantSpec

    t, c = time.perf_counter(), time.thread_time()
    res = gptq_quantize(
        weight, hessian, QuantSpec(4, 64, True), damp=damp, block_size=128, act_order=act_order, static_groups=static
    )
    seconds, cpu = time.perf_counter() - t, time.thread_time() - c
    return res.dequantize(), seconds, cpu


def solve(args) -> None:
    import gptqmodel
    import torch
    from safetensors.torch import load_file

    from benchmarks.common import machine
    from workers.gptq import relative_output_error

    path = collect_hessians(args.block, args.calib, threads=2)
    data = load_file(str(path))
    torch.set_num_threads(args.threads)
    # (label, strata kwargs, GPTQModel kwargs)
    settings = [
        (
            "plain, damp .01",
            {"act_order": False, "damp": 0.01, "static": True},
            {"desc_act": False, "damp": 0.01, "group_aware": False, "static": False},
        ),
        (
            "act-order, damp .01",
            {"act_order": True, "damp": 0.01, "static": False},
            {"desc_act": True, "damp": 0.01, "group_aware": False, "static": False},
        ),
        (
            "act-order static, damp .01",
            {"act_order": True, "damp": 0.01, "static": True},
            {"desc_act": True, "damp": 0.01, "group_aware": False, "static": True},
        ),
        (
            "each tool's defaults",
            {"act_order": False, "damp": 0.01, "static": True},
            {"desc_act": False, "damp": None, "group_aware": None, "static": False},
        ),
    ]
    print(f"# machine: {machine()}; load avg {os.getloadavg()[0]:.1f}")
    print(f"# torch {torch.__version__}, gptqmodel {gptqmodel.__version__}, torch threads {torch.get_num_threads()}")
    print(f"# H: {path.name}; W4 g64 sym, block_size 128; median of {args.repeats} runs each")
    print("# GPTQModel defaults: damp_percent 0.05, act_group_aware (GAR) on; strata defaults: damp 0.01, no act-order")
    header = (
        "| linear | setting | strata s | GPTQModel s | ratio | strata CPU s | GPTQModel CPU s | CPU ratio "
        "| strata err | GPTQModel err |"
    )
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    w, h = data[f"{LINEARS[0]}.W"], data[f"{LINEARS[0]}.H"]
    strata_solve(w, h, **settings[0][1])  # untimed warm-up of both (first-call allocations, lazy imports)
    gptqmodel_solve(w, h, **settings[0][2])
    for name in LINEARS:
        w, h = data[f"{name}.W"], data[f"{name}.H"]
        for label, skw, gkw in settings:
            st, gt, sc, gc = [], [], [], []
            for _ in range(args.repeats):  # interleaved, so load drift hits both alike
                sq, s, c = strata_solve(w, h, **skw)
                st.append(s)
                sc.append(c)
                gq, s, c = gptqmodel_solve(w, h, **gkw)
                gt.append(s)
                gc.append(c)
            s_med, g_med = statistics.median(st), statistics.median(gt)
            s_cpu, g_cpu = statistics.median(sc), statistics.median(gc)
            s_err, g_err = relative_output_error(w, sq, h), relative_output_error(w, gq, h)
            shape = "×".join(map(str, w.shape))
            rows.append(
                f"| {name} [{shape}] | {label} | {s_med:.3f} | {g_med:.3f} | {g_med / s_med:.2f}× "
                f"| {s_cpu:.3f} | {g_cpu:.3f} | {g_cpu / s_cpu:.2f}× | {s_err:.5f} | {g_err:.5f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    print("# s = median wall seconds; CPU s = median CPU seconds of the calling thread (torch runs 1 thread,")
    print("# so this is the solve's own work, less sensitive to other jobs on the machine).")
    print("# ratio = GPTQModel / strata (> 1: strata faster). err = tr(E H Eᵀ)/tr(W H Wᵀ), E = W − Ŵ;")
    print("# strata's Ŵ uses its fp16 scales, GPTQModel's Ŵ is its returned Q (fp32 scales, before packing).")


# ---------------------------------------------------------------------------- quality


def quality(args) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from benchmarks.common import machine
    from pipeline import fixtures
    from pipeline.calibration import calibration_windows, eval_windows, load_text, tokenize_stream
    from pipeline.eval import evaluate, load_reference, with_weights
    from pipeline.formats.gptq import unpack_linear

    torch.set_num_threads(args.threads)
    model_dir = fixtures.resolve(args.model)
    tag = "" if args.model == "fixture:smollm2-135m" else f"-{model_dir.name}"
    tok = AutoTokenizer.from_pretrained(model_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    ids_path = OUT / f"calib-emma-{args.calib_windows}x{SEQ_LEN}{tag}.safetensors"
    calib = calibration_windows(tokenize_stream(tok, load_text("fixture:austen/emma")), args.calib_windows, SEQ_LEN)
    save_file({"input_ids": calib.contiguous()}, str(ids_path))
    folder = OUT / f"gptqmodel-w4g64-{'desc' if args.desc_act else 'plain'}-{args.dtype}-c{args.calib_windows}{tag}"
    if args.requantize or not (folder / "config.json").is_file():
        cmd = [
            str(ROOT / ".venv-gptqmodel" / "bin" / "python"),
            str(ROOT / "benchmarks" / "peers_gptqmodel.py"),
            "--model",
            str(model_dir),
            "--ids",
            str(ids_path),
            "--out",
            str(folder),
            "--threads",
            str(args.threads),
            "--dtype",
            args.dtype,
        ] + (["--desc-act"] if args.desc_act else [])
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(args.threads), "PYTHONPATH": str(ROOT)}
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        print(f"# GPTQModel subprocess wall time: {time.perf_counter() - t:.1f} s")
    meta = json.loads((folder / "peers-gptqmodel.json").read_text())
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    bits = int(qcfg["bits"])
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    weights = {p: unpack_linear(tensors, p, bits, fmt) for p in prefixes}
    g_idx_sorted = all(bool((tensors[f"{p}.g_idx"].diff() >= 0).all()) for p in prefixes)
    print(
        f"# checkpoint: {folder.name}, checkpoint_format {fmt!r}, bits {bits}, group_size {qcfg['group_size']}, "
        f"sym {qcfg.get('sym')}, desc_act {qcfg.get('desc_act')}, {len(prefixes)} quantized linears, "
        f"g_idx monotone in all: {g_idx_sorted}"
    )
    ref = load_reference(model_dir)
    fq = with_weights(ref, weights)
    evalw = eval_windows(tokenize_stream(tok, load_text("fixture:austen/persuasion")), args.eval_windows, SEQ_LEN)
    t = time.perf_counter()
    rows = evaluate({"ref (fp32)": ref, "GPTQModel GPTQ W4 g64 sym": fq}, evalw, reference="ref (fp32)")
    eval_s = time.perf_counter() - t
    print(f"# machine: {machine()}; torch threads {torch.get_num_threads()}; load avg {os.getloadavg()[0]:.1f}")
    print("| model | Persuasion ppl | Δ vs ref | KLD | top-1 | quantize s (GPTQModel's quantize()) |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        qs = f"{meta['quantize_s']:.0f}" if name != "ref (fp32)" else "—"
        print(
            f"| {name} | {row['ppl']:.2f} | {row['ppl_increase'] * 100:+.1f}% | {row['kld']:.4f} "
            f"| {row['top1']:.3f} | {qs} |"
        )
    print(f"# eval wall time {eval_s:.0f} s ({args.eval_windows}×{SEQ_LEN} Persuasion, two models)")
    print(f"# GPTQModel run: {json.dumps(meta)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["solve", "hessians"], default="solve")
    parser.add_argument("--quality", action="store_true", help="GPTQModel on the whole model, then ppl (main venv)")
    parser.add_argument("--block", type=int, default=15)
    parser.add_argument("--calib", type=int, default=16, help="windows of 512 Emma tokens for H (solve)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (solve: 1, quality: 2)")
    parser.add_argument("--desc-act", action="store_true", help="quality: GPTQModel with desc_act=True")
    parser.add_argument("--model", default="fixture:smollm2-135m", help="quality: checkpoint (fixture or path)")
    parser.add_argument("--calib-windows", type=int, default=64, help="quality: Emma windows for GPTQModel")
    parser.add_argument("--eval-windows", type=int, default=32, help="quality: Persuasion windows")
    parser.add_argument("--dtype", default="auto", help="quality: GPTQModel load dtype (auto = its own choice)")
    parser.add_argument("--requantize", action="store_true", help="quality: redo GPTQModel even if saved")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.quality:
        args.threads = args.threads or 2
        quality(args)
    elif args.mode == "hessians":
        print(collect_hessians(args.block, args.calib, threads=args.threads or 2))
    else:
        args.threads = args.threads or 1
        solve(args)


if __name__ == "__main__":
    main()
