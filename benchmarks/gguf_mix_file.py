"""A whole llama.cpp mix file with strata's GPTQ solves in it, against llama.cpp's own file of that mix.

llama.cpp lays the file out: llama_model_quantize (the code of llama-quantize) writes the mix from
the model's GGUF, which fixes every tensor's type (its per-tensor rules and fallbacks), the
metadata, norms and the embedding. strata then overwrites the data of every decoder linear, in
place and in the same type, with GPTQ on that type's grid (workers/ggml.py), solved with the
Hessian of the linear's input on the calibration windows (float propagation: the float model's
inputs), packed by pipeline/formats/gguf_quants.py (attn_q / attn_k rows in llama.cpp's rotary
order). Where llama.cpp's tools are built (benchmarks/llamacpp_tools.sh), the same mix is also made
by llama-quantize with an importance matrix of the same statistics (mean x² per input).

Every file is scored in llama.cpp (llama-cpp-python) by MEASURE.md: 32 windows of 512 tokens of
Persuasion, each from an empty context; Δppl against the source GGUF (the reference weights).

    python -m benchmarks.gguf_mix_file --mixes Q4_K_M,Q3_K_M --out /tmp/mixes
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine
from strata_quant.pipeline.formats.gguf import permute_qk_rows
from strata_quant.pipeline.formats.gguf_quants import pack
from strata_quant.workers.ggml import GRIDS, gptq_ggml

# GGUF linear → (HF module under model.layers.N, HF module whose input it reads)
LINEARS = {
    "attn_q": ("self_attn.q_proj", "self_attn.q_proj"),
    "attn_k": ("self_attn.k_proj", "self_attn.q_proj"),
    "attn_v": ("self_attn.v_proj", "self_attn.q_proj"),
    "attn_output": ("self_attn.o_proj", "self_attn.o_proj"),
    "ffn_gate": ("mlp.gate_proj", "mlp.gate_proj"),
    "ffn_up": ("mlp.up_proj", "mlp.gate_proj"),
    "ffn_down": ("mlp.down_proj", "mlp.down_proj"),
}
TOOLS = Path(os.environ.get("STRATA_LLAMACPP_DIR", Path.home() / ".cache/strata/llama.cpp")) / "bin"


def collect(model, windows: torch.Tensor) -> tuple[dict[tuple[int, str], torch.Tensor], int]:
    """Σ xᵀx (float64) of every distinct linear input, by (layer, HF input module), over the windows."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for path in {src for _, src in LINEARS.values()}:

            def hook(_m, inp, key=(i, path)):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                g = (x.t() @ x).double()
                sums[key] = sums[key] + g if key in sums else g

            handles.append(layer.get_submodule(path).register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in windows:
            model(row.unsqueeze(0))
    for h in handles:
        h.remove()
    return sums, windows.numel()


def llama_quantize(src: Path, dst: Path, mix: str, imatrix: Path | None = None) -> None:
    from strata_quant.pipeline.formats.gguf_solved import llama_file_type

    mix = llama_file_type(mix)  # strata's MOSTLY_Q4_0 is llama.cpp's Q4_0
    if imatrix is not None:  # llama_model_quantize cannot take an imatrix from Python: the tool can
        cmd = [str(TOOLS / "llama-quantize"), "--allow-requantize", "--imatrix", str(imatrix), str(src), str(dst), mix]
        subprocess.run(cmd, check=True, capture_output=True)
        return
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {mix} failed")


def strata_file(template: Path, dst: Path, model, sums, tokens: int, config: dict) -> dict:
    """``template`` (llama.cpp's mix) with every decoder linear replaced by strata's solve."""
    from gguf import GGUFReader

    shutil.copyfile(template, dst)
    reader = GGUFReader(dst, "r+")
    n_head, n_kv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads", 0) or 0)
    n_kv = n_kv or n_head
    done, skipped, t0 = 0, [], time.perf_counter()
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in LINEARS:
            continue
        ggml_type = t.tensor_type.name
        if ggml_type not in GRIDS:
            skipped.append(f"{t.name} ({ggml_type})")
            continue
        i, (mod, src) = int(parts[1]), LINEARS[parts[2]]
        w = model.model.layers[i].get_submodule(mod).weight.detach().float()
        h = (sums[(i, src)] * (2.0 / tokens)).float()
        data = pack(gptq_ggml(w, h, ggml_type))
        if parts[2] in ("attn_q", "attn_k"):  # whole rows move: the packed rows permute as the weights'
            data = permute_qk_rows(data, n_head if parts[2] == "attn_q" else n_kv)
        view = np.asarray(t.data).reshape(-1)
        if view.size != data.size or not np.shares_memory(view, reader.data):
            raise RuntimeError(f"{t.name}: {data.size} bytes solved, {view.size} in the file")
        view[:] = data.reshape(-1)
        done += 1
    reader.data.flush()
    del reader
    return {"linears": done, "skipped": skipped, "solve_s": time.perf_counter() - t0}


def write_imatrix(path: Path, sums, tokens: int, n_layers: int) -> Path:
    from strata_quant.pipeline.imatrix import write_imatrix_gguf

    stats = {}
    for i in range(n_layers):
        for name, (_, src) in LINEARS.items():
            stats[f"blk.{i}.{name}.weight"] = (torch.diagonal(sums[(i, src)]).float().numpy(), tokens)
    return write_imatrix_gguf(path, stats, dataset="emma", chunks=0, chunk_size=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mixes", default="Q4_K_M")
    ap.add_argument("--cal-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/strata-mixes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import calibration_windows, eval_windows, load_text, tokenize_stream
    from strata_quant.pipeline.verify import llamacpp_perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path, src = fixtures.smollm2(), fixtures._fetch_smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cal = calibration_windows(tokenize_stream(tok, load_text("fixture:austen/emma")), args.cal_windows, args.seq_len)
    held = eval_windows(tokenize_stream(tok, load_text("fixture:austen/persuasion")), args.eval_windows, args.seq_len)
    print(machine())
    print(f"SmolLM2-135M; calibration {args.cal_windows}×{args.seq_len} Emma, eval {args.eval_windows}×{args.seq_len} "
          f"Persuasion in llama.cpp, {args.threads} threads")  # fmt: skip
    t = time.perf_counter()
    sums, tokens = collect(model, cal)
    print(f"statistics: {time.perf_counter() - t:.1f} s")
    ref = llamacpp_perplexity(src, held, n_threads=args.threads)["ppl"]
    print(f"{'file':28s} {'MB':>7s} {'ppl':>8s} {'Δppl':>8s}")
    print(f"{'source (Q4_1 = reference)':28s} {src.stat().st_size / 1e6:7.1f} {ref:8.3f}")
    imatrix = None
    if (TOOLS / "llama-quantize").exists():
        imatrix = write_imatrix(out / "strata.imatrix.gguf", sums, tokens, len(model.model.layers))
    for mix in args.mixes.split(","):
        files = {"llama.cpp": out / f"llamacpp-{mix}.gguf"}
        llama_quantize(src, files["llama.cpp"], mix)
        if imatrix is not None:
            files["llama.cpp + imatrix"] = out / f"llamacpp-imatrix-{mix}.gguf"
            llama_quantize(src, files["llama.cpp + imatrix"], mix, imatrix)
        files["strata"] = out / f"strata-{mix}.gguf"
        info = strata_file(files["llama.cpp"], files["strata"], model, sums, tokens, model.config.to_dict())
        for label, f in files.items():
            ppl = llamacpp_perplexity(f, held, n_threads=args.threads)["ppl"]
            print(f"{mix + ' ' + label:28s} {f.stat().st_size / 1e6:7.1f} {ppl:8.3f} {100 * (ppl - ref) / ref:+7.2f}%",
                  flush=True)  # fmt: skip
        print(
            f"  strata solved {info['linears']} linears in {info['solve_s']:.0f} s; kept: {info['skipped'] or 'none'}"
        )


if __name__ == "__main__":
    main()
