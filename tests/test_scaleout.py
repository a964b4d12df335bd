"""Scale-out on one node: LPT owners carried across blocks, propagate float's solves queued
behind the forward (same bytes as solving inline, W=1 or W=2, after a killed worker too), and
hidden states kept in bf16. Real Ray, the real tiny Llama fixture, the local store."""

from __future__ import annotations

import pytest
import torch

from strata_quant.pipeline.config import parse_config
from strata_quant.pipeline.run import RayBlockWorker, run_job
from strata_quant.pipeline.store import open_store
from strata_quant.workers.queues import SolverQueue
from strata_quant.workers.schedule import assign_owners, reduce_order
from tests.faulty_workers import faulty_worker


def tiny(tmp, workers=2, **run) -> dict:
    return {
        "name": "tiny",
        "model": "fixture:tiny-llama",
        "calibration": {"source": "fixture:austen/emma", "num_samples": 16, "seq_len": 64},
        "quant": {"method": "gptq", "bits": 4, "group_size": 64, "allow_partial_group": True},
        "run": {"workers": workers, "batch_size": 4, "store": str(tmp / "store"), **run},
        "output": {"dir": str(tmp / "out"), "formats": ["gptq"]},
        "eval": None,
    }


def hashes(outcome) -> dict[str, str]:
    return {e["name"]: e["sha256"] for r in outcome.records.values() for e in r["results"]}


# ---------------------------------------------------------------- owners


def test_lpt_owners_balance_across_blocks():
    # SmolLM2-like costs: down_proj outweighs the three other groups together
    costs = [5.0, 4.0, 12.0, 50.0]
    assert assign_owners(costs, 2) == [1, 1, 1, 0]  # per block: worker 0 always gets down_proj
    load = [0.0, 0.0]
    per_block = [assign_owners(costs, 2, load) for _ in range(6)]
    work = [0.0, 0.0]
    for owners in per_block:
        for c, o in zip(costs, owners):
            work[o] += c
    # carried: down_proj alternates and the work evens out (per block it would be 300 against 126)
    assert [owners[3] for owners in per_block] == [0, 1, 0, 1, 0, 1]
    assert work == [213.0, 213.0] and load == [0.0, 0.0]
    with pytest.raises(ValueError, match="load has 3 entries for 2 workers"):
        assign_owners(costs, 2, [0.0, 0.0, 0.0])


def test_solver_queue_runs_in_order_bounds_depth_and_raises_the_first_failure():
    import threading

    gate = threading.Event()
    seen = []

    def solve(b, layer, inputs, load):
        gate.wait(10)
        if b == 2:
            raise OSError("disk on fire")
        seen.append(b)
        return {"block": b}

    q = SolverQueue(solve, 2)
    q.put(0, None, [], depth=2)
    q.put(1, None, [], depth=2)
    blocked = threading.Thread(target=q.put, args=(2, None, [], 2))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # depth 2: the third block waits for a free slot
    gate.set()
    blocked.join(10)
    with pytest.raises(OSError, match="disk on fire"):
        q.wait_empty()
    assert seen == [0, 1]
    with pytest.raises(OSError, match="disk on fire"):
        q.take()  # every later call raises it too


def test_reduce_order_puts_each_owners_first_group_first():
    stage = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    owner_of = {("q_proj", "k_proj", "v_proj"): 1, ("o_proj",): 1, ("gate_proj", "up_proj"): 1, ("down_proj",): 0}
    order = reduce_order(stage, owner_of)
    assert order == [stage[0], stage[3], stage[1], stage[2]]
    assert reduce_order(stage, dict.fromkeys(owner_of, 0)) == stage  # one owner: stage order


# ---------------------------------------------------------------- propagate float, overlapped


@pytest.fixture(scope="module")
def float_inline(tmp_path_factory, tiny_model_path, emma_path, ray_session):
    """propagate float with the solves inline (overlap_depth 0), one worker: the reference bytes."""
    tmp = tmp_path_factory.mktemp("inline")
    outcome = run_job(parse_config(tiny(tmp, workers=1, propagate="float", overlap_depth=0)), progress=False)
    assert len(hashes(outcome)) == 21
    return outcome


def test_overlapped_solves_give_the_inline_bytes(float_inline, tmp_path):
    outcome = run_job(parse_config(tiny(tmp_path, workers=2, propagate="float")), progress=False)
    assert outcome.run_id == float_inline.run_id  # overlap_depth is not part of the fingerprint
    assert hashes(outcome) == hashes(float_inline)
    assert outcome.solved_blocks == [0, 1, 2] and outcome.loop_s > 0
    for b, record in outcome.records.items():
        assert record["block"] == b and record["complete"]
        for rank in ("0", "1"):  # the forward's queue wait and the solver thread's phases, per worker
            assert {"forward", "queue_wait", "stats", "solve"} <= set(record["timings"][rank])
    # the records were written in block order, each after its results
    store = open_store(str(tmp_path / "store"))
    for b in range(3):
        key = f"runs/{outcome.run_id}/blocks/{b:05d}/record.json"
        assert store.get_json(key)["results"] == outcome.records[b]["results"]


def test_overlapped_run_survives_a_killed_worker(float_inline, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    killer = faulty_worker(kill={"block": 2, "rank": 1, "marker": str(marker)})
    outcome = run_job(parse_config(tiny(tmp_path, workers=2, propagate="float")), progress=False, worker_class=killer)
    assert marker.read_text().split()[1:] == ["block", "2"]
    assert outcome.restarts == 1
    assert sorted(outcome.solved_blocks) == [0, 1, 2] and len(outcome.solved_blocks) == 3  # each once
    assert hashes(outcome) == hashes(float_inline)


def test_one_stage_float_run_takes_the_next_inputs_from_its_statistics_pass(tmp_path, tiny_model_path, monkeypatch):
    """propagate float, one stage, solves inline: the statistics pass runs the whole float block,
    so its outputs become the next block's inputs and no second forward runs (in-process)."""
    import strata_quant.workers.actor as actor_mod
    import strata_quant.workers.stats as stats_mod
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.store import LocalStore
    from strata_quant.workers.actor import BlockWorker
    from strata_quant.workers.block import build_block, run_block
    from strata_quant.workers.job import WorkerJob
    from strata_quant.workers.result import QuantSpec

    reader = open_checkpoint(str(tiny_model_path))
    job = WorkerJob(
        model_config=reader.config,
        spec=QuantSpec(bits=4, group_size=32, sym=False),
        run_prefix="runs/t",
        propagate="float",
        true_sequential=False,
        overlap_depth=0,
        batch_size=2,
    )
    worker = BlockWorker(0, 1, reader, LocalStore(tmp_path), job)
    worker.load_samples(torch.randint(0, reader.config["vocab_size"], (6, 16)))
    inputs = list(worker.batches)
    calls = []
    real = actor_mod.run_block
    for module in (actor_mod, stats_mod):  # every forward through the block: the propagation's and the statistics'
        monkeypatch.setattr(module, "run_block", lambda *a: calls.append(1) or real(*a))
    worker.process_block(0)
    assert len(calls) == len(inputs)  # one pass per batch: the statistics pass only
    prefix = f"{worker.layers_path}.0."
    tensors = {k[len(prefix) :]: v for k, v in reader.load_block(0).items()}
    layer = build_block(worker.meta_layers[0], tensors, torch.float32)
    for (hidden, kwargs), (got, _) in zip(inputs, worker.batches, strict=True):
        assert torch.equal(got, run_block(layer, hidden.float(), kwargs))


def test_one_stage_float_inline_gives_the_queued_bytes(tmp_path, tiny_model_path, emma_path, ray_session):
    """One float stage: the same bytes inline at W=1, and at W=2 with the solves queued on a
    solver thread or deferred on the forward's thread (``auto`` on a CPU: deferred, whose
    reductions were issued when each block's sums were complete)."""
    runs = {}
    for name, workers, depth, mode in (
        ("inline", 1, 0, "auto"),
        ("thread", 2, 2, "thread"),
        ("auto", 2, 2, "auto"),
        ("deferred1", 2, 1, "deferred"),
    ):
        cfg = tiny(tmp_path / name, workers=workers, propagate="float", overlap_depth=depth, overlap_mode=mode)
        cfg["quant"]["true_sequential"] = False
        runs[name] = run_job(parse_config(cfg), progress=False)
    assert len(hashes(runs["inline"])) == 21
    for name in ("thread", "auto", "deferred1"):
        assert hashes(runs[name]) == hashes(runs["inline"]), name
        assert runs[name].solved_blocks == [0, 1, 2]
    for record in runs["thread"].records.values():  # the forward waited on the solver thread's queue
        assert all("queue_wait" in t for t in record["timings"].values())
    for name in ("auto", "deferred1"):  # deferred: no solver thread to wait for; the solves' own phases
        for record in runs[name].records.values():
            assert not any("queue_wait" in t for t in record["timings"].values())
            assert all({"stats", "reduce", "solve"} <= set(t) for t in record["timings"].values())


def test_deferred_run_survives_a_killed_worker(tmp_path, tiny_model_path, emma_path, ray_session, monkeypatch):
    """Deferred solves with each worker's next call already queued: a worker killed in block 2
    (its solves of earlier blocks possibly unreported) is replaced, every block is recorded
    once, and the bytes are the inline run's."""
    marker = tmp_path / "killed"
    runs = {}
    # depth 1: block 0 is solved (and recorded) during block 1's call, before the kill
    killer = faulty_worker(kill={"block": 2, "rank": 1, "marker": str(marker)})
    for name, workers, depth, worker in (("inline", 1, 0, RayBlockWorker), ("deferred", 2, 1, killer)):
        cfg = tiny(tmp_path / name, workers=workers, propagate="float", overlap_depth=depth)
        cfg["quant"]["true_sequential"] = False
        runs[name] = run_job(parse_config(cfg), progress=False, worker_class=worker)
    assert marker.read_text().split()[1:] == ["block", "2"]
    deferred = runs["deferred"]
    assert deferred.restarts == 1
    assert sorted(deferred.solved_blocks) == [0, 1, 2] and len(deferred.solved_blocks) == 3
    assert deferred.restart_replays in ([], [0])  # [] when the kill took block 0's report with it
    assert hashes(deferred) == hashes(runs["inline"])


def test_deferred_solves_run_the_oldest_blocks_on_the_callers_thread():
    import threading

    from strata_quant.workers.queues import DeferredSolves

    seen = []

    def solve(b, layer, inputs, load):
        seen.append((b, threading.current_thread() is threading.main_thread()))
        load[b % 2] += 1.0
        return {"block": b}

    queue = DeferredSolves(solve, 2)
    queue.put(0, None, None, 2)
    queue.put(1, None, None, 2)
    assert seen == [] and queue.take() == []  # two blocks may wait
    queue.put(2, None, None, 2)
    assert seen == [(0, True)] and queue.take() == [{"block": 0}]
    queue.put(3, None, None, 1)  # a smaller depth solves down to it
    assert [b for b, _ in seen] == [0, 1, 2]
    queue.wait_empty()
    assert [b for b, _ in seen] == [0, 1, 2, 3] and all(main for _, main in seen)
    assert queue.take() == [{"block": b} for b in (1, 2, 3)] and queue.take() == []
    assert queue.load == [2.0, 2.0]  # carried across blocks, as the solver thread's


# ---------------------------------------------------------------- hidden states in bf16


def test_bf16_hidden_states(tmp_path, tiny_model_path, emma_path, ray_session):
    fp32 = run_job(parse_config(tiny(tmp_path / "a", workers=1)), progress=False)
    bf16 = run_job(parse_config(tiny(tmp_path / "b", workers=2, hidden_dtype="bfloat16")), progress=False)
    assert bf16.run_id != fp32.run_id  # hidden_dtype is part of the solve fingerprint
    h32, h16 = hashes(fp32), hashes(bf16)
    assert h32.keys() == h16.keys() and h32 != h16  # the rounded hidden states reach the solves
    err32 = {e["name"]: e["output_rel_error"] for r in fp32.records.values() for e in r["results"]}
    err16 = {e["name"]: e["output_rel_error"] for r in bf16.records.values() for e in r["results"]}
    for name, e in err32.items():  # ... and change each linear's relative output error only a little
        assert abs(err16[name] - e) <= 0.1 * e + 1e-4, (name, e, err16[name])
    assert torch.tensor(list(err16.values())).isfinite().all()


# ---------------------------------------------------------------- split solves


def test_split_solves_give_the_one_worker_bytes(tmp_path, tiny_model_path, emma_path, ray_session):
    """Every GPTQ group solved by all workers, each a share of the rows (W=3: uneven shares and a
    three-way gather), with act-order, asymmetric grids and the MSE scale search: the same bytes
    as one worker, and as W=3 with the shares turned off."""

    def cfg(sub, workers, **run):
        c = tiny(tmp_path / sub, workers=workers, **run)
        c["run"]["batch_size"] = 2  # 8 batches: a share for each of three workers
        c["quant"].update({"act_order": True, "sym": False, "mse_grid": 10})
        return parse_config(c)

    one = run_job(cfg("one", 1), progress=False)
    three = run_job(cfg("three", 3), progress=False)
    whole = run_job(cfg("whole", 3, split_solves=False), progress=False)
    assert one.run_id == three.run_id == whole.run_id  # split_solves is not part of the fingerprint
    assert len(hashes(one)) == 21 and hashes(three) == hashes(one) == hashes(whole)
    # the output errors of split groups are summed from the shares: the same up to rounding
    err1 = {e["name"]: e["output_rel_error"] for r in one.records.values() for e in r["results"]}
    err3 = {e["name"]: e["output_rel_error"] for r in three.records.values() for e in r["results"]}
    assert err1.keys() == err3.keys()
    assert all(abs(err3[n] - e) <= 1e-5 * e + 1e-9 for n, e in err1.items()), (err1, err3)
    for record in three.records.values():  # every worker solved a share of every stage
        assert all(record["timings"][r]["solve"] > 0 for r in ("0", "1", "2"))
    for record in whole.records.values():  # without: one owner per group, the other workers wait
        assert min(record["timings"][r]["solve"] for r in ("0", "1", "2")) < max(
            record["timings"][r]["solve"] for r in ("0", "1", "2")
        )


def test_row_slices_cover_the_rows_once():
    from strata_quant.workers.schedule import row_slices

    for n, w in [(960, 2), (576, 3), (7, 4), (5, 5)]:
        slices = row_slices(n, w)
        assert slices[0][0] == 0 and slices[-1][1] == n and len(slices) == w
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        assert max(e - s for s, e in slices) - min(e - s for s, e in slices) <= 1


# ---------------------------------------------------------------- stage passes


@pytest.mark.parametrize("method", ["gptq", "awq_gptq"])
def test_stage_cache_gives_the_full_pass_bytes(method, tmp_path, tiny_model_path, emma_path, ray_session):
    """Each true-sequential pass starting from the previous pass's kept inputs, and the
    propagation from them, give the bytes of running the whole block every time."""

    def cfg(sub, workers, **run):
        c = tiny(tmp_path / sub, workers=workers, **run)
        c["quant"]["method"] = method
        return parse_config(c)

    full = run_job(cfg("full", 2, stage_cache=False), progress=False)
    cached = run_job(cfg("cached", 2), progress=False)
    assert len(hashes(full)) == 21 and hashes(cached) == hashes(full)
    if method == "gptq":  # (AWQ's mean|x| sums are W-invariant only up to fp64 rounding)
        assert hashes(run_job(cfg("one", 1), progress=False)) == hashes(full)


def test_stage_passes_need_the_four_stages(tiny_model_path):
    from transformers import AutoModelForCausalLM

    from strata_quant.workers.block import decoder_layers, stage_layout, trace_block

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    seen = {}
    layer = decoder_layers(model)[1][0]
    hook = layer.register_forward_pre_hook(lambda _m, a, kw: seen.update(x=a[0], kw=kw), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0)))
    hook.remove()
    trace = trace_block(layer, seen["x"], {k: v for k, v in seen["kw"].items() if k != "cache"})
    groups = [list(g) for g in trace.groups]
    assert stage_layout(trace, [[g] for g in groups]) is not None
    assert stage_layout(trace, [groups]) is None  # one stage (true_sequential off)
    assert stage_layout(trace, [[g] for g in groups[:3]]) is None


# ---------------------------------------------------------------- solve plans


def test_plan_keeps_smollm2_groups_whole_and_balanced():
    from strata_quant.workers.schedule import plan_solves, solve_cost

    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # q+k+v, o, gate+up, down
    plans = plan_solves(shapes, 2, [True] * 4)
    assert [p.owner for p in plans] == [1, 0, 1, 0] and not any(p.split for p in plans)
    work = [sum(solve_cost(*s) for s, p in zip(shapes, plans) if p.owner == r) for r in (0, 1)]
    assert max(work) / min(work) < 1.1  # the old K³-weighted costs left 0.23 s against 0.17 s measured
    assert plan_solves(shapes, 1, [True] * 4) == plan_solves(shapes, 1, [False] * 4)
    assert {p.owner for p in plan_solves(shapes, 1, [True] * 4)} == {0}


def test_plan_levels_a_dominant_group_with_uneven_shares():
    from strata_quant.workers.schedule import plan_solves, solve_cost, solve_fixed_cost, solve_row_cost

    shapes = [(128, 256), (128, 128), (128, 6144), (3072, 128)]  # hidden 128, FFN 3072
    load = [0.0, 0.0]
    plans = plan_solves(shapes, 2, [True] * 4, load)
    split = [p for p in plans if p.split]
    assert len(split) == 1 and split[0] is plans[3]  # down_proj, whose K dominates
    shares = split[0].shares
    assert shares[0][0] == 0 and shares[0][1] == shares[1][0] and shares[1][1] == 128
    counts = [e - s for s, e in shares]
    assert min(counts) > 0 and counts[0] != counts[1]
    assert split[0].owner == counts.index(max(counts))
    # modelled finishing times: levelled to within one row, and sooner than whole groups
    work = [0.0, 0.0]
    for (k, n), p in zip(shapes, plans):
        if p.split:
            for r, c in enumerate(counts):
                work[r] += solve_fixed_cost(k) + c * solve_row_cost(k)
        else:
            work[p.owner] += solve_cost(k, n)
    assert abs(work[0] - work[1]) <= solve_row_cost(3072) + 1e-12
    whole = plan_solves(shapes, 2, [True] * 4, level=False)
    assert not any(p.split for p in whole)
    whole_work = [sum(solve_cost(*s) for s, p in zip(shapes, whole) if p.owner == r) for r in (0, 1)]
    assert max(work) < 0.97 * max(whole_work)
    assert load == [w - min(work) for w in work]  # carried as each worker's modelled work
    # a group that may not split stays whole
    assert not plan_solves(shapes, 2, [True, True, True, False])[3].split


def test_plan_splits_evenly_when_groups_are_fewer_than_workers():
    from strata_quant.workers.schedule import plan_solves, row_slices

    plans = plan_solves([(576, 960)], 3, [True])
    assert plans[0].shares == tuple(row_slices(960, 3)) and plans[0].owner == 0
    assert not plan_solves([(576, 960)], 3, [False])[0].split
    assert not plan_solves([(576, 2)], 3, [True])[0].split  # fewer rows than workers
    # true-sequential: each group its own stage, split evenly; owners by LPT over the block
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
    staged = plan_solves(shapes, 2, [True, True, True, False], stage_per_group=True)
    assert [p.shares for p in staged[:3]] == [tuple(row_slices(n, 2)) for _, n in shapes[:3]]
    assert not staged[3].split
    assert [p.owner for p in staged] == [p.owner for p in plan_solves(shapes, 2, [False] * 4)]
    with pytest.raises(ValueError, match="splittable flags"):
        plan_solves([(576, 960)], 2, [True, False])


def test_levelled_split_gives_the_whole_group_bytes(tmp_path, smollm2_path, emma_path, ray_session):
    """A block whose down_proj outweighs the rest (hidden 128, FFN 3072): with propagate float at
    W=2 its rows are shared unevenly and the shares meet at the owner. The same bytes as W=2
    with whole groups (the same reduced sums); against W=1, whose sums add the batches in
    another order, the output errors agree."""
    from strata_quant.pipeline import fixtures

    model = fixtures.synthetic_llama(tmp_path / "ffn3072", hidden=128, intermediate=3072, layers=2, heads=4, kv_heads=2)
    runs = []
    for sub, workers, split in (("one", 1, True), ("levelled", 2, True), ("whole", 2, False)):
        cfg = tiny(tmp_path / sub, workers=workers, propagate="float", overlap_depth=0, split_solves=split)
        cfg["model"] = str(model)
        cfg["quant"]["true_sequential"] = False
        cfg["output"]["formats"] = []
        runs.append(run_job(parse_config(cfg), progress=False))
    one, levelled, whole = runs
    assert len(hashes(one)) == 14 and hashes(levelled) == hashes(whole)
    downs = [e for r in levelled.records.values() for e in r["results"] if e["name"].endswith("down_proj")]
    assert len(downs) == 2
    for entry in downs:
        (a, b), (c, d) = entry["solve_shares"]
        assert a == 0 and b == c and d == 128 and 0 < b - a != d - c > 0
    assert not any("solve_shares" in e for r in whole.records.values() for e in r["results"])
    err1 = {e["name"]: e["output_rel_error"] for r in one.records.values() for e in r["results"]}
    err2 = {e["name"]: e["output_rel_error"] for r in levelled.records.values() for e in r["results"]}
    assert err1.keys() == err2.keys()
    assert all(abs(err2[n] - e) <= 1e-3 * e for n, e in err1.items()), (err1, err2)


def test_uploads_run_behind_the_worker_and_wait_raises_the_first_failure():
    """Store writes leave the worker's thread (the caller returns before a slow write is done),
    ``wait`` returns only once every write handed over is stored, and a failed write is raised
    there, after the others have finished."""
    import hashlib
    import threading

    from strata_quant.pipeline.store import StoreError
    from strata_quant.workers.queues import Uploads

    release = threading.Event()
    stored: dict[str, tuple[bytes, str]] = {}

    class SlowStore:
        def put_bytes(self, key, data, sha256=None):
            release.wait(timeout=10)
            if key == "bad":
                raise StoreError("disk full")
            stored[key] = (data, sha256)

    uploads = Uploads(SlowStore())
    digests = {key: uploads.put(key, data) for key, data in (("a", b"1"), ("bad", b"2"), ("c", b"3"))}
    assert digests["a"] == hashlib.sha256(b"1").hexdigest()
    assert stored == {}  # handed over, not written yet: put returned at once
    release.set()
    with pytest.raises(StoreError, match="disk full"):
        uploads.wait()
    assert stored == {"a": (b"1", digests["a"]), "c": (b"3", digests["c"])}
    uploads.wait()  # the failure was raised once
    uploads.close()
