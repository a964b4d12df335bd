"""A llama.cpp K mix solved by strata's run, against llama.cpp's own file of the mix, without and with an
importance matrix of the same statistics.

strata: ``strata run`` with ``output.gguf_type`` the mix and method gptq (every decoder linear solved by GPTQ on the
type llama.cpp's mix gives it, the whole file as llama.cpp lays it out; pipeline/formats/gguf.py). llama.cpp:
llama_model_quantize (the code of llama-quantize) from the model's GGUF, and, where llama.cpp's tools are built
(benchmarks/llamacpp_tools.sh), ``llama-quantize --imatrix`` with the run's own importance matrix
(pipeline/imatrix.py: mean x² per input over the same calibration tokens).

Every file is scored in llama.cpp (llama-cpp-python) by MEASURE.md: windows of 512 tokens of Persuasion and of the
King James Bible (off the calibration's domain), each from an empty context; Δppl against the source GGUF (the
reference weights).

    python -m benchmarks.gguf_mix_run --mix Q4_K_M --out /tmp/strata-mix-run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from benchmarks.gguf_mix_file import TOOLS, llama_quantize


def strata_run(out: Path, mix: str, cal_windows: int, seq_len: int, workers: int) -> tuple[Path, Path, float]:
    """The strata file of ``mix`` (a full job: plan, run, assemble, verify) and the run's importance matrix."""
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.imatrix import write_imatrix
    from strata_quant.pipeline.job import run_full_job
    from strata_quant.pipeline.store import open_store

    cfg = parse_config(
        {
            "name": f"smollm2-{mix}",
            "model": "fixture:smollm2-135m",
            "calibration": {"source": "fixture:austen/emma", "num_samples": cal_windows, "seq_len": seq_len},
            "quant": {"method": "gptq", "bits": 4, "group_size": 32},
            "run": {"workers": workers, "store": str(out / "store")},
            "output": {"dir": str(out / "out"), "formats": ["gguf"], "gguf_type": mix, "overwrite": True},
            "eval": None,
        }
    )
    t = time.perf_counter()
    report = run_full_job(cfg, progress=False)
    took = time.perf_counter() - t
    (check,) = report["checks"]
    print(f"strata run: {took:.0f} s; {check['bit_exact_linears']}/{check['quantized_linears']} linears bit-exact, "
          f"types {check['linear_types']}", flush=True)  # fmt: skip
    imatrix = write_imatrix(open_store(cfg.run.store), report["run_id"], out / "strata.imatrix.gguf")
    return next((out / "out").glob("*.gguf")), imatrix, took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mix", default="Q4_K_M")
    ap.add_argument("--cal-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="/tmp/strata-mix-run")
    ap.add_argument("--score-only", action="store_true", help="score the files an earlier run left in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.calibration import eval_windows, load_text, tokenize_stream
    from strata_quant.pipeline.verify import llamacpp_perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = fixtures._fetch_smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(fixtures.smollm2())
    texts = {"Persuasion": "fixture:austen/persuasion", "KJV": "fixture:kjv"}
    held = {
        k: eval_windows(tokenize_stream(tok, load_text(v)), args.eval_windows, args.seq_len) for k, v in texts.items()
    }
    print(machine())
    print(f"SmolLM2-135M {args.mix}; calibration {args.cal_windows}×{args.seq_len} Emma, eval {args.eval_windows}×"
          f"{args.seq_len} per text in llama.cpp, {args.threads} threads")  # fmt: skip
    files = {"strata (run)": None}
    if args.score_only:  # the files of an earlier invocation with the same --out, scored again
        files["strata (run)"], imatrix = next((out / "out").glob("*.gguf")), None
    else:
        files["strata (run)"], imatrix, _ = strata_run(out, args.mix, args.cal_windows, args.seq_len, args.workers)
    files["llama.cpp"] = out / f"llamacpp-{args.mix}.gguf"
    if not args.score_only:
        llama_quantize(src, files["llama.cpp"], args.mix)
    if (TOOLS / "llama-quantize").exists():
        files["llama.cpp + imatrix"] = out / f"llamacpp-imatrix-{args.mix}.gguf"
        if not args.score_only:
            llama_quantize(src, files["llama.cpp + imatrix"], args.mix, imatrix)
    ref = {k: llamacpp_perplexity(src, w, n_threads=args.threads)["ppl"] for k, w in held.items()}
    print(f"reference scored: {ref}", flush=True)
    print(f"{'file':24s} {'MB':>7s} " + " ".join(f"{k + ' ppl':>15s} {'Δppl':>8s}" for k in texts))
    print(
        f"{'source (reference)':24s} {src.stat().st_size / 1e6:7.1f} "
        + " ".join(f"{ref[k]:15.3f} {'':8s}" for k in texts)
    )
    for label, f in files.items():
        cells = []
        for k, w in held.items():
            ppl = llamacpp_perplexity(f, w, n_threads=args.threads)["ppl"]
            cells.append(f"{ppl:15.3f} {100 * (ppl - ref[k]) / ref[k]:+7.2f}%")
        print(f"{label:24s} {f.stat().st_size / 1e6:7.1f} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
