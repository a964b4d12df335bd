"""llm-compressor GPTQ (oneshot + GPTQModifier) on a checkpoint with given calibration token ids
(the llm-compressor side of ``benchmarks/peers.py table``). Runs in .venv-llmcompressor, never
the main venv (built by ``bash benchmarks/peers_venv.sh llmcompressor``)::

    .venv-llmcompressor/bin/python benchmarks/peers_llmcompressor.py \
        --model ~/.cache/strata/models/smollm2-135m-instruct --ids out/peers/calib-emma-32x512.safetensors \
        --bits 4 --group-size 64 --out out/peers/table/llmcompressor-gptq-w4g64.safetensors

``--method awq`` puts llm-compressor's AWQModifier (its defaults: 20-point grid, duo scaling,
the Llama mappings it infers) before a QuantizationModifier (RTN on the same scheme);
``--method awq_gptq`` before the GPTQModifier. AWQ folds 1/s into the RMSNorm weights, so
those are written too, as ``float:<parameter name>``.

The GPTQ recipe is llm-compressor's own GPTQ defaults (GPTQModifier: dampening_frac 0.01, actorder
"static", block_size 128; its observer's min/max group scales) on every Linear but lm_head,
symmetric int weights of ``--bits`` in groups of ``--group-size`` (which must divide every
linear's in_features: 576 and 1536 for SmolLM2, so 32 or 64, not 128). The calibration is
exactly the given token ids, in order, as a datasets.Dataset (no shuffling, no truncation).

After oneshot, GPTQ has left each linear's weight as its fake-quantized (dequantized) value
next to weight_scale / weight_zero_point. Those weights are checked to lie on the grid
(w / s + z within 1e-3 of an integer in [0, 2^b − 1] for every group) and written, as
float32 under the key ``linear:<module name>``, to one safetensors file: the form
``benchmarks/peers.py`` evaluates. A JSON with the timings and versions is written beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True, help="safetensors with input_ids int64 [N, T]")
    parser.add_argument("--out", required=True, help="safetensors of dequantized linears (linear:<name>)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--asym", action="store_true", help="asymmetric grid (zero points)")
    parser.add_argument(
        "--method",
        choices=["gptq", "awq", "awq_gptq"],
        default="gptq",
        help="awq: AWQModifier then RTN; awq_gptq: then GPTQ",
    )
    return parser.parse_args()


def recipe(args) -> tuple[object, str]:
    """llm-compressor's modifiers for ``args.method`` on the int grid of ``args`` (lm_head left out), and a
    description of them for the JSON."""
    import torch
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    scheme = {
        "targets": ["Linear"],
        "weights": {
            "num_bits": args.bits,
            "type": "int",
            "symmetric": not args.asym,
            "strategy": "group",
            "group_size": args.group_size,
        },
    }
    groups = {"group_0": scheme}
    if args.method == "gptq":
        return (
            GPTQModifier(config_groups=groups, ignore=["lm_head"]),
            "GPTQ (GPTQModifier defaults: dampening_frac 0.01, actorder static)",
        )
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        # 0.14's AWQ pins its cached activations for faster host-to-GPU copies, which a
        # CPU-only torch refuses ("Cannot access accelerator device"); pinning changes no
        # value, so it is skipped here
        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)

    # AWQModifier defaults (n_grid 20, duo_scaling True, mappings inferred for Llama); it only
    # scales, the modifier after it rounds: RTN (QuantizationModifier) or GPTQ
    then = GPTQModifier if args.method == "awq_gptq" else QuantizationModifier
    described = f"AWQ (AWQModifier defaults) then {'GPTQ' if args.method == 'awq_gptq' else 'RTN'}"
    return [AWQModifier(), then(config_groups=groups, ignore=["lm_head"])], described


def grid_weights(model, args) -> dict:
    """Each quantized linear's fake-quantized weight as float32 under ``linear:<name>``, checked to lie on the
    grid (w / s + z within 1e-3 of an integer in [0, 2^b − 1]); with AWQ also the norms it folded 1/s into."""
    import torch

    maxq = 2**args.bits - 1
    tensors = {}
    for name, m in model.named_modules():
        scale = getattr(m, "weight_scale", None)
        if not isinstance(m, torch.nn.Linear) or scale is None:
            continue
        w = m.weight.detach().float()
        if args.method == "awq":
            # QuantizationModifier (RTN) leaves the float weight and quantizes it in the forward:
            # apply its own fake quantization (compressed-tensors) with its scales
            from compressed_tensors.quantization.lifecycle.forward import fake_quantize

            zp = getattr(m, "weight_zero_point", None)
            w = fake_quantize(w, scale.detach().float(), zp, m.quantization_scheme.weights).float()
        s = scale.detach().float().repeat_interleave(args.group_size, dim=1)
        zp = getattr(m, "weight_zero_point", None)
        z = zp.detach().float().repeat_interleave(args.group_size, dim=1) if zp is not None else torch.zeros_like(s)
        # llm-compressor's symmetric int grid is signed: q ∈ [−2^(b−1), 2^(b−1) − 1] with z = 0
        q = w / s + z + 2 ** (args.bits - 1)
        off = (q - q.round()).abs().max().item()
        if off > 1e-3 or q.round().min() < 0 or q.round().max() > maxq:
            raise SystemExit(f"{name}: weights are not on the {args.bits}-bit grid (max off-grid {off:.2e})")
        tensors[f"linear:{name}"] = w.contiguous()
    if not tensors:
        raise SystemExit("no quantized linears found after oneshot")
    if args.method != "gptq":  # AWQ folded 1/s into the norms: those go with the linears
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                tensors[f"float:{name}"] = p.detach().float().contiguous()
    return tensors


def main() -> None:
    args = parse_args()

    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = load_file(args.ids)["input_ids"]
    n, t = ids.shape
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * t for _ in range(n)]})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head" and m.in_features % args.group_size:
            raise SystemExit(f"group size {args.group_size} does not divide {name}.in_features = {m.in_features}")
    modifiers, described = recipe(args)
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=data,
        recipe=modifiers,
        num_calibration_samples=n,
        max_seq_length=t,
        shuffle_calibration_samples=False,
    )
    quantize_s = time.perf_counter() - t0

    tensors = grid_weights(model, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    save_file(tensors, str(tmp))
    os.replace(tmp, out)
    info = {
        "tool": "llm-compressor",
        "llmcompressor": llmcompressor.__version__,
        "torch": torch.__version__,
        "method": described,
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": not args.asym,
        "quantize_s": quantize_s,
        "threads": torch.get_num_threads(),
        "calibration": [n, t],
        "linears": sum(k.startswith("linear:") for k in tensors),
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
