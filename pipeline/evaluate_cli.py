"""`strata eval`: score a reference and one or more artifacts on the same token windows
and write the results JSON documented in pipeline.eval (schema 1)."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path

import torch

from strata_quant.pipeline.eval import (
    DECODE_TOKENS,
    SCHEMA_VERSION,
    EvalError,
    LlamaCppModel,
    decode_speed,
    evaluate,
    linear_errors,
    load_gguf_transformers,
    load_reference,
    machine_info,
    measure_load,
    results_weights,
    sliding_windows,
    validate_results,
    with_weights,
)

log = logging.getLogger("strata.eval")

GGUF_BACKENDS = ("transformers", "llama.cpp")
QUANTIZED_FOLDERS = ("gptq", "awq", "compressed-tensors")
DECODE_PROMPT = 64


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def folder_method(path: Path) -> str | None:
    """The quant_method of a checkpoint folder's config.json, None for a dense checkpoint."""
    config = json.loads((path / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method")


def open_run(run_id: str, store_ref: str):
    """(model reference, records, ResultSource) of a stored run."""
    from strata_quant.pipeline.assemble import ResultSource
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.run import load_records
    from strata_quant.pipeline.store import open_store

    store = open_store(store_ref)
    run = store.get_json(f"runs/{run_id}/run.json")
    model = run["config"]["model"]
    reader = open_checkpoint(model)
    records = load_records(store, f"runs/{run_id}", reader.num_layers)
    return model, records, ResultSource(store, records)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def warm_imports(model_path: Path, llama_cpp: bool) -> None:
    """Import the model class (transformers imports it lazily on first load) and llama_cpp."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_path)
        for arch in config.architectures or []:
            getattr(transformers, arch, None)
    except Exception:  # only a warm-up
        pass
    if llama_cpp and llama_cpp_available():
        import llama_cpp  # noqa: F401


def _unique(name: str, taken: dict) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name} #{i}", i + 1
    return out


class ModelSet:
    """The models an evaluation scores, by unique name, with what the results file says of each."""

    def __init__(self) -> None:
        self.models: dict[str, object] = {}
        self.meta: dict[str, dict] = {}

    def add(self, name, model, *, backend, fmt, path, memory=None, load_s=None, timed=True) -> str:
        name = _unique(name, self.models)
        self.models[name] = model
        self.meta[name] = {
            "backend": backend,
            "format": fmt,
            "path": str(path) if path is not None else None,
            "bytes_on_disk": size_of(Path(path)) if path is not None and fmt != "results" else None,
            "memory": memory,
            "load_s": load_s,
            "timed": timed,
        }
        return name

    def close(self) -> None:
        for model in self.models.values():
            if isinstance(model, LlamaCppModel):
                model.close()


def check_backends(gguf_backends: tuple[str, ...] | None) -> tuple[str, ...]:
    """The GGUF backends asked for; default both where llama-cpp-python is installed."""
    if gguf_backends is None:
        return GGUF_BACKENDS if llama_cpp_available() else ("transformers",)
    for b in gguf_backends:
        if b not in GGUF_BACKENDS:
            raise EvalError(f"unknown GGUF backend {b!r} (choose from {', '.join(GGUF_BACKENDS)})")
    return gguf_backends


def add_artifact(models: ModelSet, art: str, *, backends, n_ctx: int, threads: int, fake_quant) -> None:
    """One artifact into ``models``: a GGUF once per backend, a dense folder through transformers, a GPTQ / AWQ /
    compressed-tensors folder as the run's fake-quant model (``fake_quant()``: None without a run)."""
    path = Path(art)
    if path.is_file() and path.suffix == ".gguf":
        for backend in backends:
            if backend == "transformers":
                model, mem, secs = measure_load(lambda p=path: load_gguf_transformers(p))
            else:
                model, mem, secs = measure_load(lambda p=path: LlamaCppModel(p, n_ctx, threads))
            models.add(f"{path.name} ({backend})", model, backend=backend, fmt="gguf", path=path, memory=mem,
                       load_s=secs)  # fmt: skip
    elif path.is_dir() and (path / "config.json").is_file():
        method = folder_method(path)
        if method in QUANTIZED_FOLDERS:
            model = fake_quant()
            if model is None:
                raise EvalError(
                    f"{path} is a {method} folder, which transformers cannot load without gptqmodel here; "
                    "name the run it was assembled from (--run RUN_ID --store STORE) to evaluate it by "
                    "fake-quant from the run's stored results (strata verify checks they match)"
                )
            models.add(f"{path.name} (fake-quant)", model, backend="fake-quant", fmt=method, path=path, timed=False)
        elif method is None:
            model, mem, secs = measure_load(lambda p=path: load_reference(p))
            models.add(f"{path.name} (transformers)", model, backend="transformers", fmt="safetensors", path=path,
                       memory=mem, load_s=secs)  # fmt: skip
        else:
            raise EvalError(f"{path}: quantization method {method!r} is not supported")
    else:
        raise EvalError(f"{art}: not a .gguf file nor a checkpoint folder with a config.json")


def model_entries(models: ModelSet, rows: dict, wins, *, params: int, speed: bool, threads: int, batch_size: int,
                  decode_tokens: int) -> list[dict]:  # fmt: skip
    """``"models"`` of the results: each model's quality row, size, memory and (``speed``) prefill / decode."""
    prompt = wins.ids[0, : min(DECODE_PROMPT, wins.context)].tolist()
    window_tokens = wins.count * wins.context
    out = []
    for name, row in rows.items():
        m = models.meta[name]
        entry = {
            "name": name,
            "backend": m["backend"],
            "format": m["format"],
            "path": m["path"],
            "reference": bool(m.get("reference")),
            **row,
            "bytes_on_disk": m["bytes_on_disk"],
            "bits_per_weight": m["bytes_on_disk"] * 8 / params if m["bytes_on_disk"] and params else None,
            "memory": m["memory"],
            "load_s": m["load_s"],
            "speed": None,
        }
        if speed and m["timed"]:
            log.info("timing a %d-token greedy decode of %s", decode_tokens, name)
            entry["speed"] = {
                "threads": threads,
                "prefill_tokens": window_tokens,
                "prefill_s": row["forward_s"],
                "prefill_tokens_per_s": window_tokens / row["forward_s"] if row["forward_s"] > 0 else 0.0,
                "prefill_batch": 1 if m["backend"] == "llama.cpp" else batch_size,
                **decode_speed(models.models[name], prompt, decode_tokens),
            }
        out.append(entry)
    return out


def text_entry(text: str, text_field: str, body: str, stream: torch.Tensor, wins) -> dict:
    """``"text"`` and ``"windows"`` of the results: what was scored, pinned by hashes."""
    return {
        "text": {
            "source": text,
            "text_field": text_field,
            "chars": len(body),
            "sha256": hashlib.sha256(body.encode()).hexdigest(),
            "stream_tokens": int(stream.numel()),
        },
        "windows": {
            "count": wins.count,
            "context": wins.context,
            "stride": wins.stride,
            "prefix": wins.ids[0, : wins.prefix].tolist(),  # the tokenizer's prompt prefix before each window's text
            "scored_tokens": wins.scored_tokens,
            "token_ids_sha256": wins.sha256(),
        },
    }


def run_eval(
    *,
    text: str,
    reference: str | None = None,
    artifacts: list[str] = (),
    run_id: str | None = None,
    store: str = "runs",
    windows: int = 32,
    context: int = 512,
    stride: int | None = None,
    threads: int | None = None,
    batch_size: int = 2,
    gguf_backends: tuple[str, ...] | None = None,
    speed: bool = True,
    decode_tokens: int = DECODE_TOKENS,
    text_field: str = "text",
    out: str | Path | None = None,
    off_domain: str | None = None,
) -> dict:
    """Evaluate and return the results dict (written to ``out`` when given). ``off_domain``: a
    second text unlike the calibration, on which the same models are scored the same way
    (quality only: ppl, KLD, top-1), under ``"off_domain"``."""
    from transformers import AutoTokenizer

    from strata_quant.pipeline.calibration import load_text, tokenize_stream, tokenizer_prefix
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.run import STRATA_VERSION

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    gguf_backends = check_backends(gguf_backends)
    records = results = None
    if run_id:
        run_model, records, results = open_run(run_id, store)
        reference = reference or run_model
    if not reference:
        raise EvalError("name the reference checkpoint (--reference) or a run (--run) whose model it is")
    ref_reader = open_checkpoint(reference)  # a folder, fixture: or s3:// (small files cached locally)
    ref_path = ref_reader.path

    tokenizer = AutoTokenizer.from_pretrained(ref_path)
    body = load_text(text, text_field)
    stream = tokenize_stream(tokenizer, body)
    wins = sliding_windows(stream, windows, context, stride, tokenizer_prefix(tokenizer))
    log.info(
        "%d windows × %d tokens, stride %d: %d scored tokens", wins.count, wins.context, wins.stride, wins.scored_tokens
    )

    models = ModelSet()
    warm_imports(ref_path, "llama.cpp" in gguf_backends)  # so the RSS deltas are the models', not the libraries'
    ref, mem, secs = measure_load(ref_reader.reference_model)
    ref_name = models.add(f"{ref_path.name} (reference)", ref, backend="transformers", fmt="safetensors",
                          path=ref_path, memory=mem, load_s=secs)  # fmt: skip
    models.meta[ref_name]["reference"] = True
    fake: list = []  # the run's fake-quant model, built once when first asked for

    def fake_quant():
        if results is not None and not fake:
            fake.append(with_weights(ref, results_weights(results)))
        return fake[0] if fake else None

    n_ctx = max(wins.context, DECODE_PROMPT + decode_tokens + 8)
    for art in artifacts:
        add_artifact(models, art, backends=gguf_backends, n_ctx=n_ctx, threads=threads, fake_quant=fake_quant)
    if results is not None and not fake:
        models.add(f"run {run_id} (fake-quant)", fake_quant(), backend="fake-quant", fmt="results", path=None,
                   timed=False)  # fmt: skip

    log.info("evaluating %d models with %d threads", len(models.models), threads)
    rows = evaluate(models.models, wins, reference=ref_name, batch_size=batch_size)
    params = ref_reader.num_params()
    out_models = model_entries(models, rows, wins, params=params, speed=speed, threads=threads,
                               batch_size=batch_size, decode_tokens=decode_tokens)  # fmt: skip
    off = None
    if off_domain:
        off = score_text(models.models, ref_name, tokenizer, off_domain, text_field, windows, context, stride,
                         batch_size)  # fmt: skip
    models.close()  # after the last text: a closed llama.cpp model is freed (scoring it again crashes)

    data = {
        "schema": SCHEMA_VERSION,
        "kind": "strata-eval",
        "strata_version": STRATA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **text_entry(text, text_field, body, stream, wins),
        "reference": {"name": ref_name, "path": str(ref_path)},
        "params": params,
        "machine": machine_info(threads),
        "models": out_models,
        "quant_error": (
            {"run_id": run_id, "store": str(store), "linears": linear_errors(records)} if records is not None else None
        ),
    }
    if off is not None:
        data["off_domain"] = off
    validate_results(data)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def score_text(models, ref_name, tokenizer, text, text_field, windows, context, stride, batch_size) -> dict:
    """``"off_domain"`` of the results: the text, its windows and each model's quality on them."""
    from strata_quant.pipeline.calibration import load_text, tokenize_stream, tokenizer_prefix

    body = load_text(text, text_field)
    stream = tokenize_stream(tokenizer, body)
    wins = sliding_windows(stream, windows, context, stride, tokenizer_prefix(tokenizer))
    log.info("off domain: %d windows × %d tokens of %s", wins.count, wins.context, text)
    rows = evaluate(models, wins, reference=ref_name, batch_size=batch_size)
    keep = ("ppl", "nll", "ppl_increase", "tokens", "kld", "kld_p50", "kld_p90", "kld_p99", "kld_max", "top1")
    return {
        **text_entry(text, text_field, body, stream, wins),
        "models": [{"name": name, **{k: row[k] for k in keep}} for name, row in rows.items()],
    }


def format_results(data: dict, worst: int = 10) -> str:
    w = data["windows"]
    mach = data["machine"]
    lines = [
        f"{data['text']['source']}: {w['count']} windows × {w['context']} tokens, stride {w['stride']}, "
        f"{w['scored_tokens']} scored tokens (ids sha256 {w['token_ids_sha256'][:12]})",
        f"machine: {mach['cpu_model']}, nproc {mach['nproc']}, {mach['threads']} threads",
        "",
    ]
    names = [m["name"] for m in data["models"]]
    width = max(len(n) for n in names)
    lines.append(
        f"{'model'.ljust(width)}  {'ppl':>8}  {'Δ ppl':>8}  {'KLD':>7}  {'p99':>7}  {'top-1':>6}  "
        f"{'disk MB':>8}  {'mem MB':>8}  {'prefill/s':>9}  {'decode/s':>8}"
    )
    for m in data["models"]:
        sp = m.get("speed") or {}
        mem = (m.get("memory") or {}).get("param_bytes")
        lines.append(
            f"{m['name'].ljust(width)}  {m['ppl']:8.3f}  {m['ppl_increase']:+8.2%}  {m['kld']:7.4f}  "
            f"{m['kld_p99']:7.4f}  {m['top1']:6.1%}  "
            + (f"{m['bytes_on_disk'] / 1e6:8.1f}" if m.get("bytes_on_disk") else f"{'—':>8}")
            + "  "
            + (f"{mem / 1e6:8.1f}" if mem else f"{'—':>8}")
            + "  "
            + (f"{sp['prefill_tokens_per_s']:9.1f}" if sp else f"{'—':>9}")
            + "  "
            + (f"{sp['decode_tokens_per_s']:8.1f}" if sp.get("decode_tokens_per_s") else f"{'—':>8}")
        )
    off = data.get("off_domain")
    if off:
        ow = off["windows"]
        lines += ["", f"off domain: {off['text']['source']}: {ow['count']} windows × {ow['context']} tokens"]
        lines.append(f"{'model'.ljust(width)}  {'ppl':>8}  {'Δ ppl':>8}  {'KLD':>7}  {'p99':>7}  {'top-1':>6}")
        for m in off["models"]:
            lines.append(
                f"{m['name'].ljust(width)}  {m['ppl']:8.3f}  {m['ppl_increase']:+8.2%}  {m['kld']:7.4f}  "
                f"{m['kld_p99']:7.4f}  {m['top1']:6.1%}"
            )
    qe = data.get("quant_error")
    if qe and qe["linears"]:
        lines += ["", f"worst linears of run {qe['run_id']} (output / weight relative error):"]
        for e in qe["linears"][:worst]:
            o, wr = e["output_rel_error"], e["weight_rel_error"]
            lines.append(
                f"  {e['name']:45s} {o if o is not None else float('nan'):.4f}  {wr if wr is not None else float('nan'):.4f}"
            )
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, KLD, top-1, size and speed of a reference and artifacts on the same windows",
        description="Score the reference and every artifact on the same token windows; write a results JSON "
        "(schema documented in pipeline/eval.py).",
    )
    p.add_argument("--reference", help="the reference checkpoint folder or fixture:NAME (default: the run's model)")
    p.add_argument(
        "--artifact", action="append", default=[], metavar="PATH", help="a .gguf file or a checkpoint folder (repeat)"
    )
    p.add_argument("--run", dest="run_id", help="a run id: fake-quant rows from its stored results, per-linear errors")
    p.add_argument("--store", default="runs", help="the run store (default: runs)")
    p.add_argument("--text", required=True, help="text file, .jsonl/.parquet, fixture:austen/NOVEL or hf:NAME[:SPLIT]")
    p.add_argument("--text-field", default="text", help="the text field of jsonl/parquet/hf sources")
    p.add_argument(
        "--off-domain",
        default="fixture:kjv",
        help="a second text unlike the calibration, scored the same way (code for code models: "
        "fixture:code/python-stdlib); 'none' to skip",
    )
    p.add_argument("--windows", type=int, default=32, help="number of windows (0: as many as the text holds)")
    p.add_argument("--seq-len", "--context", dest="context", type=int, default=512, help="tokens per window")
    p.add_argument(
        "--stride", type=int, help="tokens between window starts (default: the context, non-overlapping windows)"
    )
    p.add_argument("--threads", type=int, help="torch and llama.cpp threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per transformers forward")
    p.add_argument(
        "--gguf-backend",
        action="append",
        choices=GGUF_BACKENDS,
        help="how to load GGUF artifacts (repeat; default: both, llama.cpp where llama-cpp-python is installed)",
    )
    p.add_argument("--no-speed", action="store_true", help="skip the decode timing")
    p.add_argument(
        "--decode-tokens", type=int, default=DECODE_TOKENS, help=f"greedy decode length timed (default {DECODE_TOKENS})"
    )
    p.add_argument("--out", required=True, help="results JSON path")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    data = run_eval(
        text=args.text,
        reference=args.reference,
        artifacts=args.artifact,
        run_id=args.run_id,
        store=args.store,
        windows=args.windows,
        context=args.context,
        stride=args.stride,
        threads=args.threads,
        batch_size=args.batch_size,
        gguf_backends=tuple(args.gguf_backend) if args.gguf_backend else None,
        speed=not args.no_speed,
        decode_tokens=args.decode_tokens,
        text_field=args.text_field,
        out=args.out,
        off_domain=None if args.off_domain.lower() == "none" else args.off_domain,
    )
    print(format_results(data))
    print(f"\nresults: {args.out}")
    return 0
