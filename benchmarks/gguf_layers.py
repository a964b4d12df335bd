"""Where llama.cpp's computation of a GGUF leaves transformers': every decoder layer's output, one window.

    python -m benchmarks.gguf_layers configs/gemma3-270m-gptq-w4g128.yaml --workdir /tmp/gg/gemma --seq-len 512

Reads the two files :mod:`benchmarks.gguf_agreement` wrote into ``--workdir`` (``model-q4_0.gguf``, ``model-f16.gguf``
of the same dequantized weights). llama.cpp's layer outputs (``l_out-N``, the graph's own names) are read through
its eval callback; transformers' from forward hooks on its decoder layers, for transformers' reading of the Q4_0 file
(the dense model bit for bit, see gguf_agreement's ``hf_gguf_equals_dense``) and for the same model with llama.cpp's
Q8_0 activation rounding emulated (:class:`benchmarks.gguf_agreement.ActivationRounding`). Per layer: the relative
error ‖cpp − hf‖ / ‖hf‖ over all positions and over the positions after the first. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.gguf_agreement import ActivationRounding, _commit


def llamacpp_layers(path: Path, ids: list[int], threads: int, repack: bool = True) -> dict[int, np.ndarray]:
    """Every decoder layer's output [T, hidden] as llama.cpp computes it (its graph's ``l_out-N`` tensors);
    ``repack`` False keeps quantized weights in their file layout (no CPU repacking, ``use_extra_bufts``)."""
    import llama_cpp
    import llama_cpp.llama_cpp as capi

    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_name.argtypes = [ctypes.c_void_p]
    base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    out: dict[int, np.ndarray] = {}

    def observe(tensor, ask, _user):
        name = base.ggml_get_name(tensor).decode()
        if not name.startswith("l_out-"):
            return not ask  # ask: not wanted; after compute: go on
        if ask:
            return True
        # struct ggml_tensor: enum ggml_type (+4 padding), a buffer pointer, then int64 ne[4]
        gtype = ctypes.c_int.from_address(tensor).value
        ne = (ctypes.c_int64 * 4).from_address(tensor + 16)
        if gtype != 0 or ne[2] != 1 or ne[3] != 1:
            raise RuntimeError(f"{name}: expected a 2-D F32 tensor, got type {gtype} {list(ne)}")
        data = np.empty((ne[1], ne[0]), np.float32)
        base.ggml_backend_tensor_get(tensor, data.ctypes.data, 0, data.nbytes)
        out[int(name.split("-")[1])] = data
        return True

    callback = capi.ggml_backend_sched_eval_callback(observe)
    default = capi.llama_context_default_params
    model_default = capi.llama_model_default_params

    def params():
        p = default()
        p.cb_eval = callback
        return p

    def model_params():
        p = model_default()
        p.use_extra_bufts = repack
        return p

    capi.llama_context_default_params = params
    capi.llama_model_default_params = model_params
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=len(ids),
            n_batch=len(ids),
            n_ubatch=len(ids),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,  # every position through the last layer (else only the last row)
            verbose=False,
        )
        llm.eval(ids)
    finally:
        capi.llama_context_default_params = default
        capi.llama_model_default_params = model_default
    del llm
    return out


def transformers_layers(model, ids: list[int]) -> dict[int, np.ndarray]:
    """Every decoder layer's output [T, hidden] (forward hooks on ``model.model.layers``)."""
    out: dict[int, np.ndarray] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def keep(_module, _inputs, output, i=i):
            h = output[0] if isinstance(output, tuple) else output
            out[i] = h[0].detach().float().numpy().copy()

        hooks.append(layer.register_forward_hook(keep))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.config import load_config
    from strata_quant.pipeline.eval import load_gguf_transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--workdir", required=True, help="gguf_agreement's --workdir (its two GGUFs)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-repack", action="store_true", help="llama.cpp without its CPU weight repacking")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    reader = open_checkpoint(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(reader.path)
    ids = eval_windows(tokenize_stream(tokenizer, load_text(cfg.eval.text)), 1, args.seq_len)[0].tolist()
    work = Path(args.workdir)
    cpp = {
        tag: llamacpp_layers(work / f"model-{tag}.gguf", ids, args.threads, repack=not args.no_repack)
        for tag in ("q4_0", "f16")
    }
    model = load_gguf_transformers(work / "model-q4_0.gguf")
    hf = {"dense": transformers_layers(model, ids)}
    rounding = ActivationRounding(model)
    rounding.leaves = {"*"}
    hf["emulated"] = transformers_layers(model, ids)
    pairs = {
        "q4_0_vs_dense": ("q4_0", "dense"),
        "q4_0_vs_emulated": ("q4_0", "emulated"),
        "f16_vs_dense": ("f16", "dense"),
    }
    layers = sorted(hf["dense"])
    out = {
        "config": args.config,
        "tokens": len(ids),
        "repack": not args.no_repack,
        "layers": len(layers),
        "hf_emulated_vs_dense": [round(_rel(hf["emulated"][i], hf["dense"][i]), 5) for i in layers],
    }
    for name, (tag, key) in pairs.items():
        out[name] = [round(_rel(cpp[tag][i], hf[key][i]), 5) for i in layers]
        out[f"{name}_after_first"] = [round(_rel(cpp[tag][i][1:], hf[key][i][1:]), 5) for i in layers]
    out["hidden_norm_first_vs_rest"] = [
        round(float(np.linalg.norm(hf["dense"][i][0]) / np.linalg.norm(hf["dense"][i][1:], axis=1).mean()), 1)
        for i in layers
    ]
    out["commit"] = _commit()
    text = json.dumps(out)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
