"""`strata demo`: the embedded default job, then llama.cpp's K mix of the same model solved in a run of its own,
and one table of every artifact's size and quality."""

from __future__ import annotations

from strata_quant.pipeline import cli
from strata_quant.pipeline.config import load_config
from strata_quant.pipeline.formats.gguf_solved import solves_mix
from tests.test_check import needs_llamacpp


def test_the_mix_job_is_the_default_jobs_model_and_calibration_as_a_solved_mix():
    base, mix = load_config(cli.DEMO_CONFIG), load_config(cli.DEMO_MIX_CONFIG)
    assert mix.model == base.model and mix.calibration == base.calibration
    assert mix.eval.text == base.eval.text and mix.eval.off_domain == base.eval.off_domain
    assert (mix.eval.windows, mix.eval.seq_len) == (base.eval.windows, base.eval.seq_len)
    assert mix.run.propagate == base.run.propagate and mix.run.workers == base.run.workers
    assert mix.output.formats == ["gguf"] and mix.output.gguf_type == "Q4_K_M"
    assert solves_mix(mix.output.gguf_type, mix.quant.method)
    assert mix.output.dir == base.output.dir and mix.name != base.name  # beside the GPTQ folder, not over it


def test_demo_runs_both_jobs_with_the_options_given(monkeypatch, capsys):
    ran = []

    def fake_run(cfg, quiet, return_report=False):
        ran.append(cfg)
        return {"artifacts": {}, "quality": None}

    monkeypatch.setattr(cli, "_run_and_print", fake_run)
    assert cli.main(["demo", "--workers", "1", "--no-eval", "--gguf-mix", "Q5_K_M"]) == 0
    assert [c.name for c in ran] == ["smollm2-135m-gptq-w4g64", "smollm2-135m-gptq-q4km"]
    assert all(c.run.workers == 1 and c.eval is None for c in ran)
    assert ran[0].output.formats == ["gptq", "gguf"] and ran[1].output.gguf_type == "Q5_K_M"
    assert "demo artifacts" in capsys.readouterr().out

    ran.clear()
    assert cli.main(["demo", "--gguf-mix", "none"]) == 0
    assert [c.name for c in ran] == ["smollm2-135m-gptq-w4g64"]


def _quality(text: str, delta: float, off: float) -> dict:
    def rows(d):
        return {"fp16 (reference)": {"ppl_increase": 0.0}, "strata X (GGUF via gguf-py)": {"ppl_increase": d}}

    return {"text": text, "rows": rows(delta), "off_domain": {"text": "fixture:kjv", "rows": rows(off)}}


def test_summary_lists_every_artifact_with_its_size_and_both_texts():
    reports = [
        {
            "artifacts": {
                "gptq": {"path": "out/a-gptq", "bytes": 118_100_000},
                "gguf": {"path": "out/a-Q4_0.gguf", "bytes": 118_300_000},
            },
            "quality": _quality("fixture:austen/persuasion", 0.0976, 0.3245),
        },
        {
            "artifacts": {"gguf": {"path": "out/b-Q4_K_M.gguf", "bytes": 105_454_304}},
            "quality": _quality("fixture:austen/persuasion", 0.0212, 0.0562),
        },
    ]
    lines = cli.demo_summary(reports).splitlines()
    assert "persuasion" in lines[1] and "kjv" in lines[1]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["a-gptq"] == ["118.1", "+9.76%", "+32.45%"]
    assert rows["a-Q4_0.gguf"] == ["118.3", "+9.76%", "+32.45%"]
    assert rows["b-Q4_K_M.gguf"] == ["105.5", "+2.12%", "+5.62%"]


@needs_llamacpp
def test_the_mix_job_passes_the_plan_time_checks(tmp_path, capsys):
    """llama.cpp's dry run gives every SmolLM2 linear a type strata solves (no Ray, no weights read)."""
    rc = cli.main(
        ["check", str(cli.DEMO_MIX_CONFIG), "--set", f"output.dir={tmp_path}/out", "--set", f"run.store={tmp_path}/s"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "can run" in out
