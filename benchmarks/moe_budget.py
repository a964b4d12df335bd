"""Statistics memory per worker in `strata run` on a wide tiny MoE, with and without quant.moe.max_expert_stats.

    .venv/bin/python -m benchmarks.moe_budget [--hidden 1024] [--experts 8] [--workers 2]
        [--budgets 0,2,1] [--out FILE]

A seeded random Mixtral (hidden ``--hidden``, experts of ``--hidden``/2, ``--experts`` experts, top-2, two
blocks, SmolLM2's tokenizer) saved as fp16, then quantized by the run's own code path (GPTQ W4 g64, W workers,
propagate quantized, true-sequential) once per budget (0: the default, which holds every expert of a block at
once here). Read back from the run's records: per worker, the most statistics bytes it held in one wave (each
expert's record entry says the bytes its owner held in that expert's wave; every worker of a wave holds the same
experts' partial sums), the waves per block, the workers' peak RSS and the block seconds; and whether every
stored result has the first budget's bytes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine


def build(folder: Path, hidden: int, experts: int) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.fixtures import _save_fp16

    tokenizer = AutoTokenizer.from_pretrained(fixtures.smollm2())
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden // 2,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)  # uneven routing
    _save_fp16(model, tokenizer, folder)
    return folder


def run(folder: Path, root: Path, workers: int, budget: int) -> dict:
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import recorded_entries, run_job
    from strata_quant.pipeline.store import LocalStore

    moe = {"max_expert_stats": budget} if budget else {}
    cfg = {
        "name": "moe-budget",
        "model": str(folder),
        "calibration": {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 128},
        "quant": {"method": "gptq", "bits": 4, "group_size": 64, "true_sequential": True, "moe": moe},
        "run": {"workers": workers, "batch_size": 2, "store": str(root / "store"), "propagate": "quantized"},
        "output": {"dir": str(root / "out"), "formats": ["gptq"]},
    }
    t = time.perf_counter()
    outcome = run_job(parse_config(cfg), progress=False)
    seconds = time.perf_counter() - t
    store = LocalStore(root / "store")
    _, entries = recorded_entries(store, outcome.run_id)
    held: dict[int, int] = {}
    waves = set()
    for entry in entries.values():
        if "expert_solve" in entry:
            s = entry["expert_solve"]
            held[s["owner"]] = max(held.get(s["owner"], 0), s["stats_bytes"])
            waves.add(s["waves"])
    rss: dict[str, float] = {}
    for b in range(2):
        record = store.get_json(f"runs/{outcome.run_id}/blocks/{b:05d}/record.json")
        for rank, mib in (record.get("peak_rss_mib") or {}).items():
            rss[rank] = max(rss.get(rank, 0.0), mib or 0.0)
    return {
        "budget": budget or "default",
        "waves_per_block": sorted(waves),
        "stats_peak_mib_by_rank": {str(r): b / 2**20 for r, b in sorted(held.items())},
        "peak_rss_mib_by_rank": rss,
        "run_seconds": seconds,
        "sha256": {n: e["sha256"] for n, e in entries.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--budgets", default="0,2,1", help="0: the default budget")
    ap.add_argument("--out", default="benchmarks/results/moe-budget-cpu.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / "model", args.hidden, args.experts)
        rows = [run(folder, Path(tmp) / f"b{b}", args.workers, int(b)) for b in args.budgets.split(",")]
    first = rows[0].pop("sha256")
    for row in rows[1:]:
        row["same_bytes_as_first"] = row.pop("sha256") == first
    out = {
        "args": vars(args),
        "machine": machine(),
        "expert_statistics_mib": 8 * (args.hidden**2 + (args.hidden // 2) ** 2) / 2**20,
        "runs": rows,
    }
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
