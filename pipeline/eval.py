"""Held-out quality and footprint: perplexity, KL divergence from the reference, top-1
agreement, memory and speed, for several models scored on the same token windows.

Scoring (MEASURE.md)
--------------------
The text is tokenised whole (no special tokens) and cut into N windows of C tokens whose
starts are spaced ``stride`` apart (start_i = i · S). Each window is scored on its own:
no context is carried between windows, positions restart at 0 and no BOS is added by any
backend. The first window scores every predicted token (positions 1..C-1); each later
window scores only its last ``S`` tokens (positions max(1, C-S)..C-1), the ones no earlier
window scored, so with S < C every token of the stream is scored exactly once with at
least C-S tokens of context. S == C is MEASURE.md's default: non-overlapping windows,
C-1 scored tokens each. Perplexity is exp(mean NLL over all scored tokens).

For every scored token, KL(ref ‖ model) = Σ p_ref (log p_ref − log p_model) over the
vocabulary, and top-1 agreement is argmax p_model == argmax p_ref; all models see the
same windows in the same pass, so the comparisons are paired. The percentiles are exact
(numpy's linear interpolation over every scored token).

Backends
--------
* ``transformers``: the reference and dense safetensors checkpoints (float32), GGUF
  files through ``gguf_file=`` (dequantized to float32).
* ``llama.cpp``: GGUF files through llama-cpp-python on CPU (``logits_all=True``, the
  window's ids fed as they are with ``Llama.eval``, the logits read from ``Llama.scores``).
* ``fake-quant``: the reference with every quantized linear replaced by the run's stored,
  dequantized results (GPTQ / AWQ / compressed-tensors folders, which transformers cannot
  load here; ``strata verify`` proves the folders hold exactly those results).

Results JSON (``"schema": 1``; :data:`RESULTS_SCHEMA` is the JSON Schema)
------------------------------------------------------------------------
::

    {
      "schema": 1, "kind": "strata-eval", "strata_version": "0.1.0", "created": ISO-8601 UTC,
      "text": {"source": "fixture:austen/persuasion", "text_field": "text", "chars": int,
               "sha256": hex of the UTF-8 text, "stream_tokens": int},
      "windows": {"count": N, "context": C, "stride": S, "scored_tokens": int,
                  "token_ids_sha256": hex over the int64 ids (N×C, C-order) then the
                                      int64 first-scored positions (N)},
      "reference": {"name": str, "path": str},
      "params": parameters of the reference checkpoint (int or null),
      "machine": {"nproc": int, "cpu_model": str, "threads": int, "platform": str,
                  "torch": str, "transformers": str, "llama_cpp": str or null},
      "models": [                                  # the reference first
        {"name": str, "backend": "transformers" | "llama.cpp" | "fake-quant",
         "format": "safetensors" | "gguf" | "gptq" | "awq" | "compressed-tensors" | "results",
         "path": str or null, "reference": bool,
         "ppl": float, "nll": mean NLL (nats), "ppl_increase": (ppl − ppl_ref) / ppl_ref,
         "tokens": scored tokens, "forward_s": float,
         "kld": mean, "kld_p50", "kld_p90", "kld_p99", "kld_max": floats (0 for the reference),
         "top1": float in [0, 1],
         "bytes_on_disk": the file, or every file of the folder (tokenizer included, as the job
                          report's artifact sizes); null for a run's results,
         "bits_per_weight": bytes_on_disk · 8 / params or null,
         "memory": {"rss_delta_bytes": RSS growth across the load,
                    "param_bytes": bytes of the loaded parameters and buffers
                                   (llama.cpp: llama_model_size)} or null,
         "load_s": float or null,
         "speed": {"threads": int, "prefill_tokens": int, "prefill_s": float,
                   "prefill_tokens_per_s": float (the eval windows' forward passes),
                   "decode_prompt_tokens": int, "decode_tokens": 32,
                   "decode_tokens_per_s": median of 3 greedy decodes, one token per step
                                          with the KV cache} or null}
      ],
      "quant_error": {"run_id": str, "store": str,
                      "linears": [{"name", "block", "bits", "group_size",
                                   "output_rel_error", "weight_rel_error"}, ...]}
                     or null                    # worst output_rel_error first
    }

Fields may be added in a later version without changing ``schema``; a field's meaning is
changed or removed only with a new ``schema`` number.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from strata_quant.workers.result import QuantSpec
from strata_quant.workers.rtn import rtn_quantize

SCHEMA_VERSION = 1
PERCENTILES = (50, 90, 99)
DECODE_TOKENS = 32


class EvalError(ValueError):
    pass


# ---------------------------------------------------------------------------- windows


@dataclass
class EvalWindows:
    """N windows of C token ids and, per window, the first position whose token is scored
    (position j is predicted by the logits at j-1)."""

    ids: torch.Tensor  # (N, C) int64
    first_scored: torch.Tensor  # (N,) int64
    stride: int  # in the text
    prefix: int = 0  # each window's first ``prefix`` ids are the prompt prefix (BOS), not the text

    @property
    def count(self) -> int:
        return self.ids.shape[0]

    @property
    def context(self) -> int:
        return self.ids.shape[1]

    @property
    def scored_tokens(self) -> int:
        return int((self.context - self.first_scored).sum())

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(self.ids.to(torch.int64).contiguous().numpy().tobytes())
        h.update(self.first_scored.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def scored_positions(self) -> list[int]:
        """Global stream positions of the scored tokens, in scoring order."""
        first = self.first_scored.tolist()
        return [i * self.stride + j - self.prefix for i in range(self.count) for j in range(first[i], self.context)]

    @classmethod
    def from_tensor(cls, windows: torch.Tensor, prefix: int = 0) -> EvalWindows:
        """Independent windows (MEASURE.md's non-overlapping default): all C-1 predictions scored (with a
        ``prefix``-token prompt prefix the text's first token is predicted from it)."""
        return cls(windows, torch.ones(windows.shape[0], dtype=torch.long), windows.shape[1] - prefix, prefix)


def prompted_windows(tokenizer, text: str, count: int, seq_len: int) -> EvalWindows:
    """The first ``count`` non-overlapping windows of ``seq_len`` tokens of ``text`` (a calibration.source), each
    starting as ``tokenizer`` starts a prompt (Gemma's BOS; nothing for SmolLM2): the run's eval windows."""
    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream, tokenizer_prefix

    prefix = tokenizer_prefix(tokenizer)
    ids = eval_windows(tokenize_stream(tokenizer, load_text(text)), count, seq_len, prefix)
    return EvalWindows.from_tensor(ids, len(prefix))


def sliding_windows(
    stream: torch.Tensor,
    windows: int,
    context: int,
    stride: int | None = None,
    prefix: list[int] | tuple[int, ...] = (),
) -> EvalWindows:
    """``windows`` windows of ``context`` tokens: ``prefix`` (the tokens a prompt starts with, e.g. Gemma's BOS)
    then B = context − |prefix| tokens of the text, starts ``stride`` apart in the text (default B,
    non-overlapping); windows=0 takes as many as the stream holds. Each text token is scored once: in the
    first window from position 1 (with a prefix, the text's first token is predicted from it), in the others
    the last ``stride`` positions."""
    body = context - len(prefix)
    stride = body if stride is None else stride
    if body < 2:
        raise EvalError(f"context must hold at least 2 tokens after the {len(prefix)}-token prefix, got {context}")
    if not 1 <= stride <= body:
        raise EvalError(f"stride must be between 1 and the context after the prefix ({body}), got {stride}")
    total = stream.numel()
    if windows <= 0:
        windows = (total - body) // stride + 1 if total >= body else 0
    need = (windows - 1) * stride + body
    if windows <= 0 or total < need:
        raise EvalError(
            f"evaluation text has {total} tokens, fewer than the {need} that {max(windows, 1)} windows of "
            f"{context} tokens with stride {stride} need"
        )
    head = torch.tensor(list(prefix), dtype=torch.long)
    ids = torch.stack([torch.cat([head, stream[i * stride : i * stride + body].long()]) for i in range(windows)])
    first = torch.full((windows,), max(1, context - stride), dtype=torch.long)
    first[0] = 1
    return EvalWindows(ids, first, stride, len(prefix))


# ---------------------------------------------------------------------------- models


def load_reference(path: str | Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    return model.eval()


def transformers_config(path: Path):
    """transformers' config of the GGUF with the head width the file states. transformers' GGUF reader maps no
    ``<arch>.attention.key_length``, so it builds e.g. Qwen3 with Qwen3Config's default head_dim 128 whatever the
    file holds; llama.cpp reads the key, and so must the reader we compare it with."""
    from gguf import GGUFReader
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    fields = GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    key = fields.get(f"{arch}.attention.key_length")
    if key is not None and getattr(config, "head_dim", None) not in (None, int(key.contents())):
        config.head_dim = int(key.contents())
    return config


def load_gguf_transformers(path: str | Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = transformers_config(path)
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32
    ).eval()


def with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose linears (by module name) carry the given weights."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name, weight in weights.items():
        modules[name].weight.data = weight.to(modules[name].weight.dtype)
    return out


def rtn_weights(model: nn.Module, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """RTN-dequantized weights of every linear inside the decoder layers (lm_head stays)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}.":
            out[name] = rtn_quantize(module.weight.data, spec).dequantize()
    return out


def results_weights(results) -> dict[str, torch.Tensor]:
    """The dequantized stored results of a run (a pipeline.assemble.ResultSource)."""
    return {name: results.get(name).dequantize() for name in results.entries}


def param_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class LlamaCppModel:
    """A GGUF through llama.cpp (llama-cpp-python) on CPU, scored on exact token ids."""

    backend = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int, threads: int | None = None):
        try:
            from llama_cpp import Llama
        except ImportError as err:
            raise EvalError("llama.cpp evaluation needs llama-cpp-python (pip install llama-cpp-python)") from err
        threads = threads or torch.get_num_threads()
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            use_mmap=False,  # read the whole file at load, so the RSS delta is the model's footprint
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def model_bytes(self) -> int | None:
        try:
            import llama_cpp

            return int(llama_cpp.llama_model_size(self.llm.model))
        except Exception:
            return None

    def _eval(self, ids: list[int]) -> None:
        self.llm.reset()  # n_tokens = 0: eval() drops the KV cache from there on
        self.llm.eval(ids)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, C) ids → (B, C, V) float32 logits, each window from an empty KV cache."""
        if ids.shape[1] > self.n_ctx:
            raise EvalError(f"window of {ids.shape[1]} tokens exceeds the llama.cpp context {self.n_ctx}")
        out = []
        for row in ids.tolist():
            self._eval(row)
            out.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(out)

    def greedy_decode(self, prompt: list[int], steps: int) -> tuple[list[int], float]:
        """Greedy decode: prefill ``prompt`` (untimed), then ``steps`` single-token steps;
        (the tokens, seconds of the steps)."""
        self._eval(prompt)
        tok = int(np.argmax(self.llm.scores[len(prompt) - 1]))
        out, t = [tok], time.perf_counter()
        for _ in range(steps):
            self.llm.eval([tok])
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
        return out, time.perf_counter() - t

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None


def model_logits(model, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, nn.Module):
        return model(input_ids=ids).logits.float()
    return model.logits(ids)


def transformers_greedy_decode(model: nn.Module, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy decode with the KV cache: prefill ``prompt`` (untimed), then ``steps``
    single-token forward passes; (the tokens, seconds of the steps)."""
    import inspect

    # transformers ≥ 5.x calls the KV cache `cache`; earlier versions `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        past, tok = out[key], int(out.logits[0, -1].argmax())
        toks, t = [tok], time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{key: past})
            past, tok = out[key], int(out.logits[0, -1].argmax())
            toks.append(tok)
    return toks, time.perf_counter() - t


def decode_speed(model, prompt: list[int], steps: int = DECODE_TOKENS, repeats: int = 3) -> dict:
    """Greedy decode tokens/s (median of ``repeats``): ``steps`` single-token forward passes
    with the KV cache after an untimed prefill of ``prompt``."""
    decode = model.greedy_decode if hasattr(model, "greedy_decode") else None
    times, tokens = [], []
    for _ in range(repeats):
        toks, s = decode(prompt, steps) if decode else transformers_greedy_decode(model, prompt, steps)
        times.append(s)
        tokens = toks
    s = statistics.median(times)
    return {
        "decode_prompt_tokens": len(prompt),
        "decode_tokens": steps,
        "decode_tokens_per_s": steps / s if s > 0 else None,
        "decode_s": s,
        "decoded_ids": tokens,
    }


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_load(load: Callable[[], object]) -> tuple[object, dict, float]:
    """(model, {"rss_delta_bytes", "param_bytes"}, seconds) of one load. RSS, not tracemalloc:
    torch and llama.cpp allocate outside Python's allocator."""
    gc.collect()
    before, t = rss_bytes(), time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t
    gc.collect()
    memory = {"rss_delta_bytes": max(0, rss_bytes() - before)}
    memory["param_bytes"] = param_bytes(model) if isinstance(model, nn.Module) else model.model_bytes()
    return model, memory, seconds


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu,
        "threads": threads,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        import llama_cpp

        info["llama_cpp"] = llama_cpp.__version__
    except ImportError:
        info["llama_cpp"] = None
    return info


# ---------------------------------------------------------------------------- scoring


def evaluate(
    models: dict[str, object],
    windows: torch.Tensor | EvalWindows,
    reference: str,
    batch_size: int = 2,
    keep_tokens: bool = False,
) -> dict[str, dict]:
    """Perplexity of each model; per-token KLD (mean, p50/p90/p99, max) and top-1
    agreement against ``reference``, all on the same windows. ``models``: nn.Modules
    (transformers causal LMs) or objects with ``logits(ids) -> (B, C, V)`` (LlamaCppModel).
    ``keep_tokens``: also return each model's per-token ``nll_tokens`` / ``kld_tokens``."""
    if not isinstance(windows, EvalWindows):
        windows = EvalWindows.from_tensor(windows)
    names = list(models)
    if reference not in models:
        raise EvalError(f"reference {reference!r} is not among the models")
    order = [reference] + [m for m in names if m != reference]
    nll_tok: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    kld_tok: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    agree = dict.fromkeys(names, 0)
    seconds = dict.fromkeys(names, 0.0)
    context = windows.context
    with torch.no_grad():
        for start in range(0, windows.count, batch_size):
            ids = windows.ids[start : start + batch_size]
            first = windows.first_scored[start : start + batch_size]
            # mask over target positions 1..C-1 (logits at 0..C-2): scored iff j >= first
            pos = torch.arange(1, context).unsqueeze(0)
            mask = pos >= first.unsqueeze(1)
            targets = ids[:, 1:]
            for n in order:
                t = time.perf_counter()
                logits = model_logits(models[n], ids)
                seconds[n] += time.perf_counter() - t
                vocab = logits.shape[-1]
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                del logits
                nll_tok[n].append(-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[mask])
                if n == reference:
                    ref_logp, ref_top = logp, logp.argmax(-1)
                    ref_p = ref_logp.exp()
                    continue
                if vocab != ref_logp.shape[-1]:
                    raise EvalError(f"{n}: vocabulary of {vocab} tokens, the reference has {ref_logp.shape[-1]}")
                kld = (ref_p * (ref_logp - logp)).sum(-1)
                kld_tok[n].append(kld[mask])
                agree[n] += int((logp.argmax(-1) == ref_top)[mask].sum())
                del logp
            del ref_logp, ref_p
    out = {}
    for n in names:
        nll = torch.cat(nll_tok[n]).double()
        count = nll.numel()
        row = {"ppl": math.exp(float(nll.mean())), "nll": float(nll.mean()), "tokens": count, "forward_s": seconds[n]}
        if n == reference:
            row.update(kld=0.0, **{f"kld_p{p}": 0.0 for p in PERCENTILES}, kld_max=0.0, top1=1.0)
        else:
            allk = torch.cat(kld_tok[n]).double().numpy()
            row.update(kld_stats(allk), top1=agree[n] / count)
        if keep_tokens:
            row["nll_tokens"] = nll
            row["kld_tokens"] = torch.from_numpy(allk) if n != reference else torch.zeros(count, dtype=torch.float64)
        out[n] = row
    ref_ppl = out[reference]["ppl"]
    for row in out.values():
        row["ppl_increase"] = (row["ppl"] - ref_ppl) / ref_ppl
    return out


def kld_stats(values: np.ndarray) -> dict[str, float]:
    """Mean, exact percentiles (every token) and max of per-token KLDs."""
    values = np.asarray(values, dtype=np.float64)
    out = {"kld": float(values.mean())}
    for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        out[f"kld_p{p}"] = float(v)
    out["kld_max"] = float(values.max())
    return out


def linear_errors(records: dict[int, dict]) -> list[dict]:
    """Per-linear quantization error from a run's block records, worst output error first."""
    rows = []
    for block, record in records.items():
        for e in record["results"]:
            rows.append(
                {
                    "name": e["name"],
                    "block": int(record.get("block", block)),
                    "bits": e.get("bits"),
                    "group_size": e.get("group_size"),
                    "output_rel_error": e.get("output_rel_error"),
                    "weight_rel_error": e.get("weight_rel_error"),
                }
            )

    def key(r):
        o, w = r["output_rel_error"], r["weight_rel_error"]
        return (-(o if o is not None else -1.0), -(w if w is not None else -1.0), r["name"])

    return sorted(rows, key=key)


# ---------------------------------------------------------------------------- schema

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}

RESULTS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "strata eval results",
    "type": "object",
    "required": ["schema", "kind", "text", "windows", "reference", "machine", "models", "quant_error"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "kind": {"const": "strata-eval"},
        "strata_version": {"type": "string"},
        "created": {"type": "string"},
        "text": {
            "type": "object",
            "required": ["source", "sha256", "stream_tokens"],
            "properties": {
                "source": {"type": "string"},
                "text_field": {"type": "string"},
                "chars": {"type": "integer"},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "stream_tokens": {"type": "integer", "minimum": 0},
            },
        },
        "windows": {
            "type": "object",
            "required": ["count", "context", "stride", "scored_tokens", "token_ids_sha256"],
            "properties": {
                "count": {"type": "integer", "minimum": 1},
                "context": {"type": "integer", "minimum": 2},
                "stride": {"type": "integer", "minimum": 1},
                "scored_tokens": {"type": "integer", "minimum": 1},
                "token_ids_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            },
        },
        "reference": {
            "type": "object",
            "required": ["name", "path"],
            "properties": {"name": {"type": "string"}, "path": {"type": "string"}},
        },
        "params": _INT_OR_NULL,
        "machine": {
            "type": "object",
            "required": ["nproc", "cpu_model", "threads"],
            "properties": {
                "nproc": {"type": "integer"},
                "cpu_model": {"type": "string"},
                "threads": {"type": "integer"},
                "platform": {"type": "string"},
                "torch": {"type": "string"},
                "transformers": _STR_OR_NULL,
                "llama_cpp": _STR_OR_NULL,
            },
        },
        "models": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": [
                    "name",
                    "backend",
                    "format",
                    "reference",
                    "ppl",
                    "nll",
                    "ppl_increase",
                    "tokens",
                    "kld",
                    "kld_p50",
                    "kld_p90",
                    "kld_p99",
                    "kld_max",
                    "top1",
                    "bytes_on_disk",
                    "memory",
                    "speed",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "backend": {"enum": ["transformers", "llama.cpp", "fake-quant"]},
                    "format": {"enum": ["safetensors", "gguf", "gptq", "awq", "compressed-tensors", "results"]},
                    "path": _STR_OR_NULL,
                    "reference": {"type": "boolean"},
                    "ppl": {"type": "number", "exclusiveMinimum": 0},
                    "nll": _NUM,
                    "ppl_increase": _NUM,
                    "tokens": {"type": "integer", "minimum": 1},
                    "forward_s": _NUM,
                    "kld": _NUM,
                    "kld_p50": _NUM,
                    "kld_p90": _NUM,
                    "kld_p99": _NUM,
                    "kld_max": _NUM,
                    "top1": {"type": "number", "minimum": 0, "maximum": 1},
                    "bytes_on_disk": _INT_OR_NULL,
                    "bits_per_weight": _NUM_OR_NULL,
                    "load_s": _NUM_OR_NULL,
                    "memory": {
                        "type": ["object", "null"],
                        "required": ["rss_delta_bytes", "param_bytes"],
                        "properties": {"rss_delta_bytes": {"type": "integer"}, "param_bytes": _INT_OR_NULL},
                    },
                    "speed": {
                        "type": ["object", "null"],
                        "required": ["threads", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens"],
                        "properties": {
                            "threads": {"type": "integer"},
                            "prefill_tokens": {"type": "integer"},
                            "prefill_s": _NUM,
                            "prefill_tokens_per_s": _NUM,
                            "decode_prompt_tokens": {"type": "integer"},
                            "decode_tokens": {"type": "integer"},
                            "decode_tokens_per_s": _NUM_OR_NULL,
                        },
                    },
                },
            },
        },
        "quant_error": {
            "type": ["object", "null"],
            "required": ["run_id", "linears"],
            "properties": {
                "run_id": {"type": "string"},
                "store": {"type": "string"},
                "linears": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "block", "output_rel_error", "weight_rel_error"],
                        "properties": {
                            "name": {"type": "string"},
                            "block": {"type": "integer"},
                            "bits": _INT_OR_NULL,
                            "group_size": _INT_OR_NULL,
                            "output_rel_error": _NUM_OR_NULL,
                            "weight_rel_error": _NUM_OR_NULL,
                        },
                    },
                },
            },
        },
    },
}


def validate_results(data: dict) -> None:
    """Raise EvalError unless ``data`` follows :data:`RESULTS_SCHEMA` (needs jsonschema;
    without it only the version is checked)."""
    if data.get("schema") != SCHEMA_VERSION or data.get("kind") != "strata-eval":
        raise EvalError(f"not a strata eval results file of schema {SCHEMA_VERSION}")
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validate(data, RESULTS_SCHEMA)
    except jsonschema.ValidationError as err:
        raise EvalError(f"eval results do not follow schema {SCHEMA_VERSION}: {err.message}") from None
