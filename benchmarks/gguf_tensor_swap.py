"""Which tensors carry a GGUF's loss: two files of one mix (the same type and shape for every tensor), each with
one group of tensors taken from the other, scored in llama.cpp beside both originals.

A group is a name pattern (``ffn_down``, ``attn_v|attn_output``, ...); ``A+B:group`` is file A with the group's
tensors copied byte for byte from B. Files are made in --out and scored as benchmarks/gguf_mix_run scores (Δppl and
KLD against the model's source GGUF, windows of 512 tokens of the model's texts, each from an empty context);
``--model`` is one of gguf_mix_run's (``qwen2.5-coder-1.5b``: Persuasion and Python's standard library), ``--texts``
a subset of its texts, ``--one-way`` makes only the A+B files.

    python -m benchmarks.gguf_tensor_swap --a STRATA.gguf --b LLAMACPP.gguf --groups ffn_down \\
        --out /tmp/swap --eval-windows 8
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

from benchmarks.common import machine
from benchmarks.gguf_mix_run import MODELS, paired_gap, score, source_gguf


def swap_tensors(a: Path, b: Path, pattern: str, out: Path) -> list[str]:
    """``out``: a copy of ``a`` whose tensors named by ``pattern`` (a regex) hold ``b``'s bytes; the names swapped.
    Refused unless both files give every swapped tensor the same type and shape (so the bytes fit in place)."""
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    names = sorted(n for n in ta if re.search(pattern, n))
    if not names:
        raise ValueError(f"no tensor of {a.name} matches {pattern!r}")
    for n in names:
        x, y = ta[n], tb.get(n)
        if y is None or x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape) or x.n_bytes != y.n_bytes:
            raise ValueError(f"{n}: not the same type and shape in {a.name} and {b.name}; its bytes cannot be swapped")
    shutil.copyfile(a, out)
    with open(b, "rb") as src, open(out, "r+b") as dst:
        for n in names:
            src.seek(int(tb[n].data_offset))
            dst.seek(int(ta[n].data_offset))
            dst.write(src.read(int(tb[n].n_bytes)))
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="the first file (e.g. strata's)")
    ap.add_argument("--b", required=True, help="the second file of the same mix (e.g. llama.cpp + imatrix)")
    ap.add_argument("--groups", default="ffn_down", help="comma-separated regexes of tensor names")
    ap.add_argument("--model", default="smollm2-135m", choices=list(MODELS), help="the fixture both files are of")
    ap.add_argument("--texts", default=None, help="comma-separated names of the model's texts (default: all)")
    ap.add_argument("--one-way", action="store_true", help="only A with each group from B (not B with A's)")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/strata-swap")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    a, b = Path(args.a), Path(args.b)
    texts = MODELS[args.model].texts
    if args.texts:
        texts = {t: texts[t] for t in args.texts.split(",")}
    files = {"A": a, "B": b}
    for i, group in enumerate(args.groups.split(",")):
        for x, y, tag in ((a, b, "A+B"), (b, a, "B+A"))[: 1 if args.one_way else 2]:
            path = out / f"{tag.replace('+', '_with_')}-{i}.gguf"
            names = swap_tensors(x, y, group, path)
            files[f"{tag}:{group}"] = path
            print(f"{tag}:{group}: {len(names)} tensors swapped -> {path}", flush=True)
    src = source_gguf(args.model)
    tok = AutoTokenizer.from_pretrained(fixtures.resolve(f"fixture:{args.model}"))
    print(machine())
    print(f"A = {a}\nB = {b}\n{args.eval_windows}×{args.seq_len} windows per text, {args.threads} threads")
    result = {}
    for t, source in texts.items():
        windows = eval_windows(tokenize_stream(tok, load_text(source)), args.eval_windows, args.seq_len)
        result[t] = score(src, files, windows, args.threads, t)
        (out / "scores.json").write_text(json.dumps(result, indent=1))
    # each row paired against A: what taking the group from B (or B's file) moves, and its SE over the windows
    print("| file | " + " | ".join(f"{t} Δppl | − A, paired | {t} KLD" for t in texts) + " |")
    print("|---|" + "---|---|---|" * len(texts))
    for k in files:
        cells = []
        for t in texts:
            per = result[t]
            gap, se = paired_gap(per, k, "A")
            paired = f"{100 * gap:+.2f}" + ("" if se is None else f" ± {100 * se:.2f}")
            cells.append(f"{100 * per[k]['dppl']:+.2f} % | {paired} | {per[k]['kld']:.4f}")
        print(f"| {k} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
