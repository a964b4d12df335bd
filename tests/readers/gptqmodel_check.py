"""Load a strata GPTQ or AWQ artifact with GPTQModel on CPU and compare it with a reference.

Run in the separate venv that has gptqmodel (never the project venv):

    GPTQMODEL_CPU_WORKERS=2 .venv-gptqmodel/bin/python tests/readers/gptqmodel_check.py MODEL_DIR=REF.safetensors ...

(one or more artifact=reference pairs, loaded in one process to pay GPTQModel's import once).
STRATA_GPTQMODEL_BACKENDS is a comma list of GPTQModel backends to load each artifact with:
"torch" (default) picks the plain dequantize-then-matmul kernel of the artifact's method
(gptq_torch / awq_torch), "auto" lets GPTQModel choose (on CPU: the ATen int4pack kernels).
STRATA_GPTQMODEL_DTYPE (default float16) is the dtype the model is loaded and fed in.
Each REF.safetensors holds ``input_ids`` (int64 [B, T]), ``logits`` (float32 [B, T, V], from a
dense model carrying the solver's dequantized weights) and ``weight:<linear>`` (float32
[N, K], the solver's dequantized weight of each quantized linear). Prints one JSON line per artifact:
the kernel classes GPTQModel chose, how many linears it loaded, each reader weight
(read back by feeding the identity matrix through the quantized module, so the kernel's
own dequantization is what is measured) against the reference, and max |logit Δ|. The reader's
logits are also saved beside REF (``REF.<backend>-logits.safetensors``, named in the line as
``logits_file``) so the caller can compare them with its own measures.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def check(model_dir: str, ref_path: str, backend: str) -> dict:
    import torch
    from gptqmodel import GPTQModel
    from safetensors.torch import load_file, save_file

    if backend == "torch":  # the plain dequantize-then-matmul kernels, per method
        method = json.loads(open(os.path.join(model_dir, "config.json")).read())["quantization_config"]["quant_method"]
        backend = {"gptq": "gptq_torch", "awq": "awq_torch"}[method]
    dtype = getattr(torch, os.environ.get("STRATA_GPTQMODEL_DTYPE", "float16"))
    ref = load_file(ref_path)
    model = GPTQModel.load(model_dir, device="cpu", backend=backend, dtype=dtype)
    hf = model.model if hasattr(model, "model") else model
    hf.eval()
    modules = dict(hf.named_modules())
    kernels, weight_diff, exact_fp16, loaded = set(), 0.0, 0, 0
    for key, want in ref.items():
        if not key.startswith("weight:"):
            continue
        name = key[len("weight:") :]
        module = modules.get(name)
        if module is None or not hasattr(module, "qweight"):
            return {"model": model_dir, "error": f"{name} was not loaded as a quantized module"}
        kernels.add(type(module).__name__)
        n_rows, n_cols = want.shape
        eye = torch.eye(n_cols, dtype=dtype)
        with torch.no_grad():
            got = module(eye).float().t()  # [N, K]; identity rows make every product exact
            if getattr(module, "bias", None) is not None:
                got = got - module.bias.float()[:, None]
        weight_diff = max(weight_diff, (got - want).abs().max().item())
        exact_fp16 += int(torch.equal(got, want.half().float()))
        loaded += 1
    with torch.no_grad():
        logits = hf(ref["input_ids"]).logits.float()
    logits_file = f"{ref_path}.{backend}-logits.safetensors"
    save_file({"logits": logits.contiguous()}, logits_file)
    out = {
        "model": model_dir,
        "kernels": sorted(kernels),
        "quantized_linears": loaded,
        "weights_equal_fp16_of_reference": exact_fp16,
        "weight_max_abs_diff": weight_diff,
        "logits_max_abs_diff": (logits - ref["logits"]).abs().max().item(),
        "logits_max_abs": ref["logits"].abs().max().item(),
        "logits_file": logits_file,
        "dtype": str(dtype),
        "backend": backend,
    }
    return out


def main() -> int:
    status = 0
    for backend in os.environ.get("STRATA_GPTQMODEL_BACKENDS", "torch").split(","):
        for arg in sys.argv[1:]:
            model_dir, _, ref_path = arg.partition("=")
            try:
                out = check(model_dir, ref_path, backend)
            except Exception as err:  # report every artifact, then fail
                out = {"model": model_dir, "backend": backend, "error": f"{type(err).__name__}: {err}"}
            status |= "error" in out
            print(json.dumps(out), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
