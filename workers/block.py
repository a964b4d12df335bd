"""One decoder block built from its own tensors with the model's own layer class."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the ModuleList of the model's decoder layers."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise ValueError("cannot find the decoder layers of this model")


def materialize_buffers(model: nn.Module, skip: str) -> None:
    """Non-persistent buffers outside ``skip`` (the decoder layers) that the meta device left
    without values (rotary tables, Gemma's embedding scale), made real and set by the model's
    own ``_init_weights``, as transformers does when it loads a checkpoint."""
    owners = {}
    for name, buf in model.named_buffers():
        if buf.is_meta and not name.startswith(skip + "."):
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner._buffers[attr] = torch.empty_like(buf, device="cpu")
            owners[owner_name] = owner
    with torch.no_grad():
        for owner in owners.values():
            model._init_weights(owner)


class _Stop(Exception):
    pass


def probe_layer(model: nn.Module, tokens: int = 16, seed: int = 0) -> tuple[nn.Module, torch.Tensor, dict]:
    """Layer 0 of a causal LM built on the meta device, made real (float32) with random weights,
    a random input of ``tokens`` positions and the arguments the model's own forward passes the
    layer (mask, rotary tables): what :func:`trace_block` needs to learn the block's structure
    before any checkpoint tensor is read. (The model's buffers outside the layers are made real.)"""
    layers_path, layers = decoder_layers(model)
    materialize_buffers(model, layers_path)
    seen: dict = {}

    def catch(_module, args, kwargs):
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
        raise _Stop

    gen = torch.Generator().manual_seed(seed)
    hidden = int(model.config.hidden_size)
    sample = torch.randn(1, tokens, hidden, generator=gen)
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            model(inputs_embeds=sample, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    import copy

    layer = copy.deepcopy(layers[0]).float().to_empty(device="cpu")  # float32 on meta first: no fp16 copy
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if param.dim() == 1:  # norms and biases: near one (a norm) or small (a bias)
                param.copy_(("norm" in name) + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return layer.eval(), sample, seen["kwargs"]


def build_block(meta_layer: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A real copy of ``meta_layer`` (a layer on the meta device) holding ``tensors``."""
    import copy

    layer = copy.deepcopy(meta_layer)
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    missing = set(layer.state_dict().keys()) - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks tensors of this block: {sorted(missing)}")
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


def block_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The block's linear layers by their name inside the block, in module order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@dataclass(frozen=True)
class BlockTrace:
    """What one batch run through a decoder block shows of its structure.

    ``order``: the linears in the order they ran; ``groups``: the linears that read the very
    same input tensor (q/k/v, gate/up …; a fused qkv_proj alone), in execution order;
    ``feeders``: per group, the module of the block whose output *is* that input tensor (the
    norm before q/k/v or gate/up), or None when the input is computed in the module's own
    code (attention output, act(gate)·up); ``unreached``: linears the batch never reached;
    ``score_rows``: per linear, the output rows (ranges) that feed the attention scores Q·Kᵀ
    (:func:`attention_score_rows`); ``returns``: (module, linear, extra) for each submodule
    whose output *is* a linear's output (``extra``: None for a bare tensor, else how many
    ``None`` follow it in the returned tuple, as an attention returns (output, None));
    ``reads``: (module, group index) for each submodule whose first argument *is* a group's
    input (the MLP reads the gate/up input).
    """

    order: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    feeders: tuple[str | None, ...]
    unreached: tuple[str, ...]
    score_rows: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
    returns: tuple[tuple[str, str, int | None], ...] = ()
    reads: tuple[tuple[str, int], ...] = ()

    def score_rows_of(self, names: list[str], rows: dict[str, int]) -> list[tuple[int, int]]:
        """The score rows of a stacked group (``names`` with ``rows`` output rows each), as
        ranges of the stack's rows."""
        own = dict(self.score_rows)
        out, at = [], 0
        for n in names:
            out.extend((at + a, at + b) for a, b in own.get(n, ()))
            at += rows[n]
        return out


def trace_block(layer: nn.Module, sample: torch.Tensor, kwargs: dict) -> BlockTrace:
    """The block's structure from its own code: one forward of ``sample`` with hooks.

    A pre-hook on every linear notes the input tensor it receives (kept alive while the
    block runs, so identity is unambiguous); a forward hook on every other submodule notes
    which module produced each output tensor (the innermost one: a child finishes first).
    No per-architecture table is involved.
    """
    import weakref

    linears = block_linears(layer)
    seen: list[tuple[torch.Tensor, list[str]]] = []
    order: list[str] = []
    produced: dict[int, tuple[str, weakref.ref]] = {}
    hooks = []

    def pre(name):
        def fn(_module, args):
            order.append(name)
            for tensor, names in seen:
                if tensor is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))

        return fn

    linear_out: dict[str, weakref.ref] = {}
    returns: list[tuple[str, str, int | None]] = []
    reads: list[tuple[str, int]] = []

    def post(name):
        def fn(_module, args, out):
            if name in linears:
                linear_out[name] = weakref.ref(out)
            else:
                _note_module(name, args, out, seen, linear_out, returns, reads)
            if not isinstance(out, torch.Tensor):
                return
            known = produced.get(id(out))
            if known is None or known[1]() is not out:  # new, or a freed tensor's reused id
                produced[id(out)] = (name, weakref.ref(out))

        return fn

    for name, module in layer.named_modules():
        if not name:
            continue
        if name in linears:
            hooks.append(module.register_forward_pre_hook(pre(name)))
        hooks.append(module.register_forward_hook(post(name)))
    try:
        with torch.no_grad():
            layer(sample, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    feeders = []
    for tensor, _ in seen:
        hit = produced.get(id(tensor))
        feeders.append(hit[0] if hit is not None and hit[1]() is tensor else None)
    return BlockTrace(
        order=tuple(order),
        groups=tuple(tuple(names) for _, names in seen),
        feeders=tuple(feeders),
        unreached=tuple(n for n in linears if n not in order),
        score_rows=tuple(attention_score_rows(layer, sample, kwargs).items()),
        returns=tuple(returns),
        reads=tuple(reads),
    )


def _note_module(name, args, out, seen, linear_out, returns, reads) -> None:
    """:func:`trace_block`'s record of a non-linear submodule: whether its output is a linear's
    output (bare, or first of a tuple whose other items are None) and whether its first
    argument is a group's input."""
    first = out[0] if isinstance(out, tuple) and out else out
    extra = None if isinstance(out, torch.Tensor) else len(out) - 1 if isinstance(out, tuple) else -1
    if extra != -1 and (extra is None or all(o is None for o in out[1:])):
        hit = next((n for n, ref in linear_out.items() if ref() is first), None)
        if hit is not None:
            returns.append((name, hit, extra))
    if args:
        hit = next((i for i, (tensor, _) in enumerate(seen) if tensor is args[0]), None)
        if hit is not None:
            reads.append((name, hit))


class _Scores(torch.overrides.TorchFunctionMode):
    """Catches the first attention-score product of a forward (the query and key of
    ``scaled_dot_product_attention``, or a 4-D ``matmul`` of eager attention) and stops it."""

    def __init__(self):
        super().__init__()
        self.qk: tuple[torch.Tensor, torch.Tensor] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.qk = (args[0] if args else kwargs["query"], args[1] if len(args) > 1 else kwargs["key"])
            raise _Stop
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and all(
            isinstance(a, torch.Tensor) and a.dim() == 4 for a in args[:2]
        ):
            self.qk = (args[0], args[1])
            raise _Stop
        return func(*args, **kwargs)


def attention_score_rows(
    layer: nn.Module, sample: torch.Tensor, kwargs: dict
) -> dict[str, tuple[tuple[int, int], ...]]:
    """Per linear, the ranges of its output rows that the attention scores Q·Kᵀ depend on.

    The block runs (with gradients) until its attention forms the scores; the gradient of
    a random projection of Q and K reaches exactly the output channels of the linears that feed them: all of
    q_proj and k_proj in a Llama block, the q and k rows of a fused qkv_proj (Phi-3), none of
    v_proj or of the linears after the attention. Linears whose outputs never reach the scores
    are left out; a block without attention gives {}.
    """
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(_module, _args, out):
            outputs[name] = out

        return fn

    linears = block_linears(layer)
    hooks = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
    mode = _Scores()
    try:
        with torch.enable_grad(), mode:
            sample = sample.detach().requires_grad_()  # every later tensor is in the graph
            try:
                layer(sample, **kwargs)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    if mode.qk is None:
        return {}
    names = [n for n in outputs if outputs[n].requires_grad]
    # random weights, not a plain sum: a norm inside the attention (q_norm) can make Σ Q constant
    gen = torch.Generator(device=mode.qk[0].device).manual_seed(0)
    probe = sum((t * torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)).sum() for t in mode.qk)
    grads = torch.autograd.grad(probe, [outputs[n] for n in names], allow_unused=True)
    found = {}
    for n, g in zip(names, grads):
        if g is None:
            continue
        reached = (g.reshape(-1, g.shape[-1]) != 0).any(0).tolist()
        ranges, start = [], None
        for i, hit in enumerate([*reached, False]):
            if hit and start is None:
                start = i
            elif not hit and start is not None:
                ranges.append((start, i))
                start = None
        if ranges:
            found[n] = tuple(ranges)
    return found


def shared_input_groups(layer: nn.Module, sample: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Linears grouped by the input tensor they read (q/k/v, gate/up …), in execution order
    (:func:`trace_block`'s groups)."""
    return [list(g) for g in trace_block(layer, sample, kwargs).groups]


def run_block(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The block's output hidden states for one batch."""
    with torch.no_grad():
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class StageLayout:
    """The modules the stage passes stand in for, found by :func:`stage_layout`: the attention
    module (its output is ``o``'s output, followed by ``attn_extra`` Nones) and the MLP module
    (its input is the ``gate`` group's input, its output is ``down``'s output)."""

    attn: str
    o: str
    attn_extra: int | None
    mlp: str
    gate: str
    down: str


def stage_layout(trace: BlockTrace, stages: list[list[list[str]]]) -> StageLayout | None:
    """The layout of a true-sequential block whose four stages are, by the traced structure,
    attention-in (q/k/v or a fused qkv) → attention-out → MLP-in (gate/up or a fused gate_up) →
    MLP-out: each stage one group, the attention module returning the second stage's linear's
    output and enclosing the first's, the MLP module reading the third stage's input, returning
    the fourth's output and enclosing both. None when the block has another shape (names play
    no part: Llama, Qwen, Mistral, Gemma 3 and Phi-3 all have this one)."""
    if len(stages) != 4 or any(len(stage) != 1 for stage in stages):
        return None
    (qkv,), (o_group,), (gate_group,), (down_group,) = stages
    if len(o_group) != 1 or len(down_group) != 1:
        return None
    o, down = o_group[0], down_group[0]
    gate_index = next((i for i, g in enumerate(trace.groups) if list(g) == list(gate_group)), None)

    def inside(module: str, names) -> bool:
        return all(n.startswith(module + ".") for n in names)

    attn = next((m for m, n, _ in trace.returns if n == o and inside(m, [*qkv, o])), None)
    reads = {m for m, i in trace.reads if i == gate_index}
    mlp = next((m for m, n, x in trace.returns if n == down and x is None and m in reads), None)
    if attn is None or mlp is None or not inside(mlp, [*gate_group, down]) or inside(attn, [down]):
        return None
    extra = next(x for m, n, x in trace.returns if m == attn and n == o)
    return StageLayout(attn, o, extra, mlp, gate_group[0], down)


class StagePasses:
    """The forward passes of one true-sequential block (:class:`StageLayout`), each reusing what
    the pass before it computed: about one forward of the block for all four stages' statistics
    and the propagation, instead of 0 + ¾ + … of a forward per stage plus a full one.

    The stages quantize q/k/v, then o, then gate/up, then down; stage s's statistics need the
    inputs of its linears with the earlier stages already quantized. Kept per batch:

    * ``o_in`` — o_proj's input, seen in stage 2's pass (q/k/v final from then on);
    * ``mlp_in`` — gate/up's input, seen in stage 3's pass (o final from then on);
    * ``down_in`` — down_proj's input, seen in stage 4's pass (gate/up final from then on).

    Stage 3 runs the block with the attention module answering ``o_proj(o_in)``; stage 4 runs
    only ``mlp(mlp_in)``; the propagation (every linear final) runs the block with the
    attention answering ``o_proj(o_in)`` and the MLP answering ``down_proj(down_in)``. The
    layer's own forward does the norms and residual additions, and the stand-ins apply the same
    modules to the same tensors as the full forward would, so every result is bit-identical to
    running the whole block each time (tests/test_scaleout.py compares the bytes).
    """

    def __init__(self, layer: nn.Module, n_batches: int, layout: StageLayout):
        self.layer, self.layout = layer, layout
        self.current = 0
        self.o_in: list[torch.Tensor | None] = [None] * n_batches
        self.mlp_in: list[torch.Tensor | None] = [None] * n_batches
        self.down_in: list[torch.Tensor | None] = [None] * n_batches
        modules = dict(layer.named_modules())
        self.attn, self.mlp = modules[layout.attn], modules[layout.mlp]
        self.o_proj, self.down_proj = modules[layout.o], modules[layout.down]
        self._hooks = [
            modules[name].register_forward_pre_hook(self._keep(store))
            for name, store in ((layout.o, self.o_in), (layout.gate, self.mlp_in), (layout.down, self.down_in))
        ]

    def _attn_answer(self, i: int):
        out = self.o_proj(self.o_in[i])
        return out if self.layout.attn_extra is None else (out, *[None] * self.layout.attn_extra)

    def _keep(self, store: list):
        def fn(_module, args):
            store[self.current] = args[0]

        return fn

    def close(self) -> None:
        """Stop recording (the kept inputs stay for :meth:`forward`)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def run(self, i: int, hidden: torch.Tensor, kwargs: dict, leaders: list[str]) -> None:
        """The statistics pass of batch ``i`` for the stage led by ``leaders`` (its forward
        pre-hooks stop the pass once they have seen their input)."""
        self.current = i
        with torch.no_grad():
            if leaders == [self.layout.down] and self.mlp_in[i] is not None:
                self.mlp(self.mlp_in[i])
            elif leaders == [self.layout.gate] and self.o_in[i] is not None:
                with _answers(self.attn, lambda: self._attn_answer(i)):
                    run_block(self.layer, hidden, kwargs)
            else:
                run_block(self.layer, hidden, kwargs)

    def forward(self, i: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Batch ``i``'s output of the block with every stage's weights final."""
        if self.o_in[i] is None or self.down_in[i] is None:
            return run_block(self.layer, hidden, kwargs)
        with (
            _answers(self.attn, lambda: self._attn_answer(i)),
            _answers(self.mlp, lambda: self.down_proj(self.down_in[i])),
        ):
            return run_block(self.layer, hidden, kwargs)


class _answers:
    """Within the ``with``, ``module(...)`` returns ``value()`` instead of running its forward."""

    def __init__(self, module: nn.Module, value):
        self.module, self.value = module, value

    def __enter__(self):
        self.module.forward = lambda *args, **kwargs: self.value()
        return self

    def __exit__(self, *exc):
        del self.module.forward
