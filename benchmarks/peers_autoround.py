"""auto-round (Intel's SignRound) making llama.cpp K-quant GGUF files of a checkpoint from given
calibration token ids: the peer side of strata's GGUF mixes (benchmarks/gguf_mix_run.py). Runs in
.venv-autoround (``bash benchmarks/peers_venv.sh autoround``), never the main venv; imports nothing
from strata::

    OMP_NUM_THREADS=1 .venv-autoround/bin/python benchmarks/peers_autoround.py \
        --model ~/.cache/strata/models/smollm2-135m-instruct --ids /tmp/autoround/calib-emma-64x512.safetensors \
        --out /tmp/autoround --format gguf:q4_k_m --threads 1

(the ids from benchmarks/peers_calib_ids.py: strata's own 64 evenly spaced 512-token windows of Emma).
auto-round 0.16's bundled llama.cpp converter fails to import its Qwen module with gguf 0.19 (it names
``MODEL_ARCH.DFLASH``); ``--llama-cpp ~/.cache/strata/llama.cpp/llama_cpp_python-0.3.36/vendor/llama.cpp`` has
the converter and gguf-py of the llama.cpp that reads the files write them instead.
Each ``--format`` (repeatable, or a comma list: gguf:q4_k_m, gguf:q3_k_m, gguf:q5_k_m, gguf:q6_k,
gguf:q2_k_s, ...) is its own AutoRound run: ``AutoRound(model, scheme=FORMAT, dataset=ids, iters=...,
nsamples=N, seqlen=T)`` then ``quantize_and_save(out/FORMAT, format=FORMAT)``; auto-round's own
defaults otherwise (iters 200, batch size 8, lr 1/iters, its per-tensor type choice, which mirrors
llama.cpp's llama_tensor_get_type). The ids reach auto-round as a list of [1, T] int64 tensors: its
calibration loop (calibration/llm.py, ``calib``) takes a tensor item as the input_ids themselves,
with no tokenizing, no shuffling and no packing; it caps the count at ``nsamples``. Writes each
GGUF file under out/<format>/ and out/peers-autoround.json (per format: quantize + save seconds,
iters, nsamples, seqlen, file bytes and sha256, the GGUF tensor types; the versions).

What auto-round does here, read from its source and its files on SmolLM2-135M:

* On CPU it casts the model to bfloat16 and tunes in it (amp); ``--no-amp`` tunes in fp32 (slower).
* ``--iters 0`` is its RTN path with an importance matrix from the same ids (``enable_opt_rtn``), the
  recipe its GGUF warning recommends; iters > 0 is SignRound, torch.compile on from 10 iters.
* Rows whose width is not a multiple of 256 (SmolLM2's 576) fall back, before tuning, to Q5_0 for
  Q2_K..Q5_K and to Q8_0 for Q6_K. llama.cpp's llama-quantize falls back to Q4_0 for Q2_K / Q3_K and
  to Q5_1 for Q5_K, so auto-round's q4_k_m and q6_k files have llama.cpp's tensor types, its q3_k_m,
  q2_k_s (larger) and q5_k_m (smaller) files do not.
* Tied embeddings: lm_head is left out; token_embd is quantized as llama.cpp's output rule says
  (Q6_K, so Q8_0 at width 576), outside the block tuning.
* With iters > 0 its Q8_0 tensors (token_embd, the Q8_0 attn_v) are on its own int8 grid (scale =
  the group's signed extreme / 128, codes clamped at 127; data_type/int.py), not llama.cpp's amax / 127,
  in bfloat16 and in fp32 alike; iters 0 packs them as llama.cpp does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="HF checkpoint folder")
    parser.add_argument("--ids", required=True, help="safetensors with input_ids int64 [N, T]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", action="append", required=True, help="gguf:q4_k_m etc.; repeatable or a,b")
    parser.add_argument("--iters", type=int, default=200, help="SignRound steps per block (auto-round's 200)")
    parser.add_argument("--nsamples", type=int, default=0, help="first N windows of --ids (0: all of them)")
    parser.add_argument("--batch-size", type=int, default=8, help="auto-round's default 8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42, help="auto-round's default")
    parser.add_argument(
        "--llama-cpp",
        help="a llama.cpp source tree (the llama-cpp-python sdist's vendor/llama.cpp): its converter and its gguf-py "
        "write the file, for families auto-round's bundled converter cannot import with gguf 0.19 (qwen2)",
    )
    parser.add_argument(
        "--no-amp", action="store_true", help="tune in fp32 (auto-round's CPU default casts the model to bfloat16)"
    )
    args = parser.parse_args()
    formats = [f.strip().lower() for item in args.format for f in item.split(",") if f.strip()]
    if args.llama_cpp:  # read by auto-round's export (LLAMA_CPP_ROOT), before gguf is first imported
        import os
        import sys

        root = Path(args.llama_cpp).expanduser().resolve()
        os.environ["LLAMA_CPP_ROOT"] = str(root)
        sys.path.insert(0, str(root / "gguf-py"))

    import auto_round
    import gguf
    import torch
    import transformers
    from auto_round import AutoRound
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    ids = load_file(args.ids)["input_ids"]
    if args.nsamples:
        ids = ids[: args.nsamples]
    nsamples, seqlen = int(ids.shape[0]), int(ids.shape[1])
    dataset = [row.unsqueeze(0).contiguous() for row in ids]  # tensors: taken as input_ids as they are
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "model": str(Path(args.model).expanduser()),
        "ids": str(args.ids),
        "ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "iters": args.iters,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "threads": args.threads,
        "amp": not args.no_amp,
        "auto_round": auto_round.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": getattr(gguf, "__version__", None) or gguf.__file__,
        "llama_cpp_root": args.llama_cpp,
        "runs": {},
    }
    for fmt in formats:
        folder = out / fmt.replace(":", "-")
        t = time.perf_counter()
        ar = AutoRound(
            str(Path(args.model).expanduser()),
            scheme=fmt,
            dataset=dataset,
            iters=args.iters,
            nsamples=nsamples,
            seqlen=seqlen,
            batch_size=args.batch_size,
            device_map="cpu",
            seed=args.seed,
            **({"amp": False} if args.no_amp else {}),
        )
        init_s = time.perf_counter() - t
        torch.set_num_threads(args.threads)
        t = time.perf_counter()
        ar.quantize_and_save(str(folder), format=fmt)
        quantize_s = time.perf_counter() - t
        files = sorted(folder.rglob("*.gguf"))
        run = {
            "init_s": init_s,
            "quantize_and_save_s": quantize_s,
            "threads_after": torch.get_num_threads(),
            "model_dtype": str(next(ar.model.parameters()).dtype) if hasattr(ar, "model") else None,
            "torch_compile": getattr(ar, "enable_torch_compile", None),
            "files": {},
        }
        for f in files:
            types = tensor_types(f)
            run["files"][str(f)] = {
                "bytes": f.stat().st_size,
                "sha256": sha256(f),
                "type_counts": dict(sorted(Counter(types.values()).items())),
                "tensor_types": types,
            }
        info["runs"][fmt] = run
        (out / "peers-autoround.json").write_text(json.dumps(info, indent=1))
        brief = {k: v for k, v in run.items() if k != "files"}
        brief["files"] = {k: {n: v[n] for n in ("bytes", "sha256", "type_counts")} for k, v in run["files"].items()}
        print(json.dumps({fmt: brief}), flush=True)
        del ar


if __name__ == "__main__":
    main()
