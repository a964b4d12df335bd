"""llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``) for a model's tokenizer, asked of llama.cpp itself.

llama.cpp splits text before BPE by a regex it picks from the GGUF's ``tokenizer.ggml.pre``; a wrong name loads
and runs but splits digits, punctuation or spacing unlike the model's tokenizer, so some prompts get other ids.
llama.cpp's converter recognises a tokenizer by a hash of its output on a fixed text, looked up in a table it
keeps. strata asks the reader instead: a vocabulary-only GGUF per candidate name, the probe texts tokenized by
llama.cpp and compared with the model's own tokenizer; the first name that splits every probe as the model does
is the one written (``output.gguf_tokenizer_pre: auto``, the default).

Candidates, in order: the model's ``model_type`` where llama.cpp knows a name spelled so (``qwen2``), ``default``,
then every name llama-cpp-python 0.3.36's llama.cpp accepts (:data:`LLAMACPP_PRE_TYPES`), in its own order. The
choice is cached per tokenizer (SHA-256 of its files, the model_type, llama-cpp-python's version) under ``$STRATA_CACHE``, so the
scan runs once per tokenizer and the plan and the writer agree.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from strata_quant.pipeline.prompts import LLAMACPP_PROMPT

# the names llama.cpp's llama-vocab.cpp (llama-cpp-python 0.3.36) maps to a pre-tokenizer, in its order
LLAMACPP_PRE_TYPES = (
    "default", "kimi-k2", "minicpm5", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
    "midm-2.0", "lfm2", "jina-v5-nano", "deepseek-llm", "deepseek-coder", "deepseek-v3", "spark2_5", "youtu",
    "falcon", "mpt", "starcoder", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
    "a.x-4.0", "mellum", "modern-bert", "jais-2", "gemma4", "granite-embed-multi-311m", "sarvam-moe", "jina-v1-en",
    "jina-v2-code", "roberta-bpe", "whitespace", "refact", "command-r", "qwen2", "deepseek-r1-qwen", "kormo",
    "f2llmv2", "qwen35", "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat", "chatglm-bpe", "glm4", "glm5",
    "viking", "jais", "tekken", "smollm", "codeshell", "bloom", "gpt3-finnish", "exaone", "exaone4", "exaone-moe",
    "chameleon", "minerva-7b", "megrez", "gpt-4o", "llama4", "kanana2", "talkie", "granite-embed-multi-97m",
    "tiny_aya", "cohere2moe", "superbpe", "trillion", "granite-docling", "bailingmoe", "bailingmoe2", "llada-moe",
    "seed-coder", "hunyuan", "hunyuan-dense", "hy_v4", "joyai-llm", "ufakzeka", "grok-2", "afmoe", "laguna",
    "minimax-m2", "solar-open", "mellum2",
)  # fmt: skip
# what pre-tokenizers split differently: digit runs, contractions, punctuation, non-ASCII letters, runs of spaces,
# tabs and newlines
TOKENIZER_PROBE = (
    " In 1815, 12345 people paid £3.50 each: naïve café owners' “quotes” (isn't it?)\n\n\tindented   spaces 日本語"
)
# what the split is judged on: prose (verify's prompt: a file that splits it otherwise is refused), the probe above,
# then code
PROBES = (
    LLAMACPP_PROMPT,
    TOKENIZER_PROBE,
    "def f(x_1, y):\n    return x_1**2 + y  # 3.14159, 0x1F, 1000000\n\n\n    I'M here; we'll see... ?!",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class PreChoice:
    """The name chosen, the probes (by index into :data:`PROBES`) llama.cpp splits otherwise under it, and how
    it was found (for the plan's log)."""

    pre: str
    differs: tuple[int, ...]
    how: str


def probes_split_otherwise(vocab_gguf: str, tokenizer) -> tuple[int, ...] | None:
    """The probes llama.cpp tokenizes otherwise than ``tokenizer`` with the vocabulary-only ``vocab_gguf``; None
    when llama.cpp does not load it (an unknown name or a broken vocabulary)."""
    from llama_cpp import Llama

    try:
        llm = Llama(model_path=vocab_gguf, vocab_only=True, verbose=False)
    except Exception:  # llama.cpp refuses an unknown pre-type or a broken vocabulary
        return None
    try:
        split = [llm.tokenize(text.encode(), add_bos=False, special=False) for text in PROBES]
    finally:
        llm.close() if hasattr(llm, "close") else None
    return tuple(i for i, ids in enumerate(split) if list(ids) != tokenizer.encode(PROBES[i], add_special_tokens=False))


def candidates(model_type: str | None) -> list[str]:
    """The names tried, in order (the module's docstring)."""
    first = [model_type] if model_type in LLAMACPP_PRE_TYPES else []
    return list(dict.fromkeys([*first, "default", *LLAMACPP_PRE_TYPES]))


def _cache_key(tokenizer_dir: Path, model_type: str | None) -> str:
    import llama_cpp

    # model_type orders the candidates, so it is part of the question
    h = hashlib.sha256(f"llama-cpp-python {llama_cpp.__version__} {model_type}".encode())
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            h.update(name.encode() + (tokenizer_dir / name).read_bytes())
    return h.hexdigest()


def _cache_file() -> Path:
    from strata_quant.pipeline.fixtures import cache_dir

    return cache_dir() / "gguf-tokenizer-pre.json"


def find_pre(
    tokenizer_dir: str | os.PathLike[str], model_type: str | None, write_vocab: Callable[[str, str], None]
) -> PreChoice:
    """The pre-tokenizer name for the tokenizer in ``tokenizer_dir`` (the module's docstring).
    ``write_vocab(path, pre)`` writes a vocabulary-only GGUF of this model with that name. Without llama.cpp
    (llama-cpp-python not installed) nothing can be asked: ``default``, said in ``how``. When no name splits every
    probe as the model does, the one with the fewest probes split otherwise (the first such)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return PreChoice("default", (), "llama-cpp-python is not installed: not checked in llama.cpp")
    from transformers import AutoTokenizer

    root = Path(tokenizer_dir)
    key, cache = _cache_key(root, model_type), _cache_file()
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in known:
        hit = known[key]
        return PreChoice(hit["pre"], tuple(hit["differs"]), f"cached: {hit['how']}")
    tokenizer = AutoTokenizer.from_pretrained(root)
    best: PreChoice | None = None
    with tempfile.TemporaryDirectory(prefix="strata-vocab-") as tmp:
        for tried, pre in enumerate(candidates(model_type), 1):
            path = os.path.join(tmp, f"vocab-{tried}.gguf")
            write_vocab(path, pre)
            differs = probes_split_otherwise(path, tokenizer)
            os.unlink(path)
            if differs is None:
                continue
            if best is None or len(differs) < len(best.differs):
                how = f"llama.cpp splits {len(PROBES) - len(differs)}/{len(PROBES)} probes as the model ({tried} tried)"
                best = PreChoice(pre, differs, how)
            if not differs:
                break
    if best is None:
        raise ValueError("llama.cpp loads this tokenizer's vocabulary under none of its pre-tokenizer names")
    known[key] = {"pre": best.pre, "differs": list(best.differs), "how": best.how}
    part = cache.with_name(f"{cache.name}.{os.getpid()}.part")
    part.write_text(json.dumps(known, indent=1))
    os.replace(part, cache)  # whole: another job reading it never sees half a file
    return best
