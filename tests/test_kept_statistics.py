"""A run solved from another run's kept statistics (``calibration.statistics``): the source run
stores every group's H (``run.keep_statistics``); a later run on the same checkpoint solves from
them with no calibration forward. With the source's solver settings it repeats the source byte
for byte; with another grid it solves that grid from the same H. Refusals before the later run's
record is written: no such run, statistics not kept, another checkpoint, other calibration, an
unfinished block, a method that needs activations."""

from __future__ import annotations

import shutil

import pytest

from strata_quant.pipeline.config import ConfigError, parse_config
from strata_quant.pipeline.store import open_store


def _config(tmp_path, model, name: str = "src", **sections) -> dict:
    cfg = {
        "name": name,
        "model": str(model),
        "calibration": {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 64},
        "quant": {"method": "gptq", "bits": 4, "group_size": 32},
        "run": {"workers": 2, "batch_size": 2, "store": str(tmp_path / "store"), "keep_statistics": True},
        "output": {"dir": str(tmp_path / "out"), "formats": ["gptq"]},
        "eval": None,
    }
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values}
    return cfg


@pytest.fixture(scope="module")
def source(tiny_model_path, tmp_path_factory, ray_session):
    """The tiny Llama's GPTQ W4 g32 run on 2 workers that keeps its statistics."""
    from strata_quant.pipeline.run import run_job

    tmp_path = tmp_path_factory.mktemp("kept")
    outcome = run_job(parse_config(_config(tmp_path, tiny_model_path)), progress=False)
    return tmp_path, outcome


def _by_name(outcome) -> dict[str, dict]:
    return {r["name"]: r for record in outcome.records.values() for r in record["results"]}


def test_source_keeps_one_hessian_per_group(source):
    tmp_path, outcome = source
    results = _by_name(outcome)
    kept = [r["statistics"] for r in results.values() if "statistics" in r]
    per_block = len(kept) // len(outcome.records)
    assert per_block == 4, kept  # q/k/v, o, gate/up, down: the Llama block's shared-input groups
    assert sorted(n for e in kept[:per_block] for n in e["group"]) == sorted(
        n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in results if ".layers.0." in n
    )
    assert sorted(e["stage"] for e in kept[:per_block]) == [0, 1, 2, 3]  # true-sequential: a stage per group
    store = open_store(str(tmp_path / "store"))
    assert all(store.exists(e["key"]) for e in kept)


def test_a_run_from_kept_statistics_repeats_the_source_byte_for_byte_without_a_forward(
    source, tiny_model_path, ray_session
):
    from strata_quant.pipeline.run import run_job

    tmp_path, outcome = source
    cfg = _config(tmp_path, tiny_model_path, "again", calibration={"statistics": outcome.run_id})
    cfg["run"]["keep_statistics"] = False
    again = run_job(parse_config(cfg), progress=False)
    assert again.run_id != outcome.run_id
    want, got = _by_name(outcome), _by_name(again)
    assert set(got) == set(want)
    assert all(got[n]["sha256"] == want[n]["sha256"] for n in want)  # the same bytes of every result
    assert all(got[n]["activations"]["sha256"] == want[n]["activations"]["sha256"] for n in want)
    for record in again.records.values():  # no calibration forward: no hidden states went through a block
        assert all("forward" not in t for t in record["timings"].values()), record["timings"]
    for record in outcome.records.values():
        assert all("forward" in t for t in record["timings"].values())
    store = open_store(str(tmp_path / "store"))
    assert store.get_json(f"runs/{again.run_id}/run.json")["parts"]["calibration"].startswith(
        f"statistics:{outcome.run_id}:"
    )

    # another grid from the same H: 3-bit results, not the source's
    cfg = _config(tmp_path, tiny_model_path, "three", calibration={"statistics": outcome.run_id}, quant={"bits": 3})
    three = _by_name(run_job(parse_config(cfg), progress=False))
    assert {r["bits"] for r in three.values()} == {3}
    assert all(three[n]["sha256"] != want[n]["sha256"] for n in want)
    assert all(three[n]["output_rel_error"] > want[n]["output_rel_error"] for n in want)  # 3 bits lose more


def _refused(tmp_path, cfg: dict, match: str) -> None:
    from strata_quant.pipeline.run import plan_run

    store = open_store(str(tmp_path / "store"))
    before = set(store.list("runs/"))
    with pytest.raises(ConfigError, match=match):
        plan_run(parse_config(cfg))
    assert set(store.list("runs/")) == before  # nothing written for the refused run


def test_plan_refuses_statistics_it_cannot_solve_from(source, tiny_model_path, tmp_path_factory):
    from strata_quant.pipeline import fixtures

    tmp_path, outcome = source
    src = outcome.run_id

    def cfg(**sections):
        sections["calibration"] = {"statistics": src, **sections.get("calibration", {})}
        return _config(tmp_path, sections.pop("model", tiny_model_path), "later", **sections)

    _refused(tmp_path, cfg(calibration={"statistics": "nowhere"}), "run 'nowhere' .* does not exist")
    _refused(tmp_path, cfg(calibration={"num_samples": 4}), r"calibration.num_samples 8 there, 4 here")
    _refused(tmp_path, cfg(run={"propagate": "float"}), r"run.propagate 'quantized' there, 'float' here")
    other = fixtures.synthetic_llama(
        tmp_path_factory.mktemp("other") / "llama", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2
    )
    _refused(tmp_path, cfg(model=other), "was made from another checkpoint")

    store = open_store(str(tmp_path / "store"))
    root = tmp_path / "store" / "runs"
    shutil.copytree(root / src, root / "unkept")  # the same run, as if it had not kept its statistics
    run = store.get_json("runs/unkept/run.json")
    run["config"]["run"]["keep_statistics"] = False
    store.put_json("runs/unkept/run.json", run)
    _refused(tmp_path, cfg(calibration={"statistics": "unkept"}), "did not keep its statistics")
    shutil.copytree(root / src, root / "partial")
    (root / "partial" / "blocks" / "00001" / "record.json").unlink()
    _refused(tmp_path, cfg(calibration={"statistics": "partial"}), "block 1 is not finished")

    with pytest.raises(ConfigError, match="quant.method awq needs the calibration's activations"):
        parse_config(cfg(quant={"method": "awq"}))


def test_the_card_and_the_report_name_the_run_whose_statistics_were_solved_from():
    from strata_quant.pipeline.modelcard import model_card
    from strata_quant.pipeline.report import config_items

    cal = {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 64, "prefix_tokens": []}
    report = {"method": "gptq", "quant": {"bits": 4, "group_size": 32}, "calibration": {**cal, "statistics": "src-1"}}
    assert "| Statistics | kept by run `src-1` (no calibration forward in this run) |" in model_card(report, "gguf")
    assert ("Statistics", "kept by run src-1 (solved from its Hessians, no calibration forward)") in config_items(
        report
    )
    report["calibration"] = cal  # a run that did its own forward says nothing of kept statistics
    assert "Statistics" not in model_card(report, "gguf") and "Statistics" not in dict(config_items(report))
