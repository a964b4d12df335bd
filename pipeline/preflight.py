"""Everything that can refuse a job, checked before any worker starts (``strata check CONFIG``).

Reads config.json, the safetensors headers, the tokenizer and the calibration text; starts no
Ray and reads no weights. Each format's requirements are checked by the format's own code run
on stand-ins of the model's linears (zero-stride tensors of the real shapes: no memory), the
GGUF metadata by gguf.py's own builders on a writer that writes nothing, and the GGUF tokenizer
by llama.cpp itself on a vocabulary-only file. ``run_full_job`` runs the same checks first.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from strata_quant.pipeline.config import TOOLBOX_FORMATS, ConfigError, JobConfig, check_head_dim
from strata_quant.workers.methods import matches_module, spec_with_overrides
from strata_quant.workers.result import QuantizedLinear, QuantSpec


@dataclass
class Preflight:
    """What the checks found: the prepared inputs (handed on to the run) and one line per check."""

    reader: object
    token_ids: torch.Tensor
    tokenizer: object
    structure: object  # the traced block structure (pipeline.structure.BlockStructure)
    passed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_job(cfg: JobConfig, *, outputs: bool = True) -> Preflight:
    """Run every plan-time check of ``cfg``; the first failure raises (ConfigError, CheckpointError,
    CalibrationError or StoreError) with a message that names the problem."""
    from strata_quant.pipeline.run import check_checkpoint, prepare, shard_samples

    reader, token_ids, tokenizer, structure = prepare(
        cfg
    )  # checkpoint headers and blocks, config vs model, calibration
    _trim_heap()  # the tokenizer's buffers for the whole calibration text go back before Ray starts
    pf = Preflight(reader, token_ids, tokenizer, structure)
    layers_path = check_checkpoint(reader)
    pf.passed.append(
        f"checkpoint: {reader.num_layers} blocks under {layers_path}, {reader.num_params() / 1e9:.2f} B parameters"
    )
    pf.passed.append(f"calibration: {token_ids.shape[0]} samples × {token_ids.shape[1]} tokens")
    shards = shard_samples(token_ids, cfg.run.workers, cfg.run.batch_size)  # as the run shards them
    pf.passed.append(
        f"workers: {cfg.run.workers}, each fed {min(s.shape[0] for s in shards)}-{max(s.shape[0] for s in shards)} "
        f"samples in batches of {cfg.run.batch_size}"
    )
    head_dim = check_head_dim(reader.config)  # (prepare checked it before building the layer class)
    check_shapes(reader)
    pf.passed.append(f"shapes: every tensor as config.json gives it (head_dim {head_dim})")
    shapes = linear_shapes(cfg, reader, layers_path)
    for fmt in cfg.output.formats:
        check_format(fmt, cfg, shapes)
    if (moe_line := check_moe_formats(cfg, reader.config)) is not None:
        pf.passed.append(moe_line)
    if "gguf" in cfg.output.formats:
        pf.passed.append(check_gguf(cfg, reader, tokenizer, pf.notes))
    if cfg.output.formats:
        pf.passed.append(f"formats: {', '.join(cfg.output.formats)} hold all {len(shapes)} linear shape(s)")
    check_store(cfg, pf)
    if cfg.eval is not None:
        check_eval(cfg, tokenizer)
        texts = cfg.eval.text + (f" and (off domain) {cfg.eval.off_domain}" if cfg.eval.off_domain else "")
        pf.passed.append(f"eval: {cfg.eval.windows} windows × {cfg.eval.seq_len} tokens of {texts}")
    if outputs:
        check_outputs(cfg)
    return pf


def _trim_heap() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back
        pass


def check_shapes(reader) -> None:
    """Every checkpoint tensor has the shape the model's own class, built from config.json on the
    meta device, gives it (a wrong head_dim, width or vocabulary in config.json shows here)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(reader.config)
    model_type = config_dict.pop("model_type", None)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config_dict))
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"transformers cannot build model_type {model_type!r} from config.json: {err}") from None
    want = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    bad = [(n, tuple(reader.shape(n)), want[n]) for n in reader.tensor_names if n in want]
    bad = [b for b in bad if b[1] != b[2]]
    if bad:
        name, have, expected = bad[0]
        raise ConfigError(
            f"{len(bad)} checkpoint tensor(s) differ from the shapes config.json implies, e.g. {name}: {have} in the "
            f"shards, {expected} from config.json (check head_dim, the head counts and the widths)"
        )


def linear_shapes(cfg: JobConfig, reader, layers_path: str) -> dict[tuple[int, int, QuantSpec], str]:
    """(out, in, grid) of every linear the run quantizes (:func:`pipeline.run.block_linear_names`: a MoE's
    per-expert linears, not its routers) → the first linear of that shape."""
    from strata_quant.pipeline.overrides import bits_spec_overrides
    from strata_quant.pipeline.structure import block_linear_names

    base = QuantSpec(cfg.quant.bits, cfg.quant.group_size, cfg.quant.sym)
    overrides = bits_spec_overrides(cfg.quant.bits_overrides)
    out: dict[tuple[int, int, QuantSpec], str] = {}
    for linears in block_linear_names(reader).values():
        for module in linears:
            shape = reader.shape(f"{module}.weight")
            if len(shape) != 2 or matches_module(module, cfg.quant.modules_to_not_convert):
                continue
            try:
                spec = spec_with_overrides(base, module, overrides)
            except ValueError as err:
                raise ConfigError(f"quant.bits_overrides for {module}: {err}") from None
            out.setdefault((int(shape[0]), int(shape[1]), spec), module)
    if not out:
        raise ConfigError("the model has no linear inside its decoder blocks to quantize")
    return out


def stand_in(n_rows: int, n_cols: int, spec: QuantSpec, cfg: JobConfig) -> QuantizedLinear:
    """A result of the real shape and grid whose tensors are zero-stride views (no memory), with
    the g_idx layout the solver will produce (act-order without static groups: out of order)."""
    n_groups = spec.num_groups(n_cols)
    g_idx = torch.arange(n_cols, dtype=torch.int32) // spec.group_len(n_cols)
    if cfg.quant.act_order and not cfg.quant.static_groups and n_groups > 1:
        g_idx = g_idx.flip(0)
    zero = spec.sym_zero if spec.sym else 0
    return QuantizedLinear(
        spec=spec,
        codes=torch.zeros((), dtype=torch.uint8).expand(n_rows, n_cols),
        scales=torch.ones((), dtype=torch.float16).expand(n_rows, n_groups),
        zeros=torch.full((), zero, dtype=torch.uint8).expand(n_rows, n_groups),
        g_idx=g_idx,
        method=cfg.quant.method,
    )


def check_format(fmt: str, cfg: JobConfig, shapes: dict[tuple[int, int, QuantSpec], str]) -> None:
    """Each linear shape through the registered format's own storability rules (``Format.check``);
    ConfigError naming the linear."""
    from strata_quant.pipeline.assemble import format_for, options_of

    if cfg.quant.method in TOOLBOX_FORMATS:  # NF4 / FP8 results: checked by config.check_against_model
        return
    checker, options = format_for(fmt, cfg.quant.method)(), options_of(cfg)
    for (n_rows, n_cols, spec), linear in shapes.items():
        try:
            checker.check(stand_in(n_rows, n_cols, spec, cfg), options)
        except ValueError as err:
            raise ConfigError(f"{fmt} output cannot hold {linear} ({n_rows}×{n_cols}, {spec}): {err}") from None


def check_moe_formats(cfg: JobConfig, config: dict) -> str | None:
    """A Mixture-of-Experts model: each output format names the reader that loads its experts
    (pipeline.formats.moe), or the job is refused naming the family; None for a dense model."""
    from strata_quant.pipeline.formats import moe as moe_format

    if not moe_format.is_moe(config):
        return None
    readers = [f"{fmt}: {moe_format.check_moe_format(fmt, config)}" for fmt in cfg.output.formats]
    return f"Mixture-of-Experts {config.get('model_type')!r}: " + "; ".join(readers)


def _dry_writer(cfg: JobConfig, reader):
    """A GGUFWriter holding the metadata the GGUF of this job gets (gguf.py's own builders)."""
    from gguf import GGUFWriter

    from strata_quant.pipeline.formats import gguf as gguf_format
    from strata_quant.pipeline.formats.gguf_solved import llama_file_type, solves_mix

    layout = gguf_format.GGUFLayout(reader.config)
    writer = GGUFWriter(None, layout.arch)
    if solves_mix(cfg.output.gguf_type, cfg.quant.method):
        target = llama_file_type(cfg.output.gguf_type)
    else:
        target, _ = gguf_format.resolve_type(cfg.output.gguf_type, cfg.quant.bits, cfg.quant.sym)
    layout.add_metadata(writer, name=cfg.name, file_type=gguf_format.FILE_TYPES.get(target, 2))
    meta = gguf_format.tokenizer_metadata(str(reader.path), vocab_size=int(reader.config["vocab_size"]))
    gguf_format.add_tokenizer_metadata(writer, meta, pre=cfg.output.gguf_tokenizer_pre)
    return writer, layout.arch


def check_gguf(cfg: JobConfig, reader, tokenizer, notes: list[str]) -> str:
    """GGUF: every tensor has a GGUF name, the metadata builds (rope scaling, tokenizer model),
    the attention width is one llama.cpp reads, and llama.cpp loads the vocabulary with
    ``output.gguf_tokenizer_pre`` and tokenizes as the model's tokenizer does."""
    from strata_quant.pipeline.formats import gguf as gguf_format

    try:  # family layout, rope type, tensor names, tokenizer (gguf.py's own plan-time check)
        gguf_format.check_gguf(reader.config, reader.tensor_names, reader.path)
        writer, arch = _dry_writer(cfg, reader)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"gguf output: {err}") from None
    keys = set(writer.kv_data[0])
    config = reader.config
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    if head_dim * heads != hidden and f"{arch}.attention.key_length" not in keys:
        raise ConfigError(
            f"gguf output: head_dim {head_dim} × {heads} heads ≠ hidden_size {hidden}, and the GGUF metadata has no "
            "attention.key_length: llama.cpp would assume head_dim hidden/heads"
        )
    return "gguf: metadata builds (" + _check_llamacpp_vocab(cfg, reader, tokenizer, notes) + ")"


def _check_llamacpp_vocab(cfg: JobConfig, reader, tokenizer, notes: list[str]) -> str:
    """llama.cpp loads a vocabulary-only GGUF with this job's tokenizer metadata and splits the
    verification prompt into the ids the model's tokenizer gives (verify's rule, checked before
    the run); a different split of the other probes (:data:`gguf_pre.PROBES`) is noted. ``auto``
    takes gguf_pre's answer, whose probes are these."""
    import importlib.util

    from strata_quant.pipeline.formats import gguf as gguf_format
    from strata_quant.pipeline.formats.gguf_pre import probes_split_otherwise

    pre, chosen = cfg.output.gguf_tokenizer_pre, ""
    if importlib.util.find_spec("llama_cpp") is None:
        if pre == "auto":
            pre = "default"
        notes.append(f"tokenizer pre-type {pre!r} not checked in llama.cpp: llama-cpp-python is not installed")
        return f"tokenizer pre-type {pre!r} unchecked"
    meta = gguf_format.tokenizer_metadata(str(reader.path), vocab_size=int(reader.config["vocab_size"]))
    if pre == "auto":  # the writer asks the same question and reads this answer from the cache
        choice = gguf_format.pre_for(str(reader.path), reader.config, meta)
        pre, chosen, differs = choice.pre, f" (auto: {choice.how})", choice.differs
    else:
        with tempfile.TemporaryDirectory(prefix="strata-vocab-") as tmp:
            path = os.path.join(tmp, "vocab.gguf")
            gguf_format.vocab_writer(reader.config, meta)(path, pre)
            differs = probes_split_otherwise(path, tokenizer)
        if differs is None:  # llama.cpp refuses an unknown pre-type or a broken vocabulary
            raise ConfigError(
                f"gguf output: llama.cpp does not load the vocabulary with output.gguf_tokenizer_pre {pre!r}; "
                "name a pre-type llama.cpp knows for this tokenizer (or auto)"
            )
    if 0 in differs:  # PROBES[0] is verify's prompt
        raise ConfigError(
            f"gguf output: with output.gguf_tokenizer_pre {pre!r} llama.cpp splits the verification prompt "
            "differently from the model's tokenizer; pick the pre-type llama.cpp's converter uses for this tokenizer"
        )
    if differs:
        notes.append(
            f"with gguf_tokenizer_pre {pre!r} llama.cpp splits digits / punctuation / spacing or code differently "
            "from the model's tokenizer (a probe text); the GGUF would tokenize some prompts differently"
        )
    return (
        f"llama.cpp loads the vocabulary with pre-type {pre!r}{chosen} and tokenizes the verification prompt as the "
        "model does"
    )


def check_store(cfg: JobConfig, pf: Preflight) -> None:
    """The store answers (credentials, bucket); a local folder with workers on a Ray cluster is
    probed from every worker when they start (run_job), noted here."""
    from strata_quant.pipeline.checkpoint import is_s3
    from strata_quant.pipeline.store import open_store

    store = open_store(cfg.run.store)
    store.exists("runs/strata-probe")
    pf.passed.append(f"store: {cfg.run.store} answers")
    if not is_s3(cfg.run.store) and os.environ.get("RAY_ADDRESS"):
        pf.notes.append(
            f"run.store {cfg.run.store} is a local folder and RAY_ADDRESS names a cluster: when the workers start, "
            "each checks it sees the driver's folder (a folder not shared by every node is refused before block 0)"
        )


def check_eval(cfg: JobConfig, tokenizer) -> None:
    """Each eval text holds its windows. Only the head the windows need is tokenized: the
    off-domain default is a whole book, whose ids at once would set the driver's peak."""
    from strata_quant.pipeline.calibration import (
        CalibrationError,
        eval_windows,
        load_text,
        tokenize_head,
        tokenizer_prefix,
    )

    need, prefix = cfg.eval.windows * cfg.eval.seq_len, tokenizer_prefix(tokenizer)
    for key, text in (("eval.text", cfg.eval.text), ("eval.off_domain", cfg.eval.off_domain)):
        if text:
            try:
                eval_windows(
                    tokenize_head(tokenizer, load_text(text), need), cfg.eval.windows, cfg.eval.seq_len, prefix
                )
            except CalibrationError as err:
                raise CalibrationError(f"{key} {text}: {err}") from None


def check_outputs(cfg: JobConfig) -> None:
    from strata_quant.pipeline.assemble import AssembleError, artifact_paths

    for path in artifact_paths(cfg).values():
        if Path(path).exists() and not cfg.output.overwrite:
            raise AssembleError(f"output {path} exists; pass --overwrite (output.overwrite: true) to replace it")
