"""Mixture-of-Experts through `strata run`: tiny random Mixtral and Qwen3-MoE (tests/moe_results.py's ``tiny_moe``,
SmolLM2's tokenizer) quantized by the run on one worker, against the reference that tests/moe_results.py makes
without the run (each expert's statistics from the tokens its own router sends it, GPTQ per expert, gate and up
stacked): the same codes, scales and zeros, every expert. The run's results are assembled into GGUF and GPTQ and
verified (pipeline.verify) and evaluated block by block; the block record holds each expert's routed token count
and decision; the quant.moe policies on an expert the router never picks; W=2 against W=1; a resumed run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks.moe_v3_run import expert_rows
from strata_quant.pipeline.run import RayBlockWorker
from strata_quant.workers.result import QuantSpec
from tests.moe_results import moe_results, tiny_moe

FAMILIES = ["mixtral", "qwen3_moe"]
SPEC = QuantSpec(4, 32, True)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def moe_config(
    root: Path, folder: Path, method: str = "gptq", formats=("gguf", "gptq"), eval: dict | None = None, **quant
) -> dict:
    """A one-worker run of the tiny MoE in ``folder``: one batch of all samples (so the run's sums are the
    reference's, which adds every token at once) and every block's experts fed the float model's hidden states
    (propagate float, no true-sequential stages: the reference's inputs)."""
    return {
        "name": "tiny-moe",
        "model": str(folder),
        "calibration": {"source": "fixture:austen/emma", "num_samples": 4, "seq_len": 32},
        "quant": {"method": method, "bits": 4, "group_size": 32, "true_sequential": False, **quant},
        "run": {"workers": 1, "batch_size": 4, "store": str(root / "store"), "propagate": "float"},
        "output": {"dir": str(root / "out"), "formats": list(formats), "gguf_tokenizer_pre": "smollm"},
        "eval": eval,
    }


def stored_results(store_root: Path, run_id: str) -> tuple[dict, dict]:
    """{linear: entry} and {linear: result} of a finished run in a local store."""
    from strata_quant.pipeline.run import recorded_entries
    from strata_quant.pipeline.store import LocalStore
    from strata_quant.workers.records import result_from_bytes

    store = LocalStore(store_root)
    _, entries = recorded_entries(store, run_id)
    return entries, {n: result_from_bytes(store.get_bytes(e["key"])) for n, e in entries.items()}


def same_result(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("codes", "scales", "zeros", "g_idx"))


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_gptq_run_equals_the_reference_and_verifies(family, tokenizer, tmp_path, ray_session):
    from strata_quant.pipeline.checkpoint import CheckpointReader
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.job import run_full_job
    from strata_quant.pipeline.run import prepare

    folder = tiny_moe(family, tokenizer, tmp_path / "model")
    cfg = parse_config(moe_config(tmp_path, folder, eval={"windows": 2, "seq_len": 64}))
    report = run_full_job(cfg, progress=False)
    entries, got = stored_results(tmp_path / "store", report["run_id"])
    _, token_ids, _, _ = prepare(cfg)
    _, want = moe_results(CheckpointReader(folder), tmp_path / "reference", SPEC, token_ids)
    experts = sorted(n for n in want if ".experts." in n)
    assert len(experts) == 2 * 4 * 3 and set(got) == set(want)  # every expert linear, attention, no router
    for name in experts:
        assert same_result(got[name], want[name]), name
    counts = {}
    for name in experts:
        info = entries[name]["expert"]
        counts[(name.split(".")[2], info["index"])] = info["tokens"]
        assert info["decision"] == "routed"
    for b in ("0", "1"):  # top-2 of every token of the block: 2·N·T routed tokens in all
        assert sum(n for (blk, _), n in counts.items() if blk == b) == 2 * 4 * 32
    print(f"\n{family}: routed tokens per (block, expert) {counts}")
    summary = report["experts"]  # the report's and the model card's account of the experts
    assert summary["modules"] == 2 and summary["experts_per_module"] == 4 and summary["decisions"] == {"routed": 8}
    assert (summary["tokens_min"], summary["tokens_max"]) == (min(counts.values()), max(counts.values()))
    assert "| Experts | 4 experts in each of 2 MoE blocks" in Path(report["model_cards"]["gguf"]).read_text()
    assert Path(report["report_files"]["expert_tokens"]).read_bytes().startswith(b"\x89PNG")
    rows = report["quality"]["rows"]  # the evaluation streams the MoE blocks (experts fused from their tensors)
    assert list(rows) == ["fp16 (reference)", "RTN W4 g32", "strata GPTQ W4 g32 (GGUF via gguf-py)"]
    assert all(math.isfinite(r["ppl"]) and (r["kld"] > 0) is (name != "fp16 (reference)") for name, r in rows.items())
    assert len(report["checks"]) == 2
    for check in report["checks"]:  # every result as the formats' readers decode it: the stored result
        assert check["quantized_linears"] == check["bit_exact_linears"] == len(want), check


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_rtn_run_rounds_every_expert_as_stored(family, tokenizer, tmp_path, ray_session):
    from safetensors import safe_open

    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.job import run_full_job
    from strata_quant.workers.rtn import rtn_quantize

    folder = tiny_moe(family, tokenizer, tmp_path / "model")
    report = run_full_job(parse_config(moe_config(tmp_path, folder, "rtn", formats=("gptq",))), progress=False)
    entries, got = stored_results(tmp_path / "store", report["run_id"])
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = [n.removesuffix(".weight") for n in f.keys() if n.removesuffix(".weight") in got]
        for name in names:  # RTN is row by row: an expert's rows of the fused result are its own rounding
            assert same_result(got[name], rtn_quantize(f.get_tensor(f"{name}.weight").float(), SPEC)), name
    assert len(names) == len(got) == 2 * (4 + 4 * 3)
    assert all(e["expert"]["decision"] == "rtn" for n, e in entries.items() if ".experts." in n)
    (check,) = report["checks"]
    assert check["quantized_linears"] == check["bit_exact_linears"] == len(got), check


def starve_expert(folder: Path, expert: int) -> None:
    """Rewrite the saved tiny MoE so that its routers never pick ``expert``: channel 0 of every token's hidden
    state is held at +4 (embedding column 0 set, attention's and every expert's output row 0 zeroed), so the
    router input's channel 0 is positive everywhere, and the expert's router row is −30 on that channel alone (the
    other rows 0 there)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["model.embed_tokens.weight"][:, 0] = 4.0
    for name, t in tensors.items():
        leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if leaf == "o_proj" or (".experts." in name and leaf in ("w2", "down_proj")):
            t[0] = 0.0
        elif leaf == "gate" and t.dim() == 2 and t.shape[0] == 4:  # the router: [experts, hidden]
            t[:, 0] = 0.0  # the others route on the other channels, as they would
            t[expert] = 0.0
            t[expert, 0] = -30.0
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("policy", ["rtn", "all_tokens"])
def test_a_zero_token_expert_under_the_policy_equals_the_reference(policy, tokenizer, tmp_path, ray_session):
    """An expert the router never picks: the run completes without NaN, records 0 tokens and the policy's
    decision for it, and every expert equals the reference made with that policy (``all_tokens``: the
    expert's statistics from every token of the block, the others' from their routed tokens)."""
    from strata_quant.pipeline.checkpoint import CheckpointReader
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import prepare, run_job

    folder = tiny_moe("mixtral", tokenizer, tmp_path / "model")
    starve_expert(folder, 3)
    cfg = parse_config(moe_config(tmp_path, folder, moe={"policy": policy}))
    outcome = run_job(cfg, progress=False)
    entries, got = stored_results(tmp_path / "store", outcome.run_id)
    _, token_ids, _, _ = prepare(cfg)
    _, want = moe_results(CheckpointReader(folder), tmp_path / "reference", SPEC, token_ids, policy=policy)
    for name, result in got.items():
        assert torch.isfinite(result.dequantize()).all(), name
        if ".experts." in name:
            assert same_result(result, want[name]), name
            info = entries[name]["expert"]
            starved = info["index"] == 3
            assert (info["tokens"] == 0) is starved, (name, info)
            assert info["decision"] == (policy if starved else "routed"), (name, info)
    from strata_quant.pipeline.report import expert_summary, plot_expert_tokens

    assert expert_summary(outcome.records)["decisions"] == {policy: 2, "routed": 6}  # expert 3 of both blocks
    assert plot_expert_tokens(outcome.records, tmp_path / "tokens.png").read_bytes().startswith(b"\x89PNG")


def test_policy_fail_names_the_expert_and_its_count(tokenizer, tmp_path, capsys):
    from tests.test_bad_input import run_cli

    folder = tiny_moe("mixtral", tokenizer, tmp_path / "model")
    starve_expert(folder, 3)
    cfg = moe_config(tmp_path, folder, moe={"policy": "fail", "min_tokens": 1})
    cfg["run"]["store"] = str(tmp_path / "store")
    msg = run_cli(tmp_path, cfg, capsys)
    assert "block 0 mlp: experts below quant.moe.min_tokens=1 routed tokens: 3 (0)" in msg
    assert len(msg.strip().splitlines()) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_two_workers_and_the_statistics_budget_give_the_one_worker_bytes(family, tokenizer, tmp_path, ray_session):
    """W=2: each worker's routed statistics of every expert reduced to the expert's owner (balanced by modelled
    solve cost against the block's other solves), solved there, the quantized experts sent to both for the forward
    through the quantized block (true-sequential stages, propagate quantized). With quant.moe.max_expert_stats=1
    the experts go one wave each: gathered, reduced, solved and freed before the next. Every stored result has
    the bytes of the one-worker run with the default budget (the same batches: two samples each), the token
    counts are the same, and each wave held the statistics of at most the budget's experts."""
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import run_job
    from strata_quant.workers.moe import expert_statistics_bytes

    folder = tiny_moe(family, tokenizer, tmp_path / "model")
    runs = {}
    for workers, budget in ((1, None), (2, None), (1, 1), (2, 1)):
        root = tmp_path / f"w{workers}-{budget}"
        cfg = moe_config(root, folder, true_sequential=True, moe={} if budget is None else {"max_expert_stats": budget})
        cfg["run"].update(workers=workers, batch_size=2, propagate="quantized")
        outcome = run_job(parse_config(cfg), progress=False)
        runs[(workers, budget)], _ = stored_results(root / "store", outcome.run_id)
    base = runs[(1, None)]
    assert len(base) == 2 * (4 + 4 * 3)
    each = expert_statistics_bytes(*_expert_widths(folder))
    for key, run in runs.items():
        assert set(run) == set(base), key
        for name, entry in base.items():
            assert entry["sha256"] == run[name]["sha256"], (key, name)
            assert entry.get("expert") == run[name].get("expert"), (key, name)
        solves = [e["expert_solve"] for n, e in run.items() if ".experts." in n]
        waves = 1 if key[1] is None else 4
        assert {s["waves"] for s in solves} == {waves}, key
        assert max(s["stats_bytes"] for s in solves) == each * 4 // waves, key  # at most the budget's experts
        owners = {s["owner"] for s in solves}
        assert owners == set(range(key[0])), key  # W=2: both workers solve experts


def _expert_widths(folder: Path) -> tuple[int, int]:
    """(H, I) of the tiny MoE's experts from its config."""
    import json

    config = json.loads((folder / "config.json").read_text())
    return config["hidden_size"], config.get("moe_intermediate_size") or config["intermediate_size"]


def test_a_resumed_moe_run_replays_the_experts_into_the_same_bytes(tokenizer, tmp_path, ray_session):
    """Block 0 replayed from its stored per-expert results (put back into the fused experts for the forward
    through the quantized block) and block 1 solved again, under a lower statistics budget (the same run: the
    budget is no part of its fingerprint): block 1's results have the first run's bytes."""
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import run_job

    folder = tiny_moe("qwen3_moe", tokenizer, tmp_path / "model")
    cfg = moe_config(tmp_path, folder, true_sequential=True)
    cfg["run"].update(propagate="quantized")
    first = run_job(parse_config(cfg), progress=False)
    before, _ = stored_results(tmp_path / "store", first.run_id)
    victim = tmp_path / "store" / before["model.layers.1.mlp.experts.2.down_proj"]["key"]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    cfg["quant"]["moe"] = {"max_expert_stats": 1}
    again = run_job(parse_config(cfg), progress=False)
    assert again.run_id == first.run_id and again.solved_blocks == [1] and again.resumed_blocks == [0]
    after, _ = stored_results(tmp_path / "store", again.run_id)
    assert {n: e["sha256"] for n, e in after.items()} == {n: e["sha256"] for n, e in before.items()}


def test_a_method_the_experts_do_not_take_is_refused_before_block_0(tokenizer, tmp_path, capsys):
    from tests.test_bad_input import assert_nothing_complete, run_cli

    folder = tiny_moe("qwen3_moe", tokenizer, tmp_path / "model")
    msg = run_cli(tmp_path, moe_config(tmp_path, folder, "awq", formats=("awq",)), capsys)
    assert "quant.method awq is not run on routed experts; a MoE model takes gptq or rtn" in msg
    assert_nothing_complete(tmp_path)


def test_a_k_mix_solved_in_the_run_is_refused_on_routed_experts(tokenizer, tmp_path, capsys):
    """llama.cpp's K mix is solved in the run for dense linears only: a MoE model is told so before block 0."""
    from tests.test_bad_input import assert_nothing_complete, run_cli

    folder = tiny_moe("mixtral", tokenizer, tmp_path / "model")
    cfg = moe_config(tmp_path, folder, formats=("gguf",))
    cfg["output"]["gguf_type"] = "Q4_K_M"
    msg = run_cli(tmp_path, cfg, capsys)
    assert "solves llama.cpp's mix in the run for dense linears only; blocks [0, 1] hold routed experts" in msg
    assert_nothing_complete(tmp_path)


def test_tiny_deepseek_v3_runs_its_routed_experts_as_the_reference(tokenizer, tmp_path, ray_session):
    """DeepSeek-V3 (MLA attention, a dense first block, a shared expert beside the routed ones, grouped
    routing): the dense block and the shared expert are the block's linears, the routed experts equal the
    reference bit for bit, and each MoE block's routed tokens are top-2 of every token. The statistics budget
    of 3 experts takes each block's 4 experts in two uneven waves (3, then 1)."""
    from strata_quant.pipeline.checkpoint import CheckpointReader
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import prepare, run_job

    folder = tiny_moe("deepseek_v3", tokenizer, tmp_path / "model")
    cfg = parse_config(moe_config(tmp_path, folder, formats=("gptq",), moe={"max_expert_stats": 3}))
    outcome = run_job(cfg, progress=False)
    entries, got = stored_results(tmp_path / "store", outcome.run_id)
    _, token_ids, _, _ = prepare(cfg)
    _, want = moe_results(CheckpointReader(folder), tmp_path / "reference", SPEC, token_ids)
    assert set(got) == set(want)
    experts = [n for n in want if ".experts." in n]
    assert len(experts) == 2 * 4 * 3 and not any(n.startswith("model.layers.0.mlp.experts") for n in experts)
    assert "model.layers.1.mlp.shared_experts.down_proj" in got and "model.layers.0.mlp.down_proj" in got
    for name in experts:
        assert same_result(got[name], want[name]), name
    for b in (1, 2):
        tokens = {entries[n]["expert"]["index"]: entries[n]["expert"]["tokens"] for n in experts if f".{b}.mlp" in n}
        assert sum(tokens.values()) == 2 * 4 * 32, tokens
    waves = {(n.split(".")[2], entries[n]["expert_solve"]["wave"]) for n in experts}
    assert sorted(waves) == [("1", 0), ("1", 1), ("2", 0), ("2", 1)]
    assert {entries[n]["expert_solve"]["waves"] for n in experts} == {2}
    for name in experts:  # the seconds the benchmark reads: the wave's statistics and reduce, the fused solve
        solve = entries[name]["expert_solve"]
        assert solve["fused_solve_s"] > 0 and solve["wave_stats_s"] > 0 and solve["wave_reduce_s"] >= 0, name
        assert solve["result_s"] > 0, name
        if name.endswith("gate_proj"):  # gate and up are one solve of their stacked matrix
            up = entries[name.replace("gate_proj", "up_proj")]["expert_solve"]
            assert up["fused_solve_s"] == solve["fused_solve_s"], name
    rows = expert_rows(entries)
    assert [(r["block"], r["expert"]) for r in rows] == [(b, e) for b in (1, 2) for e in range(4)]
    assert all(r["gate_up_solve_s"] > 0 and r["down_solve_s"] > 0 for r in rows)


def test_a_statistics_budget_below_one_expert_is_refused_before_block_0(tokenizer, tmp_path, capsys):
    from tests.test_bad_input import assert_nothing_complete, run_cli

    folder = tiny_moe("mixtral", tokenizer, tmp_path / "model")
    msg = run_cli(tmp_path, moe_config(tmp_path, folder, moe={"max_expert_stats": 0}), capsys)
    assert "quant.moe.max_expert_stats" in msg and "greater than or equal to 1" in msg
    assert_nothing_complete(tmp_path)


def test_a_statistics_budget_no_node_holds_is_refused_before_block_0(
    tokenizer, tmp_path, capsys, ray_session, monkeypatch
):
    """The cluster's nodes as Ray reports them, made small (100 kB): two of the tiny Mixtral's experts' statistics
    (8·(64² + 64²) = 64 KiB each) do not fit, so the run stops before block 0 naming the budget."""
    import ray

    from tests.test_bad_input import assert_nothing_complete, run_cli

    small = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 100_000.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: small)
    folder = tiny_moe("mixtral", tokenizer, tmp_path / "model")
    msg = run_cli(tmp_path, moe_config(tmp_path, folder, moe={"max_expert_stats": 2}), capsys)
    assert "quant.moe.max_expert_stats=2: 2 experts' statistics at hidden 64, intermediate 64" in msg
    assert "take 0.12 MiB, more than the 0.10 MiB of the Ray cluster's smallest node (lower the budget)" in msg
    assert_nothing_complete(tmp_path)


class SmallGpuWorker(RayBlockWorker):
    """A CPU worker that reports 100 kB free on a GPU, as a worker on a nearly full GPU would."""

    def device_memory(self) -> int:
        return 100_000


def test_the_budget_is_checked_against_the_workers_gpu_memory():
    """A budget whose statistics exceed one worker's free GPU memory is refused naming that worker; one that
    fits every GPU passes; CPU workers (no GPU figures) leave only the nodes' check."""
    from strata_quant.pipeline.errors import ConfigError
    from strata_quant.pipeline.moe import check_expert_budget

    shapes = [[256, 7168, 2048]]  # DeepSeek-V3: 424 MiB per expert
    gib = 2**30
    check_expert_budget(32, shapes, 1e15, {0: 80 * gib, 1: 14 * gib})  # 13.25 GiB fits both
    with pytest.raises(ConfigError, match=r"13.2 GiB, more than the 13.0 GiB free on worker 1's GPU"):
        check_expert_budget(32, shapes, 1e15, {0: 80 * gib, 1: 13 * gib})
    check_expert_budget(32, shapes, 1e15, None)


def test_a_statistics_budget_no_worker_gpu_holds_is_refused_before_block_0(tokenizer, tmp_path, ray_session):
    """The workers report their free GPU memory at setup (here 100 kB, from a test worker on the CPU): two of the
    tiny Mixtral's experts' statistics (0.12 MiB) are refused before block 0; one expert's (0.06 MiB) runs."""
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.errors import ConfigError
    from strata_quant.pipeline.run import run_job
    from tests.test_bad_input import assert_nothing_complete

    folder = tiny_moe("mixtral", tokenizer, tmp_path / "model")
    cfg = parse_config(moe_config(tmp_path / "two", folder, formats=("gptq",), moe={"max_expert_stats": 2}))
    with pytest.raises(ConfigError, match=r"take 0.12 MiB, more than the 0.10 MiB free on worker 0's GPU"):
        run_job(cfg, progress=False, worker_class=SmallGpuWorker)
    assert_nothing_complete(tmp_path / "two")
    cfg = parse_config(moe_config(tmp_path / "one", folder, formats=("gptq",), moe={"max_expert_stats": 1}))
    outcome = run_job(cfg, progress=False, worker_class=SmallGpuWorker)
    entries, _ = stored_results(tmp_path / "one" / "store", outcome.run_id)
    assert {e["expert_solve"]["waves"] for n, e in entries.items() if ".experts." in n} == {4}
