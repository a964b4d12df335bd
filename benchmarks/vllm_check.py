"""Do strata's GPTQ, AWQ and compressed-tensors artifacts load and decode correctly in vLLM?

    .venv/bin/python -m benchmarks.vllm_check [--model fixture:smollm2-135m] [--work DIR] [--tokens 32]
    .venv/bin/python -m benchmarks.vllm_check --prepare-only --work vllm-work   # build here, run there

For each format it loads the artifact in vLLM (a fresh process per artifact), greedy-decodes
a few fixed prompts (temperature 0, the prompt given as token ids) and compares with *our*
dequantized model in transformers: the checkpoint with every quantized linear's weight
replaced by the stored result's ``scales · (codes − zeros)`` in fp16. The reference is run
teacher-forced on vLLM's own tokens, so each generated position is compared like for like:

* top-1: does the reference's argmax equal the token vLLM chose;
* |Δ logprob|: vLLM's log-probability of its token against the reference's;
* greedy match: how many leading tokens equal the reference's own greedy decode.

Artifacts come from an RTN W4 g64 symmetric run record written in this process (the
workers' own ``rtn_quantize`` / ``result_to_bytes``; see ``benchmarks/assemble_memory.py``)
and the regular assemblers, so the check is of the formats and readers, not of a solver.
Exit status: 0 when every format passes (top-1 ≥ 90 %, mean |Δ logprob| ≤ 0.1), 1 when one
fails, 2 on an error. Where vLLM cannot run it prints ``skipped: <reason>`` and exits 0
without claiming anything: ``vllm`` not importable, or no CUDA GPU.

vLLM is not a dependency of strata and cannot be installed on the lent GPU machines (they
have no internet): the check runs there only if vLLM is already installed in the Python that
runs it. ``--prepare-only`` builds the model copy, the run record and the three artifacts
into ``--work`` on a machine with the fixtures, so they can be carried to a GPU machine
(SmolLM2-135M's work folder is ~0.5 GB; ``--model`` takes any Llama-family folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FORMATS = ("gptq", "awq", "compressed-tensors")
PROMPTS = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "The capital of France is",
    "def fibonacci(n):\n    ",
)
TOP1_MIN = 0.90
DLOGP_MAX = 0.10


def skip_reason() -> str | None:
    """Why vLLM cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm not installed (it is not a strata dependency; the lent GPU machines have no internet to fetch it)"
    import torch

    if not torch.cuda.is_available():
        return "no GPU (torch.cuda.is_available() is False)"
    return None


def prepare(model_ref: str, work: Path) -> dict[str, Path]:
    """The model folder, the run record and one artifact per format under ``work`` (reused if present)."""
    from benchmarks.assemble_memory import write_rtn_run
    from strata_quant.pipeline.assemble import (
        ResultSource,
        assemble_awq,
        assemble_compressed_tensors,
        assemble_gptq,
    )
    from strata_quant.pipeline.checkpoint import CheckpointReader
    from strata_quant.pipeline.fixtures import resolve
    from strata_quant.pipeline.run import load_records
    from strata_quant.pipeline.store import open_store

    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").is_file():
        src = resolve(model_ref)
        shutil.rmtree(model.with_name("model.tmp"), ignore_errors=True)
        shutil.copytree(src, model.with_name("model.tmp"))
        os.replace(model.with_name("model.tmp"), model)
    store = work / "store"
    if not store.is_dir():  # built aside and renamed: a half-written record is never reused
        shutil.rmtree(store.with_name("store.tmp"), ignore_errors=True)
        write_rtn_run(model, store.with_name("store.tmp"), "rtn", bits=4, group_size=64)
        os.replace(store.with_name("store.tmp"), store)
    reader = CheckpointReader(model)
    results = ResultSource(open_store(str(store)), load_records(open_store(str(store)), "runs/rtn", reader.num_layers))
    out = {"model": model, "store": store}
    for fmt, fn in (
        ("gptq", assemble_gptq),
        ("awq", assemble_awq),
        ("compressed-tensors", assemble_compressed_tensors),
    ):
        dest = work / fmt
        if not (dest / "config.json").is_file():
            fn(reader, results, dest, overwrite=True)
        out[fmt] = dest
    return out


def reference_model(model: Path, store: Path, device: str = "cuda"):
    """transformers' model of the checkpoint with the stored results' dequantized weights (fp16 on
    CUDA, fp32 on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline.assemble import ResultSource
    from strata_quant.pipeline.checkpoint import CheckpointReader
    from strata_quant.pipeline.run import load_records
    from strata_quant.pipeline.store import open_store

    reader = CheckpointReader(model)
    st = open_store(str(store))
    results = ResultSource(st, load_records(st, "runs/rtn", reader.num_layers))
    dtype = torch.float16 if device == "cuda" else torch.float32
    net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name in results.entries:
            params[f"{name}.weight"].copy_(results.get(name).dequantize(torch.float32).to(dtype))
    return net


def reference_outputs(net, prompts: list[list[int]], tokens: int) -> dict:
    """The reference's own greedy tokens and logprobs in :func:`run_vllm`'s form (``--self-check``)."""
    import torch

    device = next(net.parameters()).device
    seqs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = net.generate(
                torch.tensor([prompt], device=device), max_new_tokens=tokens, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
            logp = torch.log_softmax(net(torch.tensor([prompt + ids], device=device)).logits[0].float(), dim=-1)
            seqs.append({"ids": ids, "logprobs": [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(ids)]})
    return {"vllm": "none (self-check)", "quantization": "reference", "seqs": seqs}


def run_vllm(path: Path, prompts: list[list[int]], tokens: int) -> dict:
    """One artifact in vLLM (run in its own process by :func:`main`): tokens and their logprobs."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(path),
        dtype="float16",
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=1024,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    seqs = []
    for out in outs:
        o = out.outputs[0]
        ids = list(o.token_ids)
        seqs.append({"ids": ids, "logprobs": [float(step[t].logprob) for step, t in zip(o.logprobs, ids)]})
    quant = getattr(getattr(llm.llm_engine, "model_config", None), "quantization", None)
    import vllm

    return {"vllm": vllm.__version__, "quantization": quant, "seqs": seqs}


def compare(net, prompts: list[list[int]], got: dict, tokens: int) -> dict:
    """Teacher-forced top-1 agreement and |Δ logprob| of vLLM's tokens against the reference, and
    the length of the common prefix with the reference's own greedy decode."""
    import torch

    device = next(net.parameters()).device
    agree = total = 0
    dlogp: list[float] = []
    prefix = []
    with torch.no_grad():
        for prompt, seq in zip(prompts, got["seqs"]):
            ids = seq["ids"]
            full = torch.tensor([prompt + ids], device=device)
            logp = torch.log_softmax(net(full).logits[0].float(), dim=-1)
            for i, tok in enumerate(ids):
                row = logp[len(prompt) - 1 + i]
                agree += int(int(row.argmax()) == tok)
                total += 1
                dlogp.append(abs(float(row[tok]) - seq["logprobs"][i]))
            greedy = net.generate(
                torch.tensor([prompt], device=device), max_new_tokens=tokens, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
            n = 0
            while n < min(len(greedy), len(ids)) and greedy[n] == ids[n]:
                n += 1
            prefix.append(f"{n}/{len(ids)}")
    return {
        "top1": agree / max(1, total),
        "mean_dlogp": sum(dlogp) / max(1, len(dlogp)),
        "max_dlogp": max(dlogp, default=0.0),
        "greedy_prefix": prefix,
        "tokens": total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fixture:smollm2-135m")
    parser.add_argument("--work", default="vllm-check", help="folder for the model copy, record and artifacts")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--prepare-only", action="store_true", help="build the artifacts and stop (no vLLM needed)")
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="no vLLM: compare the reference (on the CPU) with itself, to test this script's comparison",
    )
    parser.add_argument("--one", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # the child: one artifact in vLLM, JSON on the last line of stdout
        prompts = json.loads(args.prompts)
        print(json.dumps(run_vllm(Path(args.one[1]), prompts, args.tokens)))
        return 0

    work = Path(args.work)
    if args.prepare_only:
        paths = prepare(args.model, work)
        for k, v in paths.items():
            print(f"{k}: {v}")
        return 0
    reason = None if args.self_check else skip_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0

    paths = prepare(args.model, work)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["model"])
    prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    net = reference_model(paths["model"], paths["store"], "cpu" if args.self_check else "cuda")
    failed = []
    if args.self_check:
        m = compare(net, prompts, reference_outputs(net, prompts, args.tokens), args.tokens)
        ok = m["top1"] == 1.0 and m["max_dlogp"] < 1e-3
        print(
            f"self-check (reference vs itself, CPU): top-1 {m['top1']:.1%}, max |Δ logprob| {m['max_dlogp']:.2e}, "
            f"greedy prefix {' '.join(m['greedy_prefix'])}: {'ok' if ok else 'FAIL'}"
        )
        return 0 if ok else 1
    print(f"{'format':20s} {'vLLM quant':18s} {'top-1':>6s} {'mean|Δlogp|':>12s} {'max|Δlogp|':>11s}  greedy prefix")
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        if fmt not in FORMATS:
            raise SystemExit(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.vllm_check", "--one", fmt, str(paths[fmt])]
            + ["--tokens", str(args.tokens), "--prompts", json.dumps(prompts)],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            print(f"{fmt:20s} FAILED to load/generate in vLLM:\n{child.stderr[-3000:]}")
            failed.append(fmt)
            continue
        got = json.loads(child.stdout.strip().splitlines()[-1])
        m = compare(net, prompts, got, args.tokens)
        ok = m["top1"] >= TOP1_MIN and m["mean_dlogp"] <= DLOGP_MAX
        if not ok:
            failed.append(fmt)
        print(
            f"{fmt:20s} {str(got['quantization']):18s} {m['top1']:6.1%} {m['mean_dlogp']:12.4f} "
            f"{m['max_dlogp']:11.4f}  {' '.join(m['greedy_prefix'])}  {'ok' if ok else 'FAIL'} (vllm {got['vllm']})"
        )
    print(f"thresholds: top-1 ≥ {TOP1_MIN:.0%}, mean |Δ logprob| ≤ {DLOGP_MAX}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception as err:  # an error is not a skip: say so and exit 2
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)
