"""GPTQModel GPTQ (or AWQ) on a checkpoint with given calibration token ids (the peer side of
benchmarks/peers.py --quality and ``table``). Runs in .venv-gptqmodel, never the main venv::

    GPTQMODEL_CPU_WORKERS=2 .venv-gptqmodel/bin/python benchmarks/peers_gptqmodel.py \
        --model ~/.cache/strata/models/smollm2-135m-instruct --ids out/peers/calib-emma-64x512.safetensors \
        --out out/peers/gptqmodel-w4g64-plain

``--method gptq`` (default): sym, W``--bits`` g``--group-size`` (4 / 64 by default), GPTQModel's own
defaults otherwise (damp_percent 0.05, act_group_aware on unless --desc-act). ``--method awq``:
GPTQModel's AWQ (asymmetric, GEMM format, 4-bit only). Writes the checkpoint and
peers-gptqmodel.json (quantize() seconds, threads, versions) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True, help="safetensors with input_ids int64 [N, T]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--desc-act", action="store_true")
    parser.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    parser.add_argument("--backend", default="auto", help="GPTQModel kernel backend (awq on CPU: awq_torch)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="load dtype; auto = GPTQModel's choice (bfloat16 on CPU)")
    args = parser.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(args.threads))

    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    ids = load_file(args.ids)["input_ids"]
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    if args.method == "awq":
        qcfg = QuantizeConfig(method="awq", format="gemm", bits=args.bits, group_size=args.group_size, sym=False)
    else:
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True, desc_act=args.desc_act)
    t = time.perf_counter()
    kw = {} if args.dtype == "auto" else {"dtype": getattr(torch, args.dtype)}
    if args.backend != "auto":
        kw["backend"] = args.backend
    model = GPTQModel.load(args.model, qcfg, device="cpu", **kw)
    dtype = str(next(model.model.parameters()).dtype)
    load_s = time.perf_counter() - t
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model.quantize(calibration, batch_size=args.batch_size)
    quantize_s = time.perf_counter() - t
    out = Path(args.out)
    model.save(str(out))
    info = {
        "quantize_s": quantize_s,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "gptqmodel": gptqmodel.__version__,
        "torch": torch.__version__,
        "calibration": [int(ids.shape[0]), int(ids.shape[1])],
        "method": args.method,
        "bits": args.bits,
        "group_size": args.group_size,
        "damp_percent": getattr(qcfg, "damp_percent", None),
        "act_group_aware": getattr(qcfg, "act_group_aware", None),
        "desc_act": qcfg.desc_act,
        "load_dtype": dtype,
    }
    (out / "peers-gptqmodel.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
