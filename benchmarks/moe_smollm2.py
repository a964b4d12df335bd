"""The SmolLM2 MoE fixtures through the real run against dense SmolLM2 under the same job (issue #21).

Each model gets one config: GPTQ W4 g64 (the demo's solver: act-order with static groups, MSE grid,
true-sequential stages, propagate quantized), the same *Emma* calibration windows, ``run.workers``
Ray workers, outputs GPTQ, compressed-tensors and the Q4_0 GGUF carrying the GPTQ rounding, each
verified against the stored results; then held-out evaluation on *Persuasion* and the King James
Bible (the demo's two texts), block by block. Each MoE fixture's float logits equal its dense
twin's (``pipeline.moe_fixtures.dense_twin``: SmolLM2 itself for the Mixtral layout; for
Qwen3-MoE, whose attention normalises q and k, a Qwen3 model carrying SmolLM2's weights), so the
fp16 reference rows of a fixture and its twin agree and their Δ ppl are comparable; they differ
only because each expert's statistics come from the tokens its router sends it (fewer tokens per
Hessian). Prints and writes (JSON) per model: wall time, driver and worker peak RSS, the formats'
checks, the eval rows, the experts' token counts and decisions, and the ratio
Δppl(MoE) ÷ Δppl(dense twin) per text (target ≤ 1.15).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.moe_smollm2 --models smollm2-mixtral dense \
        --calib 16 --seq-len 256 --windows 8
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.moe_smollm2 --models smollm2-qwen3-moe \
        qwen3-dense-twin --calib 16 --seq-len 256 --windows 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import PeakRSS, machine

MODELS = {"dense": "fixture:smollm2-135m", "smollm2-mixtral": None, "smollm2-qwen3-moe": None, "qwen3-dense-twin": None}
# The dense model whose float logits each MoE fixture reproduces, under its name in MODELS.
TWIN = {"smollm2-mixtral": "dense", "smollm2-qwen3-moe": "qwen3-dense-twin"}


def job_config(model: str, root: Path, calib: int, seq_len: int, windows: int, workers: int) -> dict:
    """The job every model runs: only ``model`` differs."""
    return {
        "name": "moe-smollm2",
        "model": model,
        "calibration": {"source": "fixture:austen/emma", "num_samples": calib, "seq_len": seq_len, "sampling": "even"},
        "quant": {
            "method": "gptq",
            "bits": 4,
            "group_size": 64,
            "sym": True,
            "act_order": True,
            "static_groups": True,
            "mse_grid": 100,
            "true_sequential": True,
        },
        "run": {"workers": workers, "propagate": "quantized", "batch_size": 4, "store": str(root / "store")},
        "output": {
            "dir": str(root / "out"),
            "formats": ["gptq", "compressed-tensors", "gguf"],
            "gguf_tokenizer_pre": "smollm",
        },
        "eval": {"windows": windows, "seq_len": 512, "baselines": []},
    }


def model_ref(name: str, root: Path) -> str:
    if name == "dense":
        return MODELS[name]
    if name == "qwen3-dense-twin":
        return str(twin_checkpoint("smollm2-qwen3-moe", root / "twin"))
    from strata_quant.pipeline.moe_fixtures import smollm2_moe

    return str(smollm2_moe(name))


def twin_checkpoint(fixture: str, folder: Path) -> Path:
    """The fixture's dense twin saved as an fp16 checkpoint (with SmolLM2's tokenizer) in ``folder``."""
    import torch
    from transformers import AutoTokenizer

    from strata_quant.pipeline.fixtures import smollm2
    from strata_quant.pipeline.moe_fixtures import dense_twin

    model = dense_twin(fixture).to(torch.float16)
    model.config.dtype = "float16"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2()).save_pretrained(folder)
    return folder


def delta(rows: dict) -> float:
    """Δ ppl of the quantized row (the one that is not the reference)."""
    (row,) = [r for n, r in rows.items() if n != "fp16 (reference)"]
    ref = rows["fp16 (reference)"]["ppl"]
    return (row["ppl"] - ref) / ref


def run_one(name: str, args) -> dict:
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.job import run_full_job

    with tempfile.TemporaryDirectory(prefix="moe-smollm2-") as tmp:
        cfg = job_config(model_ref(name, Path(tmp)), Path(tmp), args.calib, args.seq_len, args.windows, args.workers)
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            report = run_full_job(parse_config(cfg), progress=False)
        wall = time.perf_counter() - t0
    quality = report["quality"]
    out = {
        "model": name,
        "wall_s": round(wall, 1),
        "timings": report["timings"],
        "peak_rss_gib": {
            "driver": round(rss.driver / 2**30, 2),
            "workers": [round(v / 2**30, 2) for v in rss.workers.values()],
        },
        "checks": report["checks"],
        "rows": {"persuasion": quality["rows"], "kjv": quality["off_domain"]["rows"]},
        "delta_ppl": {"persuasion": delta(quality["rows"]), "kjv": delta(quality["off_domain"]["rows"])},
        "experts": report.get("experts"),
    }
    print(json.dumps(out, indent=1), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-mixtral", "dense"], choices=list(MODELS))
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of Emma")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8, help="eval windows of 512 tokens per text")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("out/moe_smollm2.json"))
    args = ap.parse_args()
    results = {name: run_one(name, args) for name in args.models}
    for name, r in results.items():
        twin = results.get(TWIN.get(name, ""))
        if twin is not None:
            ratio = {t: r["delta_ppl"][t] / twin["delta_ppl"][t] for t in ("persuasion", "kjv")}
            r["ratio_to_dense"] = ratio
            print(f"{name}: Δppl ÷ {TWIN[name]} Δppl  Persuasion {ratio['persuasion']:.3f}  KJV {ratio['kjv']:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(), "args": vars(args) | {"json": str(args.json)}, **results}))


if __name__ == "__main__":
    main()
