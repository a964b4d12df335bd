"""A DeepSeek-V3-width MoE block quantized by `strata run` itself: per-stage and per-expert seconds, peak memory
per worker against the statistics budget, from the run's own records.

    .venv/bin/python -m benchmarks.moe_v3_run [--experts 8] [--top-k 8] [--groups 1] [--topk-groups 1]
        [--heads 16] [--dense-blocks 0] [--max-expert-stats 1] [--workers 2] [--samples 4] [--seq-len 64]
        [--device cpu|cuda] [--out benchmarks/results/moe-v3-run-cpu.json]

A checkpoint from transformers' DeepseekV3Config at DeepSeek-V3's widths: hidden 7168, routed experts of
2048 (moe_intermediate_size), one shared expert of 2048, MLA as V3 (q_lora_rank 1536, kv_lora_rank 512,
qk_nope 128, qk_rope 64, v_head 128) with ``--heads`` heads (V3: 128), ``--experts`` routed experts (V3: 256),
top-``--top-k`` in ``--groups`` groups of which ``--topk-groups`` are used (V3: top-8, 8 groups, 4 used),
``--dense-blocks`` dense blocks first (V3: 3, its dense MLP 18432 wide) and one MoE block after them.
Random N(0, 0.02²) weights, the router N(0, 0.5²) (uneven routing where top-k < experts), SmolLM2's
tokenizer with tied embeddings, saved as fp16 safetensors with one tensor per expert as on disk.

Quantized by the run's own path: Ray, ``--workers`` worker actors, a local store folder, GPTQ W4 g128,
true-sequential, propagate quantized, ``quant.moe.max_expert_stats`` experts' statistics per wave.
Read back from the store: each block record's per-worker stage seconds (stats, reduce, solve, broadcast,
forward) and peak RSS (peak GPU memory on cuda), and each expert's entry: its routed tokens, owner, wave,
the wave's statistics seconds on its owner and its fused matrices' solve seconds. The run's log goes beside
the JSON (``.log``).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine

HIDDEN, EXPERT, DENSE = 7168, 2048, 18432
MLA = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


def build(folder: Path, args) -> Path:
    """The DeepSeek-V3-width checkpoint (fp16, per-expert tensors) in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.fixtures import _save_fp16

    tokenizer = AutoTokenizer.from_pretrained(fixtures.smollm2())
    config = DeepseekV3Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=DENSE,
        moe_intermediate_size=args.expert_width,
        num_hidden_layers=args.dense_blocks + 1,
        first_k_dense_replace=args.dense_blocks,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        n_routed_experts=args.experts,
        n_shared_experts=1,
        num_experts_per_tok=args.top_k,
        n_group=args.groups,
        topk_group=args.topk_groups,
        norm_topk_prob=True,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MLA,
    )
    torch.manual_seed(0)
    # fp16 from the start: an fp32 model of this width would double the builder's memory
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.02)
    _save_fp16(model, tokenizer, folder)
    del model
    return folder


def job_config(folder: Path, root: Path, args) -> dict:
    run = {"workers": args.workers, "batch_size": args.batch, "store": str(root / "store"), "propagate": "quantized"}
    run["device"] = args.device
    if args.device == "cpu":
        run["threads_per_worker"] = 1  # the 2-core machine: one thread per worker
    return {
        "name": "moe-v3-run",
        "model": str(folder),
        "calibration": {"source": "fixture:austen/emma", "num_samples": args.samples, "seq_len": args.seq_len},
        "quant": {
            "method": "gptq",
            "bits": 4,
            "group_size": 128,
            "true_sequential": True,
            "moe": {"max_expert_stats": args.max_expert_stats},
        },
        "run": run,
        "output": {"dir": str(root / "out"), "formats": ["gptq"]},
    }


def expert_rows(entries: dict) -> list[dict]:
    """Per (block, expert): routed tokens, decision, owner, wave, the wave's statistics/reduce seconds on the
    owner, the gate/up and down solve seconds (gate and up are one fused solve: taken once)."""
    rows: dict[tuple[int, int], dict] = {}
    for name, e in entries.items():
        if "expert_solve" not in e:
            continue
        b, idx = int(name.split(".")[2]), e["expert"]["index"]
        s = e["expert_solve"]
        row = rows.setdefault(
            (b, idx),
            {
                "block": b,
                "expert": idx,
                "tokens": e["expert"]["tokens"],
                "decision": e["expert"]["decision"],
                "owner": s["owner"],
                "wave": s["wave"],
                "stats_bytes": s["stats_bytes"],
                "wave_stats_s": s.get("wave_stats_s"),
                "wave_reduce_s": s.get("wave_reduce_s"),
            },
        )
        row["down_solve_s" if name.endswith("down_proj") else "gate_up_solve_s"] = s.get("fused_solve_s")
        row["result_s"] = row.get("result_s", 0.0) + s.get("result_s", 0.0)  # its linears' result writing
    return [rows[k] for k in sorted(rows)]


def read_run(store_root: Path, run_id: str, blocks: int) -> dict:
    from strata_quant.pipeline.run import recorded_entries
    from strata_quant.pipeline.store import LocalStore

    store = LocalStore(store_root)
    _, entries = recorded_entries(store, run_id)
    records = [store.get_json(f"runs/{run_id}/blocks/{b:05d}/record.json") for b in range(blocks)]
    stored = sum(f.stat().st_size for f in (store_root / "runs" / run_id).rglob("*") if f.is_file())
    return {
        "blocks": [
            {
                "block": r["block"],
                "wall_s": r["wall_s"],
                "timings_by_rank": r["timings"],
                "peak_rss_mib_by_rank": r.get("peak_rss_mib"),
                **({"peak_gpu_mib_by_rank": r["peak_gpu_mib"]} if "peak_gpu_mib" in r else {}),
            }
            for r in records
        ],
        "experts": expert_rows(entries),
        "stored_bytes": stored,
        "linears_stored": len(entries),
    }


def summary(out: dict, args) -> dict:
    """Per-expert means over the MoE block's GPTQ experts and the statistics budget against peak memory."""
    from strata_quant.workers.moe import expert_statistics_bytes

    solved = [r for r in out["experts"] if r["decision"] != "rtn"]
    routed = sum(r["tokens"] for r in out["experts"])
    moe = out["blocks"][-1]
    forward = max(t.get("forward", 0.0) for t in moe["timings_by_rank"].values())
    stats = max(t.get("stats", 0.0) for t in moe["timings_by_rank"].values())
    each = expert_statistics_bytes(args.hidden, args.expert_width)
    budget = args.max_expert_stats * each

    def mean(key):
        return sum(r[key] for r in solved) / len(solved) if solved else None

    return {
        "result_s_mean": mean("result_s"),
        "expert_statistics_mib": each / 2**20,
        "statistics_budget_mib": budget / 2**20,
        "statistics_held_max_mib": max((r["stats_bytes"] for r in out["experts"]), default=0) / 2**20,
        "peak_rss_mib_by_rank": moe["peak_rss_mib_by_rank"],
        **({"peak_gpu_mib_by_rank": moe["peak_gpu_mib_by_rank"]} if "peak_gpu_mib_by_rank" in moe else {}),
        "gate_up_solve_s_mean": mean("gate_up_solve_s"),
        "down_solve_s_mean": mean("down_solve_s"),
        "routed_tokens": routed,
        "moe_block_stats_s_max_rank": stats,
        "moe_block_forward_s_max_rank": forward,
        "stats_s_per_routed_token_per_worker": stats * args.workers / max(routed, 1),
        "forward_s_per_expert": forward / args.experts,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="V3: 7168 (smaller only to try the script)")
    ap.add_argument("--expert-width", type=int, default=EXPERT, help="V3: 2048")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--topk-groups", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dense-blocks", type=int, default=0)
    ap.add_argument("--max-expert-stats", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", default="benchmarks/results/moe-v3-run-cpu.json")
    args = ap.parse_args()
    log_path = Path(args.out).with_suffix(".log")
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import run_job

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        folder = build(Path(tmp) / "model", args)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        outcome = run_job(parse_config(job_config(folder, Path(tmp), args)), progress=False)
        run_s = time.perf_counter() - t
        out = read_run(Path(tmp) / "store", outcome.run_id, args.dense_blocks + 1)
        out["checkpoint_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    result = {
        "args": vars(args),
        "machine": machine(),
        "build_s": build_s,
        "run_s": run_s,
        "summary": summary(out, args),
        **out,
    }
    logging.getLogger(__name__).info("summary %s", json.dumps(result["summary"]))
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
