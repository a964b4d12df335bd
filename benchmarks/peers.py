"""strata against GPTQModel and llm-compressor, side by side (the protocol in docs/quality.md).

Three measurements:

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

* ``table`` — the side-by-side quality table on SmolLM2: fp16, RTN, GPTQ, AWQ, AWQ+GPTQ at
  W4 g64, W3 g64 and W4 g32 (``--settings``). Every tool gets the same calibration token ids
  (``--calib-windows`` × 512 of Emma, strata's own evenly spaced windows, saved to
  out/peers/calib-emma-N×512.safetensors); every result is decoded to dequantized weights
  (strata's stored results and AWQ-folded norms; GPTQModel's checkpoint through
  pipeline.formats' readers; llm-compressor's fake-quantized weights, checked on its grid)
  and scored by pipeline.eval.evaluate against the fp32 reference on the same held-out
  windows (``--eval-windows`` × 512 of each of ``--texts``: Persuasion and Mansfield Park).
  strata rows are ``strata-row`` subprocesses (pipeline.run.run_job on ``--workers`` Ray
  workers, configs/smollm2-135m-{gptq,awq,awq-gptq}-w4g64.yaml with bits / group /
  calibration overridden); GPTQModel runs in .venv-gptqmodel (benchmarks/peers_gptqmodel.py,
  its defaults), llm-compressor in .venv-llmcompressor (benchmarks/peers_llmcompressor.py,
  GPTQModifier defaults); build both with ``bash benchmarks/peers_venv.sh``. Each row is
  kept under out/peers/table/ (a rerun skips finished rows) and the table is re-printed
  after every row::

      nice .venv/bin/python benchmarks/peers.py table [--calib-windows 32] [--settings w4g64,w3g64]

  GPTQModel 7.6.0's AWQ needs CUDA ("AWQ: CUDA is not available" on CPU with any backend):
  its AWQ cells read n/a here.

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

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import calibration_windows, load_text, tokenize_stream

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
    from strata_quant.workers.gptq import gptq_quantize
    from strata_quant.workers.result import QuantSpec

    t, c = time.perf_counter(), time.thread_time()
    res = gptq_quantize(
        weight, hessian, QuantSpec(4, 64, True), damp=damp, block_size=128, act_order=act_order, static_groups=static
    )
    seconds, cpu = time.perf_counter() - t, time.thread_time() - c
    return res.dequantize(), seconds, cpu


def llmcompressor_solve(weight, hessian, *, actorder: str | None, damp: float):
    """llm-compressor's own GPTQ solve (llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight,
    what GPTQModifier calls) on W with H set directly, W4 g64 sym; its group scales from
    compressed_tensors' calculate_qparams on the group min/max (its min-max observer), computed
    before the clock starts. Returns (dequantized Q [N, K] float32, wall s, this thread's CPU s)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    qa = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64, actorder=actorder)
    n, k = weight.shape
    groups = weight.reshape(n, k // 64, 64)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), qa)
    w, h = weight.unsqueeze(0).clone(), hessian.unsqueeze(0).clone()
    t, c = time.perf_counter(), time.thread_time()
    q, *_ = quantize_weight(w, h, scale.unsqueeze(0), zero.unsqueeze(0), None, qa, blocksize=128, percdamp=damp)
    return q[0].float(), time.perf_counter() - t, time.thread_time() - c


def solve(args) -> None:
    if args.peer == "llmcompressor":
        import llmcompressor as peer_module

        peer_solve, peer_name = llmcompressor_solve, "llm-compressor"
    else:
        import gptqmodel as peer_module

        peer_solve, peer_name = gptqmodel_solve, "GPTQModel"
    import torch
    from safetensors.torch import load_file

    from benchmarks.common import machine
    from strata_quant.workers.gptq import relative_output_error

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
    if args.peer == "llmcompressor":  # its GPTQ has no dynamic-group act-order: plain and static only
        settings = [
            ("plain, damp .01", settings[0][1], {"actorder": None, "damp": 0.01}),
            ("act-order static, damp .01", settings[2][1], {"actorder": "static", "damp": 0.01}),
        ]
    print(f"# machine: {machine()}; load avg {os.getloadavg()[0]:.1f}")
    print(
        f"# torch {torch.__version__}, {peer_name} {peer_module.__version__}, torch threads {torch.get_num_threads()}"
    )
    print(f"# H: {path.name}; W4 g64 sym, block_size 128; median of {args.repeats} runs each")
    if args.peer == "gptqmodel":
        print("# GPTQModel defaults: damp_percent 0.05, act_group_aware (GAR) on; strata: damp 0.01, no act-order")
    header = (
        f"| linear | setting | strata s | {peer_name} s | ratio | strata CPU s | {peer_name} CPU s | CPU ratio "
        f"| strata err | {peer_name} err |"
    )
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    w, h = data[f"{LINEARS[0]}.W"], data[f"{LINEARS[0]}.H"]
    strata_solve(w, h, **settings[0][1])  # untimed warm-up of both (first-call allocations, lazy imports)
    peer_solve(w, h, **settings[0][2])
    for name in LINEARS:
        w, h = data[f"{name}.W"], data[f"{name}.H"]
        for label, skw, gkw in settings:
            st, gt, sc, gc = [], [], [], []
            for _ in range(args.repeats):  # interleaved, so load drift hits both alike
                sq, s, c = strata_solve(w, h, **skw)
                st.append(s)
                sc.append(c)
                gq, s, c = peer_solve(w, h, **gkw)
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
    print(f"# ratio = {peer_name} / strata (> 1: strata faster). err = tr(E H Eᵀ)/tr(W H Wᵀ), E = W − Ŵ;")
    print(f"# strata's Ŵ uses its fp16 scales, {peer_name}'s Ŵ is its returned Q (its own scale dtype).")


# ---------------------------------------------------------------------------- quality


def quality(args) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from benchmarks.common import machine
    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream
    from strata_quant.pipeline.eval import evaluate, load_reference, with_weights
    from strata_quant.pipeline.formats.gptq import unpack_linear

    torch.set_num_threads(args.threads)
    model_dir = fixtures.resolve(args.model)
    tag = "" if args.model == "fixture:smollm2-135m" else f"-{model_dir.name}"
    tok = AutoTokenizer.from_pretrained(model_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    ids_path = calibration_ids(model_dir, args.calib_windows, tag)
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


# ---------------------------------------------------------------------------- the side-by-side table

SETTINGS = {"w4g64": (4, 64), "w3g64": (3, 64), "w4g32": (4, 32), "w4g128": (4, 128)}
STRATA_CONFIGS = {  # each method's shipped config; bits / group / calibration overridden per row
    "gptq": "configs/smollm2-135m-gptq-w4g64.yaml",
    "awq": "configs/smollm2-135m-awq-w4g64.yaml",
    "awq_gptq": "configs/smollm2-135m-awq-gptq-w4g64.yaml",
}
# (tool, method) in the order they are produced; RTN and fp16 need no quantization run
PLAN = (
    ("strata", "gptq"),
    ("gptqmodel", "gptq"),
    ("llmcompressor", "gptq"),
    ("strata", "awq"),
    ("gptqmodel", "awq"),
    ("llmcompressor", "awq"),
    ("strata", "awq_gptq"),
    ("llmcompressor", "awq_gptq"),
)
TOOL_NAMES = {"strata": "strata", "gptqmodel": "GPTQModel 7.6.0", "llmcompressor": "llm-compressor 0.14"}
METHOD_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "awq_gptq": "AWQ+GPTQ"}


EMMA = "fixture:austen/emma"


def text_tag(source: str) -> str:
    """A file-name tag for a calibration text: ``emma``, ``calib-mix``, a file's stem."""
    return source.rsplit("/", 1)[-1].split(":")[-1].rsplit(".", 1)[0]


def calibration_tag(text: str) -> str:
    """The suffix of a row's file and run name calibrated on ``text``: none for the protocol's Emma."""
    return "" if text == EMMA else f"-{text_tag(text)}"


def calibration_ids(model_dir: Path, windows: int, tag: str, text: str = EMMA) -> Path:
    """strata's calibration token ids (``text``, evenly spaced windows, each starting with the
    tokenizer's prompt prefix, as pipeline.run.prepare builds them under ``calibration.bos: auto``)
    saved for the peers, so every tool sees the very same ids."""
    path = OUT / f"calib-{text_tag(text)}-{windows}x{SEQ_LEN}{tag}.safetensors"
    save_calibration_ids(model_dir, path, windows, text=text, prefixed=True)
    return path


def save_calibration_ids(
    model_dir: Path,
    path: Path,
    windows: int,
    seq_len: int = SEQ_LEN,
    text: str = EMMA,
    prefixed: bool = False,
):
    """``windows`` evenly spaced windows of ``seq_len`` tokens of ``text`` in ``model_dir``'s tokenizer,
    saved as safetensors ``{input_ids: int64 [N, T]}``; ``prefixed``: each window starts with the
    tokenizer's own prompt prefix, as the run's ``bos: auto`` (none for SmolLM2). Returns the ids."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from strata_quant.pipeline.calibration import calibration_prefix, calibration_windows, load_text, tokenize_stream

    tok = AutoTokenizer.from_pretrained(model_dir)
    prefix = calibration_prefix(tok) if prefixed else ()
    ids = calibration_windows(tokenize_stream(tok, load_text(text)), windows, seq_len, "even", 0, prefix=prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.contiguous()}, str(path))  # no metadata: family_peers compares the files by sha256
    return ids


def parse_quant(items: list[str] | None) -> dict:
    """``KEY=VALUE`` solver overrides of the config's ``quant:`` section (values read as YAML:
    ``diag_shrink=0.2`` is a float, ``act_order=false`` a bool), in the order given."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--quant takes KEY=VALUE (a key of the config's quant: section), got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def quant_tag(quant: dict) -> str:
    """A file-name tag for solver overrides: ``diag_shrink0.2-mse_weighthessian``."""
    return "-".join(f"{k}{v}" for k, v in quant.items()).replace("/", "_")


def strata_row(args) -> None:
    """One strata run (pipeline.run.run_job: Ray workers, the run store) of ``--method`` at
    ``--bits`` / ``--group-size`` with ``--calib-windows`` windows of ``--calibration`` (Emma), its
    dequantized results (and AWQ's folded norms) written as a row file for ``table``."""
    from safetensors.torch import save_file

    from strata_quant.pipeline.assemble import quantized_only
    from strata_quant.pipeline.config import load_config
    from strata_quant.pipeline.run import run_job

    overrides = {
        "name": f"peers-{args.method.replace('_', '-')}-w{args.bits}g{args.group_size}-c{args.calib_windows}",
        "model": args.model,
        "calibration.source": args.calibration,
        "calibration.num_samples": args.calib_windows,
        "calibration.seq_len": SEQ_LEN,
        "quant.bits": args.bits,
        "quant.group_size": args.group_size,
        "run.workers": args.workers,
        "run.batch_size": max(1, min(8, args.calib_windows // args.workers)),
        "run.store": str(OUT / "runs"),
        "output.formats": [],  # nothing is assembled (the AWQ format would refuse 3-bit grids)
        "eval": None,
    }
    quant = parse_quant(getattr(args, "quant", None))
    if quant:  # solver overrides: their own run name, so a stored run is not resumed under them
        overrides["name"] += "-" + quant_tag(quant)
    overrides["name"] += calibration_tag(args.calibration)  # so is another calibration text
    cfg = load_config(ROOT / STRATA_CONFIGS[args.method], {**overrides, **{f"quant.{k}": v for k, v in quant.items()}})
    outcome = run_job(cfg, progress=False)
    results = quantized_only(outcome.store, outcome.records)
    tensors = {f"linear:{n}": results.get(n).dequantize().float().contiguous() for n in results.entries}
    for n in results.floats:
        tensors[f"float:{n}"] = results.float_tensor(outcome.reader, n).float().contiguous()
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.partial")
    save_file(tensors, str(tmp))
    os.replace(tmp, out)
    info = {"tool": "strata", "run_id": outcome.run_id, "quantize_s": outcome.wall_s, "phase_s": outcome.phase_s}
    info.update(method=args.method, bits=args.bits, group_size=args.group_size, workers=args.workers, quant=quant)
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def gptqmodel_row_tensors(folder: Path, method: str) -> dict:
    """A GPTQModel checkpoint decoded with strata's own readers (pipeline.formats): every
    quantized linear dequantized, and the decoder norms as saved (AWQ folds scales into them)."""
    from safetensors.torch import load_file

    from strata_quant.pipeline.formats import awq as awq_format
    from strata_quant.pipeline.formats.gptq import unpack_linear

    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    out = {}
    for p in prefixes:
        if method == "awq":
            out[f"linear:{p}"] = awq_format.unpack_linear(tensors, p, int(qcfg["group_size"])).float()
        else:
            fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
            out[f"linear:{p}"] = unpack_linear(tensors, p, int(qcfg["bits"]), fmt).float()
    for k, v in tensors.items():
        if k.startswith("model.layers.") and k.endswith("norm.weight"):
            out[f"float:{k}"] = v.float()
    return out


def produce_row(tool: str, method: str, bits: int, group: int, args, ids_path: Path, model_dir: Path) -> Path:
    """Runs one quantization (in its tool's venv) unless its row file exists; returns the file."""
    tag = "" if args.model == "fixture:smollm2-135m" else f"-{model_dir.name}"
    quant = parse_quant(getattr(args, "quant", None)) if tool == "strata" else {}
    calibration = getattr(args, "calibration", EMMA)
    stem = f"{tool}-{method}-w{bits}g{group}-c{args.calib_windows}{tag}" + (f"-{quant_tag(quant)}" if quant else "")
    stem += calibration_tag(calibration)
    row = OUT / "table" / f"{stem}.safetensors"
    if row.is_file():
        return row
    row.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    t = time.perf_counter()
    if tool == "strata":
        cmd = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "strata-row", "--method", method]
        cmd += ["--bits", str(bits), "--group-size", str(group), "--calib-windows", str(args.calib_windows)]
        cmd += ["--model", args.model, "--workers", str(args.workers), "--out", str(row), "--calibration", calibration]
        cmd += [f"--quant={q}" for q in getattr(args, "quant", None) or []]
        subprocess.run(cmd, check=True, env=env)
    elif tool == "llmcompressor":
        cmd = [
            str(ROOT / ".venv-llmcompressor" / "bin" / "python"),
            str(ROOT / "benchmarks" / "peers_llmcompressor.py"),
        ]
        cmd += ["--model", str(model_dir), "--ids", str(ids_path), "--out", str(row), "--bits", str(bits)]
        cmd += ["--group-size", str(group), "--threads", str(args.threads), "--method", method]
        if method == "awq":  # the same grid as strata's AWQ row (asymmetric, as AWQ is usually run)
            cmd.append("--asym")
        subprocess.run(cmd, check=True, env=env)
    else:
        folder = OUT / "table" / stem
        cmd = [str(ROOT / ".venv-gptqmodel" / "bin" / "python"), str(ROOT / "benchmarks" / "peers_gptqmodel.py")]
        cmd += ["--model", str(model_dir), "--ids", str(ids_path), "--out", str(folder), "--method", method]
        cmd += ["--bits", str(bits), "--group-size", str(group), "--threads", str(args.threads), "--dtype", "float32"]
        if not (folder / "peers-gptqmodel.json").is_file():  # a finished checkpoint is decoded, not redone
            subprocess.run(cmd, check=True, env={**env, "GPTQMODEL_CPU_WORKERS": str(args.threads)})
        from safetensors.torch import save_file

        save_file(gptqmodel_row_tensors(folder, method), str(row))
        meta = json.loads((folder / "peers-gptqmodel.json").read_text())
        row.with_suffix(".json").write_text(json.dumps({"tool": "gptqmodel", **meta}, indent=1))
    print(f"# {stem}: produced in {time.perf_counter() - t:.0f} s wall", flush=True)
    return row


def row_model(ref, tensors: dict):
    """The reference model with a row's linears (and folded floats) swapped in."""
    from strata_quant.pipeline.eval import with_weights

    model = with_weights(ref, {k[len("linear:") :]: v for k, v in tensors.items() if k.startswith("linear:")})
    state = model.state_dict()
    for k, v in tensors.items():
        if k.startswith("float:"):
            state[k[len("float:") :]].copy_(v)
    return model


def render_table(results: dict, texts: list[str], calib: str) -> str:
    lines = []
    for text in texts:
        ref = results.get("fp16", {}).get(text)
        lines.append(f"\nheld-out {text} (ppl, Δ vs fp16); calibration {calib} of Emma, the same ids for every tool\n")
        lines.append(
            "| method | bits/group | strata ppl | GPTQModel 7.6.0 ppl | llm-compressor 0.14 ppl "
            "| strata Δ / best peer Δ | quantize s (strata / GPTQModel / llm-compressor) |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        if ref:
            lines.append(f"| fp16 | 16 | {ref['ppl']:.3f} | {ref['ppl']:.3f} | {ref['ppl']:.3f} | — | — |")
        for setting, (bits, group) in SETTINGS.items():
            for method in ("rtn", "gptq", "awq", "awq_gptq"):
                cells, deltas, secs = [], {}, []
                for tool in ("strata", "gptqmodel", "llmcompressor"):
                    r = results.get(f"{tool}-{method}-{setting}")
                    if r is None or text not in r:
                        cells.append((r or {}).get("status", "—"))
                        secs.append("—")
                        continue
                    e = r[text]
                    cells.append(f"{e['ppl']:.3f} ({e['ppl_increase'] * 100:+.1f}%)")
                    deltas[tool] = e["ppl_increase"]
                    secs.append(f"{r['quantize_s']:.0f}" if r.get("quantize_s") is not None else "—")
                if all(c == "—" for c in cells):
                    continue
                peers = [deltas[t] for t in ("gptqmodel", "llmcompressor") if t in deltas]
                ratio = f"{deltas['strata'] / min(peers):.2f}×" if peers and "strata" in deltas else "—"
                lines.append(
                    f"| {METHOD_NAMES[method]} | W{bits} g{group} | {cells[0]} | {cells[1]} | {cells[2]} "
                    f"| {ratio} | {' / '.join(secs)} |"
                )
    return "\n".join(lines)


def table(args) -> None:
    """The side-by-side table: every row quantized with the same calibration ids, decoded into
    dequantized weights and scored by pipeline.eval.evaluate on the same held-out windows."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from benchmarks.common import machine
    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream
    from strata_quant.pipeline.eval import evaluate, load_reference, rtn_weights, with_weights
    from strata_quant.workers.result import QuantSpec

    torch.set_num_threads(args.threads)
    model_dir = fixtures.resolve(args.model)
    tag = "" if args.model == "fixture:smollm2-135m" else f"-{model_dir.name}"
    ids_path = calibration_ids(model_dir, args.calib_windows, tag)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = args.texts.split(",")
    windows = {t: eval_windows(tokenize_stream(tok, load_text(t)), args.eval_windows, SEQ_LEN) for t in texts}
    ref = load_reference(model_dir)
    res_path = OUT / "table" / f"results-c{args.calib_windows}-e{args.eval_windows}{tag}.json"
    res_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    calib = f"{args.calib_windows} × {SEQ_LEN}"
    print(f"# machine: {machine()}; torch threads {args.threads}; load avg {os.getloadavg()[0]:.1f}", flush=True)

    def score(key: str, model, extra: dict) -> None:
        entry = dict(extra)
        for text, w in windows.items():
            rows = evaluate({"ref": ref, key: model}, w, reference="ref")
            entry[text] = {k: rows[key][k] for k in ("ppl", "ppl_increase", "kld", "top1")}
            entry[text]["ref_ppl"] = rows["ref"]["ppl"]
        results[key] = entry
        res_path.write_text(json.dumps(results, indent=1))
        print(f"# {key}: " + ", ".join(f"{t} {entry[t]['ppl']:.3f}" for t in texts), flush=True)
        print(render_table(results, texts, calib), flush=True)

    if any(t not in results.get("fp16", {}) for t in texts):  # a text added since: score it too
        entry = results.get("fp16", {})
        for text, w in windows.items():
            row = evaluate({"ref": ref}, w, reference="ref")["ref"]
            entry[text] = {"ppl": row["ppl"], "ppl_increase": 0.0, "kld": 0.0, "top1": 1.0, "ref_ppl": row["ppl"]}
        results["fp16"] = entry
    settings = [s for s in args.settings.split(",")]
    for setting in settings:
        bits, group = SETTINGS[setting]
        key = f"strata-rtn-{setting}"
        if any(t not in results.get(key, {}) for t in texts):
            score(key, with_weights(ref, rtn_weights(ref, QuantSpec(bits, group, True))), {"quantize_s": None})
    for setting in settings:
        bits, group = SETTINGS[setting]
        for tool, method in PLAN:
            if args.tools and tool not in args.tools.split(","):
                continue
            if args.methods and method not in args.methods.split(","):
                continue
            key = f"{tool}-{method}-{setting}"
            if key in results and "status" not in results[key] and all(t in results[key] for t in texts):
                continue  # a row lacking a text is re-scored from its saved weights
            if tool == "gptqmodel" and method == "awq":
                # GPTQModel 7.6.0's AWQ raises "AWQ: CUDA is not available" on CPU, with any backend
                results[key] = {"status": "n/a (needs CUDA)"}
                continue
            try:
                row = produce_row(tool, method, bits, group, args, ids_path, model_dir)
            except subprocess.CalledProcessError as err:
                results[key] = {"status": f"failed (exit {err.returncode})"}
                res_path.write_text(json.dumps(results, indent=1))
                print(f"# {key}: FAILED ({err})", flush=True)
                continue
            meta_path = row.with_suffix(".json")
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            score(key, row_model(ref, load_file(str(row))), {"quantize_s": meta.get("quantize_s"), "meta": meta})
    print(render_table(results, texts, calib))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["solve", "hessians", "table", "strata-row"], default="solve")
    parser.add_argument("--quality", action="store_true", help="GPTQModel on the whole model, then ppl (main venv)")
    parser.add_argument("--peer", choices=["gptqmodel", "llmcompressor"], default="gptqmodel", help="solve: against")
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
    parser.add_argument("--settings", default="w4g64,w3g64,w4g32", help="table: which of w4g64,w3g64,w4g32")
    parser.add_argument("--tools", default="", help="table: only these tools (strata,gptqmodel,llmcompressor)")
    parser.add_argument("--methods", default="", help="table: only these methods (gptq,awq,awq_gptq)")
    parser.add_argument("--texts", default="fixture:austen/persuasion,fixture:austen/mansfieldpark")
    parser.add_argument("--workers", type=int, default=2, help="table: strata's Ray workers")
    parser.add_argument("--method", default="gptq", help="strata-row: gptq, awq or awq_gptq")
    parser.add_argument("--bits", type=int, default=4, help="strata-row")
    parser.add_argument("--group-size", type=int, default=64, help="strata-row")
    parser.add_argument("--out", help="strata-row: the row file to write")
    parser.add_argument("--quant", action="append", help="strata-row: KEY=VALUE of the config's quant: section")
    parser.add_argument("--calibration", default=EMMA, help="strata-row: the calibration text (calibration.source)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import benchmarks  # noqa: F401  (binds strata_quant to this checkout where it is not installed)

    if args.quality:
        args.threads = args.threads or 2
        quality(args)
    elif args.mode == "table":
        args.threads = args.threads or 2
        table(args)
    elif args.mode == "strata-row":
        strata_row(args)
    elif args.mode == "hessians":
        print(collect_hessians(args.block, args.calib, threads=args.threads or 2))
    else:
        args.threads = args.threads or 1
        solve(args)


if __name__ == "__main__":
    main()
