"""The worker: owns a shard of the calibration samples and walks the model block by block.

This class holds no Ray code: pipeline/ wraps it as a Ray actor and hands it a
checkpoint reader and a store (objects with ``load_block(b)`` and ``put_bytes`` /
``get_bytes``). Workers of one run form a torch.distributed group to reduce each
linear's statistics to the worker that owns (solves) it.
"""

from __future__ import annotations

import hashlib
import resource
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from workers.awq import (
    AbsMeanAccumulator,
    apply_clip,
    column_scales,
    fold_scales,
    llama_scale_groups,
    scale_gram,
    search_clip,
    search_scales,
)
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
    method: str = "gptq"  # gptq | rtn | awq | awq_gptq
    propagate: str = "quantized"  # quantized | float
    run_prefix: str = "runs/run"
    batch_size: int = 8
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = True
    mse_grid: int = 0
    true_sequential: bool = True
    awq_grid: int = 20
    awq_duo: bool = False
    awq_clip: bool = True
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


GRAM_METHODS = ("gptq", "awq", "awq_gptq")
AWQ_METHODS = ("awq", "awq_gptq")
# AWQ's rule: no clip search for q/k, whose error reaches the output through the q·k product
AWQ_NO_CLIP = ("q_proj", "k_proj")
FLOAT_SCHEMA_VERSION = 1


def float_to_bytes(name: str, tensor: torch.Tensor, meta: dict) -> bytes:
    """One float tensor (under its checkpoint name) as deterministic safetensors bytes."""
    import json

    return save_safetensors(
        {name: tensor.detach().float().cpu().contiguous()},
        metadata={"strata_float": json.dumps({"schema": FLOAT_SCHEMA_VERSION, **meta}, sort_keys=True)},
    )


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
            quantized, floats = self._read_results(b, replay)
        else:
            quantized, outputs, floats = self._solve_block(b, layer, linears, timings)

        t = time.perf_counter()
        if self.job.propagate == "quantized":
            for name, weight in quantized.items():
                linears[name].weight.data = weight
            for name, tensor in floats.items():  # AWQ's folded norms / biases go with the quantized weights
                layer.get_parameter(name).data = tensor
        self.batches = [(run_block(layer, hidden, kwargs), kwargs) for hidden, kwargs in self.batches]
        timings["forward"] = time.perf_counter() - t
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        return {"block": b, "rank": self.rank, "results": outputs, "timings": timings, "peak_rss_mib": peak_rss_mib}

    def _solve_block(
        self, b: int, layer: nn.Module, linears: dict[str, nn.Linear], timings: dict
    ) -> tuple[dict, list, dict]:
        """Solve every linear of the block.

        Returns {linear: dequantized weight}, the record entries this worker wrote, and
        {float tensor name in the block: folded value} (AWQ; empty otherwise). The layer is
        left as it came in (the caller decides what propagates).

        Linears that read the same input form a group with one Hessian. With true_sequential
        each group is a stage: its statistics come from inputs that already pass through the
        quantized groups before it (q/k/v → o → gate/up → down). Otherwise one stage holds all
        groups and the statistics come from one pass.

        AWQ methods first search the scales of every group on the float block (Gram and
        mean|x| reduced to the group's owner, scales broadcast), fold them all, and only
        then quantize the folded block: RTN with the clip search ("awq"), or GPTQ with
        fresh statistics of the folded block, true-sequential as for "gptq" ("awq_gptq").
        """
        job = self.job
        for phase in ("stats", "reduce", "solve", "broadcast"):
            timings[phase] = 0.0
        solver = "gptq" if job.method in ("gptq", "awq_gptq") else "rtn"
        if job.method in GRAM_METHODS:
            t = time.perf_counter()
            groups = shared_input_groups(layer, *self.batches[0])
            timings["stats"] += time.perf_counter() - t
            stages = [[g] for g in groups] if job.true_sequential and solver == "gptq" else [groups]
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
        if self.group_ready and job.method in GRAM_METHODS:
            dist.all_reduce(total_rows)
        unfolded = {name: p.data for name, p in layer.named_parameters()}
        floats: dict[str, torch.Tensor] = {}
        awq_groups: dict[str, dict] = {}
        if job.method in AWQ_METHODS:
            floats, awq_groups = self._awq_search_and_fold(b, layer, owner_of, int(total_rows), timings)
        originals = {n: m.weight.data for n, m in linears.items()}  # folded, for AWQ

        quantized, outputs = {}, []
        for stage in stages:
            accs: dict[str, HessianAccumulator] = {}
            if solver == "gptq":
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
                awq = awq_groups.get(names[0])
                if solver == "gptq":
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
                elif awq is not None:
                    hessian = awq["hessian"]
                    target = weight
                    if job.awq_clip:
                        ratios = search_clip(weight, hessian, job.spec, grid=job.awq_grid)
                        start = 0
                        for n in names:  # q/k keep their full range (ratio 1)
                            rows = linears[n].out_features
                            if n.rsplit(".", 1)[-1] in AWQ_NO_CLIP:
                                ratios[start : start + rows] = 1.0
                            start += rows
                        target = apply_clip(weight, ratios, job.spec)
                    result = rtn_quantize(target, job.spec, mse_grid=job.mse_grid)
                else:
                    hessian = None
                    result = rtn_quantize(weight, job.spec, mse_grid=job.mse_grid)
                if awq is not None:
                    result.method = job.method
                    result.params.update(awq["params"])
                start = 0
                for n in names:
                    rows = linears[n].out_features
                    part = result.rows(start, start + rows)
                    start += rows
                    solved[n] = part.dequantize()
                    entry = self._store_result(b, n, part, originals[n], solved[n], hessian)
                    if awq is not None and n == names[0]:
                        entry["float_results"] = awq["float_results"]
                    outputs.append(entry)
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

        for name, p in layer.named_parameters():  # the caller decides what propagates
            p.data = unfolded[name]
        return quantized, outputs, floats

    def _awq_search_and_fold(
        self, b: int, layer: nn.Module, owner_of: dict[tuple, int], total_rows: int, timings: dict
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """AWQ scales for every group of the float block, then all folded into ``layer``.

        Per group (in block order): Σ xᵀx and Σ|x| of its input from this worker's samples
        (the forward stops at the group), reduced to the group's owner, which searches the
        scales; the scales are broadcast and, once every group has its scales, every worker
        folds them into its copy of the block (identical arithmetic, so identical tensors).
        Searching all groups before folding any keeps each search on the float weights, as
        the original AWQ does; the folds into v_proj / up_proj rows then precede their own
        quantization.

        Returns the folded float tensors that are not quantized linear weights (norm
        weights, biases of v_proj / up_proj) by name in the block, and, for the groups this
        worker owns, {leader linear: {"hessian": H' of the scaled inputs, "params": …,
        "float_results": record entries of the folded tensors it stored}}.
        """
        job = self.job
        dtype = getattr(torch, job.hessian_dtype)
        linear_weights = {f"{n}.weight" for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        searched = []
        for group in llama_scale_groups(layer):
            key = tuple(group.linears)
            if key not in owner_of:
                raise ValueError(f"AWQ group {key} does not match the block's shared-input groups")
            owner, leader = owner_of[key], group.linears[0]
            t = time.perf_counter()
            grams, means = _collect_stats(layer, self.batches, [leader], dtype, stop_early=True, abs_means=True)
            timings["stats"] += time.perf_counter() - t
            t = time.perf_counter()
            if self.group_ready:
                dist.reduce(grams[leader].sum, dst=owner)
                dist.reduce(means[leader].sum, dst=owner)
            timings["reduce"] += time.perf_counter() - t
            t = time.perf_counter()
            found = None
            if owner == self.rank:
                weight = torch.cat([layer.get_submodule(n).weight.data for n in group.linears], dim=0)
                x_mean = means[leader].mean(total_count=total_rows)
                found = search_scales(
                    weight, grams[leader].sum, x_mean, job.spec, grid=job.awq_grid, duo=job.awq_duo, expand=group.expand
                )
                scales = found.scales.float().contiguous()
                hessian = grams[leader].hessian(total_count=total_rows)
            else:
                scales = torch.empty(group.slots(layer), dtype=torch.float32)
                hessian = None
            del grams, means
            timings["solve"] += time.perf_counter() - t
            t = time.perf_counter()
            if self.group_ready:
                dist.broadcast(scales, src=owner)
            timings["broadcast"] += time.perf_counter() - t
            searched.append((group, owner, scales, found, hessian))

        floats: dict[str, torch.Tensor] = {}
        owned: dict[str, dict] = {}
        for group, owner, scales, found, hessian in searched:
            changed = fold_scales(layer, group, scales)
            entries = []
            for name in changed:
                if name in linear_weights:
                    continue  # a quantized linear (v_proj / up_proj rows): stored as its result
                tensor = layer.get_parameter(name).data
                floats[name] = tensor
                if owner == self.rank:
                    entries.append(self._store_float(b, name, tensor, group))
            if owner == self.rank:
                owned[group.linears[0]] = {
                    "hessian": scale_gram(hessian, column_scales(group, scales)),
                    "params": {
                        "awq_alpha": found.alpha,
                        "awq_grid": job.awq_grid,
                        "awq_duo": job.awq_duo,
                        "awq_clip": job.awq_clip and job.method == "awq",
                        "awq_prev": group.prev,
                        "awq_search_gain": 1.0 - found.loss / found.loss_identity if found.loss_identity > 0 else 0.0,
                    },
                    "float_results": entries,
                }
        return floats, owned

    def _store_float(self, b: int, name: str, tensor: torch.Tensor, group) -> dict:
        full_name = f"{self.layers_path}.{b}.{name}"
        data = float_to_bytes(full_name, tensor, {"method": self.job.method, "folded_from": group.linears})
        key = f"{self.job.run_prefix}/blocks/{b:05d}/{full_name}.float.safetensors"
        self.store.put_bytes(key, data)
        return {
            "name": full_name,
            "key": key,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "shape": list(tensor.shape),
            "dtype": "float32",
        }

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

    def _read_results(self, b: int, record: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Dequantized weights and folded float tensors of a finished block, hash-checked."""
        prefix = f"{self.layers_path}.{b}."
        weights, floats = {}, {}
        for entry in record["results"]:
            data = self.store.get_bytes(entry["key"])
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError(f"stored result {entry['key']} does not match its record")
            weights[entry["name"][len(prefix) :]] = result_from_bytes(data).dequantize()
            for f in entry.get("float_results", []):
                data = self.store.get_bytes(f["key"])
                if hashlib.sha256(data).hexdigest() != f["sha256"]:
                    raise ValueError(f"stored float result {f['key']} does not match its record")
                floats[f["name"][len(prefix) :]] = load_safetensors(data)[f["name"]]
        return weights, floats

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
    return _collect_stats(layer, batches, leaders, dtype, stop_early)[0]


def _collect_stats(
    layer: nn.Module,
    batches: list[tuple[torch.Tensor, dict]],
    leaders: list[str],
    dtype: torch.dtype,
    stop_early: bool = False,
    abs_means: bool = False,
) -> tuple[dict[str, HessianAccumulator], dict[str, AbsMeanAccumulator]]:
    """Σ xᵀx (and with ``abs_means`` Σ|x| per channel) of the named linears' inputs."""
    linears = block_linears(layer)
    accs = {name: HessianAccumulator(linears[name].in_features, dtype=dtype) for name in leaders}
    means = {name: AbsMeanAccumulator(linears[name].in_features) for name in leaders} if abs_means else {}
    seen: set[str] = set()

    def hook(name):
        def fn(_module, args):
            accs[name].add(args[0])
            if abs_means:
                means[name].add(args[0])
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
    return accs, means
