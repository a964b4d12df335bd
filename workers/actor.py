"""The worker: owns a shard of the calibration samples and walks the model block by block.

This class holds no Ray code: pipeline/ wraps it as a Ray actor and hands it a
checkpoint reader and a store (objects with ``load_block(b)`` and ``put_bytes`` /
``get_bytes``). Workers of one run form a torch.distributed group to reduce each
linear's statistics to the worker that owns (solves) it.
"""

from __future__ import annotations

import hashlib
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from workers.block import block_linears, build_block, decoder_layers, run_block, shared_input_groups
from workers.gptq import gptq_quantize, relative_output_error
from workers.result import QuantizedLinear, QuantSpec
from workers.rtn import rtn_quantize
from workers.stats import HessianAccumulator


@dataclass
class WorkerJob:
    """What every worker of a run needs to know (plain data, sent once)."""

    model_config: dict
    spec: QuantSpec
    method: str = "gptq"  # gptq | rtn
    propagate: str = "quantized"  # quantized | float
    run_prefix: str = "runs/run"
    batch_size: int = 8
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = True
    mse_grid: int = 0
    true_sequential: bool = True
    hessian_dtype: str = "float64"
    threads: int = 1
    extra: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def result_to_bytes(result: QuantizedLinear) -> bytes:
    tensors, metadata = result.to_tensors()
    return save_safetensors({k: v.cpu() for k, v in tensors.items()}, metadata=metadata)


def result_from_bytes(data: bytes) -> QuantizedLinear:
    tensors = load_safetensors(data)
    metadata = _safetensors_metadata(data)
    return QuantizedLinear.from_tensors(tensors, metadata)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    import json
    import struct

    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {})


def assign_owners(costs: list[float], world: int) -> list[int]:
    """Longest-processing-time-first: each unit of work to the least-loaded worker (deterministic)."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for the first decoder layer and records what the model feeds it."""

    def __init__(self):
        super().__init__()
        self.captured: tuple[torch.Tensor, dict] | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.captured = (hidden_states, kwargs)
        raise _StopForward


class BlockWorker:
    def __init__(self, rank: int, world: int, reader, store, job: WorkerJob):
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.set_num_threads(max(1, job.threads))
        self.rank, self.world = rank, world
        self.reader, self.store, self.job = reader, store, job
        config_dict = dict(job.model_config)
        model_type = config_dict.pop("model_type")
        self.config = AutoConfig.for_model(model_type, **config_dict)
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.meta_model = AutoModelForCausalLM.from_config(self.config)
        self.layers_path, self.meta_layers = decoder_layers(self.meta_model)
        self.batches: list[tuple[torch.Tensor, dict]] = []
        self.group_ready = False

    # -- setup ---------------------------------------------------------------------

    def rendezvous(self) -> int:
        return free_port()

    def init_group(self, address: str, port: int) -> None:
        if self.world > 1:
            dist.init_process_group(
                "gloo", init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.world
            )
            self.group_ready = True

    def load_samples(self, token_ids: torch.Tensor) -> int:
        """Embed this worker's samples and capture the block inputs with the model's own code."""
        model = self.meta_model
        embed = model.get_input_embeddings()
        embed_name = next(n for n, m in model.named_modules() if m is embed) + ".weight"
        weight = self.reader.load([embed_name])[embed_name].float()
        embed.weight = nn.Parameter(weight, requires_grad=False)
        for name, module in list(model.named_modules()):
            if type(module).__name__.endswith("RotaryEmbedding"):
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, type(module)(config=self.config))
        first = self.meta_layers[0]
        catcher = _Catcher()
        self.meta_layers[0] = catcher
        self.batches = []
        try:
            for start in range(0, token_ids.shape[0], self.job.batch_size):
                ids = token_ids[start : start + self.job.batch_size]
                try:
                    with torch.no_grad():
                        model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
                hidden, kwargs = catcher.captured
                kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
                self.batches.append((hidden.detach().float(), kwargs))
        finally:
            self.meta_layers[0] = first
            embed.to("meta")
        return sum(h.shape[0] for h, _ in self.batches)

    # -- the per-block step --------------------------------------------------------

    def process_block(self, b: int, replay: dict | None = None) -> dict:
        """Statistics, reduction, solves, store writes and propagation for block ``b``.

        ``replay`` (a finished block's record) skips the solves: the stored results are
        read back and the samples advanced through them, as on resume.
        """
        timings: dict[str, float] = {}
        t = time.perf_counter()
        prefix = f"{self.layers_path}.{b}."
        tensors = self.reader.load_block(b)
        layer = build_block(self.meta_layers[b], {k[len(prefix) :]: v for k, v in tensors.items()}, torch.float32)
        linears = block_linears(layer)
        timings["load"] = time.perf_counter() - t

        outputs: list[dict] = []
        if replay is not None:
            quantized = self._read_results(b, replay)
        else:
            quantized, outputs = self._solve_block(b, layer, linears, timings)

        t = time.perf_counter()
        if self.job.propagate == "quantized":
            for name, weight in quantized.items():
                linears[name].weight.data = weight
        self.batches = [(run_block(layer, hidden, kwargs), kwargs) for hidden, kwargs in self.batches]
        timings["forward"] = time.perf_counter() - t
        return {"block": b, "rank": self.rank, "results": outputs, "timings": timings}

    def _solve_block(self, b: int, layer: nn.Module, linears: dict[str, nn.Linear], timings: dict) -> tuple[dict, list]:
        """Solve every linear of the block; returns {linear: dequantized weight} and record entries.

        Linears that read the same input form a group with one Hessian. With true_sequential
        each group is a stage: its statistics come from inputs that already pass through the
        quantized groups before it (q/k/v → o → gate/up → down). Otherwise one stage holds all
        groups and the statistics come from one pass.
        """
        job = self.job
        for phase in ("stats", "reduce", "solve", "broadcast"):
            timings[phase] = 0.0
        if job.method == "gptq":
            t = time.perf_counter()
            groups = shared_input_groups(layer, *self.batches[0])
            timings["stats"] += time.perf_counter() - t
            stages = [[g] for g in groups] if job.true_sequential else [groups]
        else:
            groups = [[name] for name in linears]
            stages = [groups]
        costs = []
        for names in groups:
            k = linears[names[0]].in_features
            rows = sum(linears[n].out_features for n in names)
            costs.append(float(k) ** 3 + float(k) ** 2 * rows)
        owner_of = {tuple(g): o for g, o in zip(groups, assign_owners(costs, self.world))}
        total_rows = torch.tensor([sum(h.shape[0] * h.shape[1] for h, _ in self.batches)], dtype=torch.int64)
        if self.group_ready and job.method == "gptq":
            dist.all_reduce(total_rows)
        originals = {n: m.weight.data for n, m in linears.items()}

        quantized, outputs = {}, []
        for stage in stages:
            accs: dict[str, HessianAccumulator] = {}
            if job.method == "gptq":
                t = time.perf_counter()
                leaders = [names[0] for names in stage]
                accs = collect_hessians(
                    layer, self.batches, leaders, getattr(torch, job.hessian_dtype), stop_early=job.true_sequential
                )
                timings["stats"] += time.perf_counter() - t
                t = time.perf_counter()
                if self.group_ready:
                    for names in stage:
                        dist.reduce(accs[names[0]].sum, dst=owner_of[tuple(names)])
                timings["reduce"] += time.perf_counter() - t

            t = time.perf_counter()
            solved = {}
            for names in stage:
                if owner_of[tuple(names)] != self.rank:
                    continue
                weight = torch.cat([originals[n] for n in names], dim=0)
                if job.method == "gptq":
                    hessian = accs[names[0]].hessian(total_count=int(total_rows))
                    result = gptq_quantize(
                        weight,
                        hessian,
                        job.spec,
                        damp=job.damp,
                        block_size=job.block_size,
                        act_order=job.act_order,
                        static_groups=job.static_groups,
                        mse_grid=job.mse_grid,
                    )
                    result.params["true_sequential"] = job.true_sequential
                else:
                    hessian = None
                    result = rtn_quantize(weight, job.spec, mse_grid=job.mse_grid)
                start = 0
                for n in names:
                    rows = linears[n].out_features
                    part = result.rows(start, start + rows)
                    start += rows
                    solved[n] = part.dequantize()
                    outputs.append(self._store_result(b, n, part, originals[n], solved[n], hessian))
            timings["solve"] += time.perf_counter() - t

            t = time.perf_counter()
            needed = job.propagate == "quantized" or job.true_sequential
            for names in stage:
                owner = owner_of[tuple(names)]
                for n in names:
                    if owner == self.rank:
                        quantized[n] = solved[n]
                    elif needed:
                        quantized[n] = torch.empty_like(originals[n])
                    if needed and self.group_ready:
                        dist.broadcast(quantized[n], src=owner)
                    if job.true_sequential:
                        linears[n].weight.data = quantized[n]
            timings["broadcast"] += time.perf_counter() - t

        for n, weight in originals.items():  # the caller decides what propagates
            linears[n].weight.data = weight
        return quantized, outputs

    def _store_result(self, b, name, result, weight, dequant, hessian) -> dict:
        full_name = f"{self.layers_path}.{b}.{name}"
        data = result_to_bytes(result)
        key = f"{self.job.run_prefix}/blocks/{b:05d}/{full_name}.safetensors"
        self.store.put_bytes(key, data)
        info = {
            "name": full_name,
            "key": key,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "shape": list(result.shape),
            "bits": result.spec.bits,
            "group_size": result.spec.group_size,
            "sym": result.spec.sym,
            "weight_rel_error": float((weight - dequant).pow(2).sum() / weight.pow(2).sum().clamp(min=1e-30)),
        }
        if hessian is not None:
            info["output_rel_error"] = relative_output_error(weight, dequant, hessian)
        return info

    def _read_results(self, b: int, record: dict) -> dict[str, torch.Tensor]:
        prefix = f"{self.layers_path}.{b}."
        weights = {}
        for entry in record["results"]:
            data = self.store.get_bytes(entry["key"])
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError(f"stored result {entry['key']} does not match its record")
            weights[entry["name"][len(prefix) :]] = result_from_bytes(data).dequantize()
        return weights

    def shutdown(self) -> None:
        if self.group_ready:
            dist.destroy_process_group()
            self.group_ready = False


def collect_hessians(
    layer: nn.Module,
    batches: list[tuple[torch.Tensor, dict]],
    leaders: list[str],
    dtype: torch.dtype,
    stop_early: bool = False,
) -> dict[str, HessianAccumulator]:
    """Σ xᵀx of the inputs of the named linears over all batches.

    With ``stop_early`` the forward of a batch stops as soon as every named linear has seen
    its input, so a stage early in the block costs only the part of the block before it.
    """
    linears = block_linears(layer)
    accs = {name: HessianAccumulator(linears[name].in_features, dtype=dtype) for name in leaders}
    seen: set[str] = set()

    def hook(name):
        def fn(_module, args):
            accs[name].add(args[0])
            seen.add(name)
            if stop_early and len(seen) == len(leaders):
                raise _StopForward

        return fn

    if not batches:
        raise ValueError("this worker holds no calibration samples")
    hooks = [linears[name].register_forward_pre_hook(hook(name)) for name in leaders]
    try:
        for hidden, kwargs in batches:
            seen.clear()
            try:
                run_block(layer, hidden, kwargs)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return accs
