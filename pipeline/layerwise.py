"""Held-out scoring of whole models one decoder block at a time, with the workers' own code.

The hidden states of every eval window go through the model block by block, as a run's workers
take the calibration samples: :class:`workers.actor.BlockWorker` embeds the windows and captures
the first block's inputs with the model's own code (``load_samples``), then each block is built
alone from its tensors on the meta device's layer and the states advanced through it
(``advance``, the forward a replay does). Several models ("variants": the reference, RTN, the
run's stored results, a GGUF read by gguf-py) differ only in some tensors, so each block is read
once and every variant's states go through their own copy of it. The final norm and the output
head then run in the model's own forward (the decoder layers replaced by a stand-in returning the
states), one batch of windows at a time, inside :func:`pipeline.eval.evaluate`.

Memory: one block (fp32, once per variant in turn), the hidden states of the windows per variant
and the output head; never the whole model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from strata_quant.pipeline.eval import EvalError, EvalWindows
from strata_quant.pipeline.moe import moe_layout
from strata_quant.workers.actor import BlockWorker
from strata_quant.workers.block import block_linears
from strata_quant.workers.job import WorkerJob
from strata_quant.workers.result import QuantSpec
from strata_quant.workers.rtn import rtn_quantize

# (worker, block, the block's checkpoint tensors by full name, its linears' full names)
#   → the tensors this variant has instead (full names)
BlockOverrides = Callable[[BlockWorker, int, dict[str, torch.Tensor], list[str]], dict[str, torch.Tensor]]


class Variant:
    """One model to score: the checkpoint with some tensors replaced, a block at a time
    (``block``) and outside the blocks (``top``: embedding, final norm, output head → tensor or None)."""

    def __init__(self, block: BlockOverrides | None = None, top: Callable[[str], torch.Tensor | None] | None = None):
        self.block = block or (lambda worker, b, tensors, linears: {})
        self.top = top or (lambda name: None)


def reference() -> Variant:
    return Variant()


def rtn(spec: QuantSpec) -> Variant:
    """Every linear inside the blocks RTN-quantized on ``spec`` (as eval.rtn_weights)."""

    def block(worker, b, tensors, linears):
        return {f"{n}.weight": rtn_quantize(tensors[f"{n}.weight"].float(), spec).dequantize() for n in linears}

    return Variant(block)


def stored_results(results) -> Variant:
    """The run's stored results (dequantized, hash-checked) and folded floats, read as a replay reads
    them (``BlockWorker.results_of``); ``results``: a pipeline.assemble.ResultSource (e.g.
    ``assemble.quantized_only``'s: linears kept in 16-bit stay the checkpoint's)."""

    def block(worker, b, tensors, linears):
        prefix = f"{worker.layers_path}.{b}."
        record = {"results": [e for n, e in results.entries.items() if n.startswith(prefix)]}
        weights, floats = worker.results_of(b, record)
        out = {f"{prefix}{n}.weight": w for n, w in weights.items()}
        out.update({f"{prefix}{n}": t for n, t in floats.items()})
        return out

    return Variant(block)


def gguf_file(path, config: dict) -> Variant:
    """Every tensor as gguf-py reads it from a GGUF file (pipeline.verify.GGUFTensors), as transformers takes it
    from the file: a norm the family stores shifted (Gemma 3: 1 + w) with the shift taken back off."""
    from strata_quant.pipeline.formats.gguf import hf_to_gguf_name
    from strata_quant.pipeline.verify import GGUFTensors

    gguf = GGUFTensors(path, config)

    def read(name: str) -> torch.Tensor:  # a shifted norm (Gemma's file holds 1 + w) in the model's convention
        shift = gguf.layout.norm_shift(name)
        return gguf.tensor(name) - shift if shift else gguf.tensor(name)

    def block(worker, b, tensors, linears):
        return {name: read(name) for name in tensors}

    def top(name):
        return read(name) if hf_to_gguf_name(name) in gguf.by_gguf_name else None

    return Variant(block, top)


class _Replay(nn.Module):
    """Stands in for the first decoder layer: returns the stored final hidden states."""

    hidden: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


class _Pass(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class LayerwiseHead:
    """A variant's final hidden states and output head, scored by :func:`pipeline.eval.evaluate`
    (``logits(ids)``: the next batch of windows, in order)."""

    backend = "layerwise"

    def __init__(self, worker: BlockWorker, top: dict[str, torch.Tensor], batches: list, windows: EvalWindows):
        self.model = copy.deepcopy(worker.meta_model)  # after load_samples: real rotary tables
        layers = self.model.get_submodule(worker.layers_path)
        self._replay = _Replay()
        for i in range(len(layers)):
            layers[i] = self._replay if i == 0 else _Pass()
        for name, tensor in top.items():
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, nn.Parameter(tensor, requires_grad=False))
        self.model.eval()
        self.batches, self.windows, self.next, self.row = batches, windows, 0, 0

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, kwargs = self.batches[self.next]
        want = self.windows.ids[self.row : self.row + hidden.shape[0]]
        if not torch.equal(ids, want):
            raise EvalError("layerwise scoring: windows asked out of order")
        self.next, self.row = self.next + 1, self.row + hidden.shape[0]
        self._replay.hidden = hidden.float()
        with torch.no_grad():
            out = self.model(inputs_embeds=torch.zeros_like(self._replay.hidden), use_cache=False)
        self._replay.hidden = None
        return out.logits.float()


def layerwise_models(
    reader, store, windows: EvalWindows, variants: dict[str, Variant], batch_size: int = 2
) -> dict[str, LayerwiseHead]:
    """Every variant's windows through all blocks, one block in memory at a time; returns the heads
    that give each variant's logits to :func:`pipeline.eval.evaluate` (same ``batch_size``)."""
    job = WorkerJob(
        model_config=reader.config, spec=QuantSpec(), batch_size=batch_size, threads=torch.get_num_threads()
    )
    worker = BlockWorker(0, 1, reader, store, job)
    model = worker.meta_model
    # a MoE: the workers' data for building its blocks from the checkpoint's per-expert tensors
    job.moe_blocks, job.expert_sources, job.moe_renames = moe_layout(model, worker.layers_path)
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed) + ".weight"
    hidden: dict[str, list] = {}
    shared = None
    for name, variant in variants.items():
        own = variant.top(embed_name)
        if own is None and shared is not None:
            hidden[name] = shared
            continue
        worker.load_samples(windows.ids, embedding=own)
        hidden[name] = worker.batches
        if own is None:
            shared = worker.batches
    path = worker.layers_path
    for b in range(reader.num_layers):
        tensors = reader.load_block(b, path)
        prefix = f"{path}.{b}."
        experts = job.expert_sources if b in job.moe_blocks else {}
        linears = [prefix + n for n in [*block_linears(worker.meta_layers[b]), *experts]]
        for name, variant in variants.items():
            block = {**tensors, **variant.block(worker, b, tensors, linears)}
            worker.batches = hidden[name]
            worker.advance(b, {k[len(prefix) :]: t for k, t in block.items()})
            hidden[name] = worker.batches
            del block
        del tensors
    worker.batches = []
    cache: dict[str, torch.Tensor] = {}  # the checkpoint's head tensors, shared by the variants
    return {
        name: LayerwiseHead(worker, _top_tensors(reader, worker, variant, cache), hidden[name], windows)
        for name, variant in variants.items()
    }


def _top_tensors(reader, worker: BlockWorker, variant: Variant, cache: dict) -> dict[str, torch.Tensor]:
    """The parameters outside the blocks the head needs (all but the input embedding), fp32: the
    variant's own, else the checkpoint's (``cache``); a tied output head reads the embedding's."""
    model = worker.meta_model
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed) + ".weight"
    out = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name == embed_name or name.startswith(f"{worker.layers_path}."):
            continue
        tensor = variant.top(name)
        if tensor is None and name not in reader.weight_map:  # tied to the input embedding
            tensor = variant.top(embed_name)
            source = embed_name
        else:
            source = name
        if tensor is None:
            if source not in cache:
                cache[source] = reader.load([source])[source].float()
            tensor = cache[source]
        out[name] = tensor.float()
    return out


def evaluate_artifact(
    path: Path,
    reader,
    results,
    *,
    text: str,
    windows: int,
    seq_len: int,
) -> dict:
    """Held-out perplexity (and KLD, top-1) of a verified artifact against the fp16 checkpoint it came from,
    streamed block by block (:func:`layerwise_models`). A GGUF is scored as gguf-py reads it; a safetensors folder,
    once verified bit-exact, as the checkpoint carrying the solver's dequantized weights (what it decodes to).
    """
    from transformers import AutoTokenizer

    from strata_quant.pipeline.eval import evaluate, prompted_windows

    tokenizer = AutoTokenizer.from_pretrained(reader.path)
    wins = prompted_windows(tokenizer, text, windows, seq_len)
    quantized = gguf_file(path, reader.config) if path.suffix == ".gguf" else stored_results(results)
    name = f"strata {path.name}"
    variants = {"fp16 (reference)": reference(), name: quantized}
    heads = layerwise_models(reader, results.store, wins, variants)
    rows = evaluate(heads, wins, reference="fp16 (reference)")
    return {"text": text, "windows": list(wins.ids.shape), "rows": rows}
