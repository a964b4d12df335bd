"""Do llama.cpp and transformers compute the same model from strata's GGUF? One command per model:

    python -m benchmarks.gguf_agreement configs/gemma3-270m-gptq-w4g128.yaml --windows 8
    python -m benchmarks.gguf_agreement configs/qwen2.5-coder-0.5b-gptq-w4g128.yaml --run RUN_ID --store runs
    python -m benchmarks.gguf_agreement configs/smollm2-135m-gptq-w4g64.yaml --model fixture:smollm2-mixtral

The linears are a strata run's stored results (``--run``/``--store``) or, without ``--run``, RTN with the
config's grid computed here (the agreement question is about the file and its readers, not the solver). The
script writes the Q4_0 GGUF (the solver's codes as they are) with :func:`assemble_gguf`, and an F16 GGUF of
the same dequantized weights, then on the config's eval windows of its eval text compares, per window:

* ``cpp_vs_hf``: llama.cpp vs transformers(gguf_file) on the Q4_0 file: top-1 agreement and flip margin
  (:func:`compare_logits`: how far below transformers' best token llama.cpp's pick was where they differ);
* ``cpp_vs_dense``: llama.cpp vs the checkpoint model carrying the dequantized weights (fp32);
* ``hf_vs_dense``: transformers(gguf_file) vs dense, max |Δ| (the file describes the checkpoint's model);
* ``f16_cpp_vs_dense`` / ``f16_cpp_vs_hf``: the same for the F16 file. llama.cpp rounds activations to 8 bits
  (Q8_0) beside quantized weights and to fp16 beside F16 ones, so a disagreement that stays with F16 is the model
  description (metadata), not quantization;
* ``cpp_vs_emulated``: llama.cpp on the Q4_0 file vs the dense model with ggml's Q8_0 rounding applied to every
  decoder linear's input and fp16 to the output head's (:class:`ActivationRounding`); with ``--ablate`` also
  ``cpp_vs_emulated_<leaf>``, one linear kind rounded at a time;
* ``ppl`` of each reader, and ``q8_0_input_rel_error``: ‖x − q8(x)‖ / ‖x‖ per linear kind.

A Mixture-of-Experts checkpoint (per-expert tensors on disk) takes the same path: the files hold llama.cpp's expert
stacks, the dense model carries each expert's weight in its fused expert parameters (the family's own conversion),
``*_vs_hf`` appear where transformers builds the file's model (Qwen3-MoE with the checkpoint's config; not Mixtral,
whose experts its GGUF loader leaves out), and there is no emulation (fused experts are no ``nn.Linear`` to hook).

``--bos`` puts the tokenizer's BOS before each window (the windows keep their length). Positions are also split
at the sliding window (``before_window`` / ``after_window``) for models that have one. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from strata_quant.pipeline.eval import LlamaCppModel
from strata_quant.pipeline.verify import compare_logits

#: positions per logits chunk (262,144-token vocabulary: 128 MiB in fp32)
CHUNK = 128


class _Head:
    """A transformers causal LM split at its final hidden states: ``hidden`` runs the body, ``logits`` the output
    head (and final soft-capping where the config has it); checked once against the model's own forward."""

    def __init__(self, model) -> None:
        self.model = model
        self.lm_head = model.get_output_embeddings()
        self.cap = getattr(model.config, "final_logit_softcapping", None)
        with torch.no_grad():
            x = torch.arange(8, 40)[None]
            if not torch.equal(self.logits(self.hidden(x)), model(input_ids=x).logits[0].float()):
                raise RuntimeError("the split head does not reproduce the model's logits")

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.model(input_ids=x).last_hidden_state[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.lm_head(h).float()
            return torch.tanh(out / self.cap) * self.cap if self.cap else out

    def drop_body(self) -> None:
        self.model = None


def _merge(stats: list[dict]) -> dict:
    """Token-weighted merge of per-window :func:`compare_logits` results."""
    n = sum(s["tokens"] for s in stats)
    return {
        "tokens": n,
        "top1_agreement": sum(s["top1_agreement"] * s["tokens"] for s in stats) / n,
        "top1_flip_margin": max(s["top1_flip_margin"] for s in stats),
        "max_abs_diff": max(s["max_abs_diff"] for s in stats),
        "mean_abs_diff": sum(s["mean_abs_diff"] * s["tokens"] for s in stats) / n,
        "logit_std": sum(s["logit_std"] * s["tokens"] for s in stats) / n,  # mean over chunks of positions
    }


def write_f16_gguf(reader, results, path: Path, tokenizer_pre: str) -> Path:
    """An F16 GGUF of the checkpoint with the results (a :class:`ResultSource`) dequantized in place of its
    linears: the assembler's own tensor plan and data with every linear (and expert stack) F16, as the file it
    hands llama.cpp to re-quantize; norms F32 with the family's shift, Q/K rows in the family's rotary order."""
    from strata_quant.pipeline.formats import gguf as gguf_format

    layout = gguf_format.check_gguf(reader.config, reader.tensor_names)
    floats = gguf_format.GGUFTypes(16, True, None, "F16", "requantized", {}, None, "F16")
    extra = dict(layout.extra_tensors())
    plan = gguf_format.tensor_plan(reader, results, layout, floats, extra)
    writer = gguf_format.GGUFStreamWriter(
        str(path), reader.config, str(reader.path), tokenizer_pre=tokenizer_pre, file_type=1
    )
    for _, gname, gtype, shape in plan:
        writer.add_tensor_info(gname, gtype, shape)
    writer.write_header()
    for tname, gname, gtype, _ in plan:
        writer.write_data(gname, gguf_format.planned_data(tname, gname, gtype, reader, results, layout, extra, True))
    writer.close()
    return path


def rtn_results(reader, spec) -> dict:
    """RTN results of every decoder linear (each expert's too) with the run's grid; routers stay float, as the
    job keeps them."""
    from strata_quant.pipeline.formats import gguf as gguf_format
    from strata_quant.pipeline.formats.gguf_moe import is_router
    from strata_quant.workers.rtn import rtn_quantize

    layout = gguf_format.check_gguf(reader.config, reader.tensor_names)
    out = {}
    for name in reader.tensor_names:
        linear, _, leaf = name.rpartition(".")
        if leaf != "weight" or ".layers." not in name or "norm" in linear or len(reader.shape(name)) != 2:
            continue
        if not is_router(layout.name(name)):
            out[linear] = rtn_quantize(reader.load([name])[name].float(), spec)
    return out


def dense_model(reader, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The checkpoint's model (float32) carrying ``weights`` (linear name → dense weight); a MoE's per-expert
    weights go into its fused expert parameters by the family's own conversion (:func:`pipeline.moe.block_state`)."""
    from strata_quant.pipeline.eval import load_reference, with_weights
    from strata_quant.pipeline.moe import block_state

    model = load_reference(reader.path)
    if not is_moe(reader):
        return with_weights(model, weights)
    state = block_state(model, {f"{name}.weight": w for name, w in weights.items()})
    model.load_state_dict(state, strict=False)
    return model


def is_moe(reader) -> bool:
    """Whether the checkpoint stores per-expert tensors (``…experts.3.w1.weight``)."""
    from strata_quant.pipeline.formats.gguf_moe import expert_index

    return any(expert_index(name) is not None for name in reader.tensor_names)


def load_transformers(path: Path, reader):
    """transformers' reading of the GGUF; for a MoE with the checkpoint's own config (its GGUF loader maps no
    expert width), or None where transformers cannot build the file's model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from strata_quant.pipeline.eval import load_gguf_transformers

    if not is_moe(reader):
        return load_gguf_transformers(path)
    try:
        config = AutoConfig.from_pretrained(reader.path)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=torch.float32
        )
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as err:
        print(f"transformers does not read {path.name}: {err}")
        return None
    return model.eval()


def store_results(results: dict, root: Path, spec):
    """The results in a local store with a record, as pipeline.run writes them (for :func:`assemble_gguf`)."""
    from strata_quant.pipeline.assemble import ResultSource
    from strata_quant.pipeline.store import LocalStore, sha256_bytes
    from strata_quant.workers.records import result_to_bytes

    store, entries = LocalStore(root), []
    for linear, result in results.items():
        data = result_to_bytes(result)
        store.put_bytes(f"run/{linear}.safetensors", data)
        entries.append(
            {
                "name": linear,
                "key": f"run/{linear}.safetensors",
                "sha256": sha256_bytes(data),
                "bits": spec.bits,
                "group_size": spec.group_size,
                "sym": spec.sym,
            }
        )
    return ResultSource(store, {0: {"results": entries}})


def q8_0_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` as llama.cpp's CPU matmul sees it beside a quantized weight: each row cut in 32-value blocks, each
    block rounded to int8 with d = max|x| / 127 stored as fp16 (ggml's quantize_row_q8_0, the vec_dot_type of
    Q4_0 / Q5_0 / Q8_0), through ggml's own quantizer and dequantizer."""
    from tests.ggml_reference import ggml_dequantize, ggml_quantize

    rows = x.detach().reshape(-1, x.shape[-1]).float().numpy()
    back = ggml_dequantize(ggml_quantize(rows, "Q8_0"), "Q8_0", rows.shape[1])
    return torch.from_numpy(back).reshape(x.shape).to(x.dtype)


class ActivationRounding:
    """Forward pre-hooks on a model's decoder linears that round their inputs as llama.cpp does for quantized
    weights (:func:`q8_0_round`) when ``leaves`` names the linear's last name part ("*": every linear); the
    relative error ‖x − q8(x)‖ / ‖x‖ of every hooked input is summed per leaf name."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.leaves: set[str] = set()
        self.error: dict[str, list[float]] = {}
        self.names: list[str] = []
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}.":
                module.register_forward_pre_hook(self._hook(name.rpartition(".")[2]))
                self.names.append(name.rpartition(".")[2])

    def _hook(self, leaf: str):
        def hook(_module, inputs):
            if "*" not in self.leaves and leaf not in self.leaves:
                return None
            x = inputs[0]
            y = q8_0_round(x)
            err = float((x - y).float().norm() / x.float().norm().clamp_min(1e-30))
            self.error.setdefault(leaf, []).append(err)
            return (y, *inputs[1:])

        return hook

    def mean_error(self) -> dict[str, float]:
        return {k: round(sum(v) / len(v), 5) for k, v in self.error.items()}


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``targets`` (one per logits row)."""
    return float(-torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).sum())


def measure(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from strata_quant.pipeline.assemble import assemble_gguf
    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.config import load_config
    from strata_quant.workers.result import QuantSpec

    cfg = load_config(args.config)
    reader = open_checkpoint(args.model or cfg.model)
    spec = QuantSpec(cfg.quant.bits, cfg.quant.group_size, cfg.quant.sym)
    pre = args.tokenizer_pre or cfg.output.gguf_tokenizer_pre
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gguf-agreement-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.run:
        from strata_quant.pipeline.evaluate_cli import open_run

        _, _, source = open_run(args.run, args.store)
        results = {name: source.get(name) for name in source.entries}
        method = f"strata run {args.run}"
    else:
        results = rtn_results(reader, spec)
        source = store_results(results, work / "store", spec)
        method = f"RTN W{spec.bits} g{spec.group_size}"
    dense_weights = {k: r.dequantize() for k, r in results.items()}
    q4 = assemble_gguf(reader, source, work / "model-q4_0.gguf", overwrite=True, tokenizer_pre=pre)
    f16 = write_f16_gguf(reader, source, work / "model-f16.gguf", pre)
    moe = is_moe(reader)

    tokenizer = AutoTokenizer.from_pretrained(reader.path)
    seq_len = args.seq_len or cfg.eval.seq_len
    windows = eval_windows(tokenize_stream(tokenizer, load_text(cfg.eval.text)), args.windows, seq_len)
    if args.bos:
        windows = torch.cat([torch.full((windows.shape[0], 1), tokenizer.bos_token_id), windows[:, :-1]], 1)
    rows = windows.tolist()
    swa = int(reader.config.get("sliding_window") or 0) if reader.config.get("layer_types") else 0

    # the vocabulary is wide (Gemma: 262,144): keep each window's final hidden states per transformers model
    # (one model body loaded at a time), and make logits from them a chunk of positions at a time
    hf_model = load_transformers(q4, reader)
    hidden = {}
    if hf_model is not None:
        hf_head = _Head(hf_model)
        hidden["hf"] = [hf_head.hidden(torch.tensor([r])) for r in rows]
        hf_head.drop_body()
    dense = _Head(dense_model(reader, dense_weights))
    del dense_weights, results
    hidden["dense"] = [dense.hidden(torch.tensor([r])) for r in rows]
    # transformers' reading of the file computes the dense model bit for bit: its logits are the dense ones
    hf_is_dense = hf_model is not None and (
        torch.equal(hf_head.lm_head.weight, dense.lm_head.weight)
        and all(torch.equal(a, b) for a, b in zip(hidden["hf"], hidden["dense"], strict=True))
    )
    # llama.cpp's activation rounding emulated in transformers: every decoder linear's input as Q8_0, the
    # output head's input as fp16 (an F16 weight's vec_dot_type); with --ablate, one linear kind at a time.
    # A MoE's fused experts are no nn.Linear the hooks can round: no emulation there.
    rounding = ActivationRounding(dense.model)
    variants = {} if moe else {"emulated": {"*"}}
    if args.ablate and not moe:
        variants |= {f"emulated_{leaf}": {leaf} for leaf in dict.fromkeys(rounding.names)}
    for key, leaves in variants.items():
        rounding.leaves = leaves
        hidden[key] = [dense.hidden(torch.tensor([r])) for r in rows]
    act_error = rounding.mean_error()
    dense.drop_body()

    def logits(key: str, i: int, a: int, b: int) -> torch.Tensor:
        h = hidden[key][i][a:b]
        return dense.logits(h.half().float() if key.startswith("emulated") else h)

    files = {"q4_0": q4, "f16": f16}
    pairs = {"cpp_vs_dense": ("q4_0", "dense"), "f16_cpp_vs_dense": ("f16", "dense")}
    pairs |= {f"cpp_vs_{k}": ("q4_0", k) for k in variants}
    if hf_model is not None:
        pairs |= {"cpp_vs_hf": ("q4_0", "hf"), "f16_cpp_vs_hf": ("f16", "hf")}
    per: dict[str, list[dict]] = {p: [] for p in (*pairs, *(("hf_vs_dense",) if hf_model is not None else ()))}
    split: dict[str, list[dict]] = {f"cpp_vs_hf_{s}": [] for s in ("before_window", "after_window")}
    nll: dict[str, float] = {k: 0.0 for k in ("dense", "hf", "cpp_q4_0", "cpp_f16")}
    llms = {tag: LlamaCppModel(path, seq_len, args.threads).llm for tag, path in files.items()}
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        for llm in llms.values():
            llm.reset()
            llm.eval(row)
        targets = torch.tensor(row[1:] + [row[-1]])  # the last position predicts nothing scored
        for a in range(0, seq_len, CHUNK):
            b = min(a + CHUNK, seq_len)
            scored = slice(0, b - a - (b == seq_len))
            cpp = {tag: torch.from_numpy(llm.scores[a:b]) for tag, llm in llms.items()}  # views of llama.cpp's
            ref = {k: logits(k, i, a, b) for k in {*variants, "dense"}}
            if hf_model is not None:
                ref["hf"] = ref["dense"] if hf_is_dense else hf_head.logits(hidden["hf"][i][a:b])
                per["hf_vs_dense"].append(compare_logits(ref["hf"], ref["dense"]))
            for name, (tag, key) in pairs.items():
                per[name].append(compare_logits(cpp[tag], ref[key]))
            if swa and seq_len > swa and hf_model is not None:
                split[f"cpp_vs_hf_{'before_window' if b <= swa else 'after_window'}"].append(per["cpp_vs_hf"][-1])
            t = targets[a:b][scored]
            nll["dense"] += _nll(ref["dense"][scored], t)
            if hf_model is not None:
                nll["hf"] += _nll(ref["hf"][scored], t)
            for tag in llms:
                nll[f"cpp_{tag}"] += _nll(cpp[tag][scored], t)
            del cpp, ref
    del llms
    per_window = len(range(0, seq_len, CHUNK))
    against = per.get("cpp_vs_hf", per["cpp_vs_dense"])  # per window: against transformers where it reads the file
    top1 = [_merge(against[i : i + per_window]) for i in range(0, len(against), per_window)]
    scored_tokens = len(rows) * (seq_len - 1)
    return {
        "config": args.config,
        "model": args.model or cfg.model,
        "results": method,
        "windows": len(rows),
        "seq_len": seq_len,
        "bos": bool(args.bos),
        "sliding_window": swa or None,
        "hf_gguf_equals_dense": hf_is_dense,
        **{p: _merge(v) for p, v in per.items()},
        **{p: _merge(v) for p, v in split.items() if v},
        "transformers_reads_gguf": hf_model is not None,
        f"per_window_cpp_vs_{'hf' if hf_model is not None else 'dense'}_top1": [
            round(s["top1_agreement"], 4) for s in top1
        ],
        "ppl": {k: round(math.exp(v / scored_tokens), 4) for k, v in nll.items() if k != "hf" or hf_model is not None},
        "q8_0_input_rel_error": act_error,
        "seconds": round(time.perf_counter() - t0, 1),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, llama.cpp {args.threads} threads",
        "gguf": {"q4_0": str(q4), "f16": str(f16)},
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the job config (model, quant grid, eval text)")
    p.add_argument("--model", help="another checkpoint than the config's (a path or fixture:NAME)")
    p.add_argument("--run", help="a stored strata run's id (default: RTN results computed here)")
    p.add_argument("--store", default="runs", help="the store holding --run")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the config's eval.seq_len)")
    p.add_argument("--bos", action="store_true", help="start each window with the tokenizer's BOS")
    p.add_argument("--ablate", action="store_true", help="also emulate the Q8_0 inputs of one linear kind at a time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer-pre", default=None, help="default: the config's output.gguf_tokenizer_pre")
    p.add_argument("--workdir", help="where the GGUFs go (default: a fresh temporary folder)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = measure(args)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
