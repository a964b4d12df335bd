"""benchmarks/gguf_mix_run's verdicts: the issue's bar per mix (0.75×, 0.7× at Q3_K_M and Q2_K) on both texts,
and the size against llama.cpp's file, read from the scores as measured."""

from __future__ import annotations

import pytest

from benchmarks.gguf_mix_run import KINDS, TEXTS, merge_scores, paired_gap, peer_files, table, target


def _scores(mix: str, strata: float, anchor: float, strata_bytes: int, llama_bytes: int) -> dict:
    row = {
        KINDS[0]: {"dppl": strata, "kld": 0.01, "bytes": strata_bytes},
        KINDS[1]: {"dppl": 2 * anchor, "kld": 0.03, "bytes": llama_bytes},
        KINDS[2]: {"dppl": anchor, "kld": 0.02, "bytes": llama_bytes},
        KINDS[3]: {"dppl": anchor, "kld": 0.02, "bytes": llama_bytes},
    }
    return {f"{mix}/{t}/16": row for t in TEXTS}


def test_the_bar_is_stricter_at_the_low_mixes():
    assert target("Q4_K_M") == 0.75 and target("Q6_K") == 0.75
    assert target("Q3_K_M") == 0.7 and target("Q2_K") == 0.7


def test_verdicts_follow_the_ratios_and_sizes():
    scores = {
        **_scores("Q4_K_M", 0.02, 0.03, 100, 100),  # 0.67×, same size: met
        **_scores("Q3_K_M", 0.0216, 0.03, 101, 100),  # 0.72× > 0.7× and one byte larger: not met
    }
    tensors = {"Q4_K_M": {KINDS[0]: 90, KINDS[1]: 90}}  # the same tensor data, 10 bytes less than the file
    lines = table(scores, ["Q4_K_M", "Q3_K_M"], 16, tensors)
    assert sum(line.startswith("| Q4_K_M |") for line in lines) == len(KINDS)
    q4 = next(line for line in lines if line.startswith("- Q4_K_M"))
    q3 = next(line for line in lines if line.startswith("- Q3_K_M"))
    assert (
        "0.67× / 0.67× (met, bar 0.75×)" in q4
        and "size ≤ llama.cpp's (+0 bytes), tensor data ≤ llama.cpp's (+0 bytes)" in q4
    )
    assert "0.72× / 0.72× (NOT met, bar 0.7×)" in q3 and q3.endswith("size > llama.cpp's (+1 bytes)")


def test_a_file_below_the_reference_meets_the_bar_and_a_worse_one_under_a_negative_anchor_does_not():
    """Δppl < 0 (a lower perplexity than the source) beats any anchor above the source; against an anchor below
    it, strata must be no higher: the ratio's sign alone decides nothing."""
    scores = {**_scores("Q4_K_M", -0.002, 0.005, 100, 100), **_scores("Q6_K", 0.001, -0.002, 100, 100)}
    lines = table(scores, ["Q4_K_M", "Q6_K"], 16, {})
    q4 = next(line for line in lines if line.startswith("- Q4_K_M"))
    q6 = next(line for line in lines if line.startswith("- Q6_K"))
    assert "-0.40× / -0.40× (met, bar 0.75×)" in q4
    assert "-0.50× / -0.50× (NOT met, bar 0.75×)" in q6


def test_files_not_scored_are_listed_by_size_and_sized_against_llamacpp():
    """Scoring only strata and llama-imatrix's file (--score 0,3): the plain llama.cpp file is still listed and the
    size verdict reads it from the sizes of the files made."""
    scores = {
        k: {kind: v[kind] for kind in (KINDS[0], KINDS[3])} for k, v in _scores("Q2_K", 0.02, 0.03, 100, 99).items()
    }
    sizes = {"Q2_K": {KINDS[0]: 100, KINDS[1]: 99, KINDS[3]: 101}}
    lines = table(scores, ["Q2_K"], 16, None, sizes)
    assert "| Q2_K | llama.cpp | 99 | not scored | — | not scored | — |" in lines
    assert sum(line.startswith("| Q2_K |") for line in lines) == 3
    verdict = next(line for line in lines if line.startswith("- Q2_K"))
    assert "0.67× / 0.67× (met, bar 0.7×)" in verdict and "run's imatrix" not in verdict
    assert verdict.endswith("size > llama.cpp's (+1 bytes)")


def test_a_later_pass_adds_its_kinds_to_the_saved_scores():
    """A pass over the kinds not yet scored keeps the saved kinds; a reference perplexity that differs (other
    windows, another source) is refused rather than mixed in."""
    saved = {"reference": {"ppl": 40.0, "bytes": 9}, KINDS[3]: {"dppl": 0.1}}
    new = {"reference": {"ppl": 40.0, "bytes": 9}, KINDS[0]: {"dppl": 0.05}}
    assert merge_scores(saved, new) == {**saved, KINDS[0]: {"dppl": 0.05}}
    assert merge_scores(None, new) == new
    with pytest.raises(ValueError, match="other windows"):
        merge_scores(saved, {**new, "reference": {"ppl": 41.0, "bytes": 9}})


def test_quant_overrides_are_checked_before_any_work_and_keep_to_their_folder(tmp_path, monkeypatch, capsys):
    """--quant: a bad key or value refused by the jobs' own configs, parsed before any work; a folder holding another
    solver's files refused; nothing is run or written in either case."""
    import sys

    from benchmarks import gguf_mix_run

    def run(*quant: str) -> str:
        argv = ["gguf_mix_run", "--mixes", "Q4_K_M", "--out", str(tmp_path / "m")]
        monkeypatch.setattr(sys, "argv", argv + [a for q in quant for a in ("--quant", q)])
        with pytest.raises(SystemExit):
            gguf_mix_run.main()
        return capsys.readouterr().err

    assert "quant.diag_shrink: Input should be less than or equal to 1" in run("diag_shrink=2")
    assert "quant.diag_shrnk: unknown key" in run("diag_shrnk=0.2")
    assert not (tmp_path / "m").exists()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "quant.json").write_text('{"diag_shrink": 0.5}')
    assert "holds files of the solver" in run("diag_shrink=0.3")
    # files calibrated on one text are not scored as another's
    (tmp_path / "m" / "calibration.json").write_text('{"source": "fixture:calib-mix"}')
    assert "holds files calibrated on" in run("diag_shrink=0.5")
    # a folder of the default solver's files (stamped {}) is not extended with another solver's
    (tmp_path / "m" / "calibration.json").unlink()
    (tmp_path / "m" / "quant.json").write_text("{}")
    assert "holds files of the solver" in run("diag_shrink=0.5")


def test_each_model_names_its_own_texts_and_a_source_the_fixtures_pin():
    """The code model is scored on code beside Persuasion: the table's columns and verdict name its texts; a model
    whose source is a split GGUF is one pipeline.fixtures pins (size and SHA-256)."""
    from benchmarks.gguf_mix_run import MODELS
    from strata_quant.pipeline import fixtures

    texts = MODELS["qwen2.5-coder-1.5b"].texts
    assert list(texts) == ["Persuasion", "Python stdlib"] and texts["Python stdlib"] == "fixture:code/python-stdlib"
    scores = {f"Q2_K/{t}/16": v for t, v in zip(texts, _scores("Q2_K", 0.02, 0.03, 100, 100).values(), strict=True)}
    lines = table(scores, ["Q2_K"], 16, None, None, texts)
    assert lines[0].startswith("| mix | file | bytes | Persuasion Δppl | Persuasion KLD | Python stdlib Δppl |")
    verdict = next(line for line in lines if line.startswith("- Q2_K"))
    assert verdict.startswith("- Q2_K: strata Δppl Persuasion / Python stdlib vs llama.cpp + llama-imatrix: 0.67×")
    for name, model in MODELS.items():
        assert model.split == (name in fixtures.SPLIT_GGUFS)
    with pytest.raises(KeyError):  # a table keyed by the other model's texts is not read as this one's
        table(scores, ["Q2_K"], 16)


def test_the_record_holds_each_runs_report_and_only_the_mixes_scores(tmp_path, monkeypatch):
    """--json: each mix's timings and checks come from its job report in --out, the scores are those of the mixes
    and windows asked for (a folder keeps others), and the calibration says llama-imatrix's own chunk count."""
    import argparse
    import hashlib
    import json
    import sys

    from benchmarks.gguf_mix_run import record

    out = tmp_path / "m"
    (out / "Q2_K" / "out").mkdir(parents=True)
    check = {"linear_types": {"Q3_K": 30}, "bit_exact_linears": 30, "quantized_linears": 30, "reader": "gguf-py"}
    report = {"timings": {"total_s": 12.0}, "checks": [check]}
    (out / "Q2_K" / "out" / "x-report.json").write_text(json.dumps(report))
    (out / "Q2_K" / "out" / "x.gguf").write_bytes(b"GGUF")
    src = tmp_path / "src.gguf"
    src.write_bytes(b"source")
    scores = {**_scores("Q2_K", 0.1, 0.2, 9, 9), **_scores("Q6_K", 0.1, 0.2, 9, 9), "Q2_K/KJV/8": {}}
    args = argparse.Namespace(model="smollm2-135m", quant_overrides={"diag_shrink": 0.3}, calibration="fixture:calib-mix",
                              cal_windows=64, seq_len=512, eval_windows=16)  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["gguf_mix_run", "--mixes", "Q2_K"])
    r = record(args, out, src, ["Q2_K"], scores, 63)
    assert sorted(r["scores"]) == sorted(f"Q2_K/{t}/16" for t in TEXTS)
    run = r["strata_runs"]["Q2_K"]
    assert run["timings"] == {"total_s": 12.0} and run["bit_exact_linears"] == 30 and "reader" not in run
    assert len(run["file_sha256"]) == 64 and r["source_gguf_sha256"] != run["file_sha256"]
    assert r["calibration"] == {"text": "fixture:calib-mix", "windows": 64, "seq_len": 512, "llama_imatrix_chunks": 63}
    assert r["command"].endswith("--mixes Q2_K") and r["quant"] == {"diag_shrink": 0.3}
    assert "peer_files" not in r
    peer = tmp_path / "peer.gguf"
    peer.write_bytes(b"peer")
    with_peer = record(args, out, src, ["Q2_K"], scores, 63, {"Q2_K": {"auto-round": peer}})
    assert with_peer["peer_files"]["Q2_K"]["auto-round"]["path"] == str(peer)
    assert with_peer["peer_files"]["Q2_K"]["auto-round"]["sha256"] == hashlib.sha256(b"peer").hexdigest()


def test_records_of_one_experiment_plot_together_and_others_are_refused(tmp_path, capsys):
    """benchmarks/gguf_mix_plot draws the mixes of separate --json records in one plot and table; a record of
    another calibration or solver (its --quant, read from the command where the record predates the field), or a
    mix scored twice, is refused before anything is drawn."""
    import json

    from benchmarks import gguf_mix_plot

    def record(mix: str, **change) -> dict:
        r = {"model": "fixture:smollm2-135m", "source_gguf_sha256": "ab" * 32, "eval_windows": 16,
             "calibration": {"text": "fixture:calib-mix", "windows": 32, "seq_len": 512, "llama_imatrix_chunks": 31},
             "quant": {"diag_shrink": 0.3}, "command": "python -m benchmarks.gguf_mix_run", "scores": {}}  # fmt: skip
        r["scores"] = _scores(mix, 0.02, 0.03, 100, 100)
        r.update(change)
        return r

    old = record("Q2_K", command="python -m benchmarks.gguf_mix_run --mixes Q2_K --quant diag_shrink=0.3")
    del old["quant"]
    paths = []
    for i, r in enumerate((old, record("Q3_K_M"), record("Q4_K_M", quant={}), record("Q2_K"))):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    png = tmp_path / "plot.png"
    gguf_mix_plot.main([str(paths[0]), str(paths[1]), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert png.stat().st_size > 10_000 and "- Q2_K:" in printed and "- Q3_K_M:" in printed
    # a record that scored only strata's and the llama-imatrix file (--score 0,3): sizes against the latter
    only = record("Q6_K")
    for row in only["scores"].values():  # one row object shared by the texts
        row.pop(KINDS[1], None), row.pop(KINDS[2], None)
    paths.append(tmp_path / "only.json")
    paths[-1].write_text(json.dumps(only))
    gguf_mix_plot.main([str(paths[-1]), "--plot", str(png)])
    assert "size ≤ llama.cpp + llama-imatrix's (+0 bytes)" in capsys.readouterr().out
    for bad, field in ((paths[2], "quant"), (paths[3], "Q2_K/Persuasion/16 is scored in an earlier record")):
        png.unlink(missing_ok=True)
        with pytest.raises(SystemExit):
            gguf_mix_plot.main([str(paths[0]), str(bad), "--plot", str(png)])
        assert field in capsys.readouterr().err and not png.exists()


def test_kept_statistics_the_first_mix_keeps_and_the_others_solve_from_it(tmp_path):
    """--kept-statistics: every mix's job in one store; the first keeps its statistics, each other names the first
    run (calibration.statistics) and so runs no calibration forward; without the flag each mix has its own store."""
    import argparse

    from benchmarks.gguf_mix_run import mix_config

    args = argparse.Namespace(model="smollm2-135m", mixes="Q4_K_M,Q6_K", calibration="fixture:austen/emma",
                              cal_windows=8, seq_len=512, workers=2, quant_overrides={}, out=str(tmp_path),
                              kept_statistics=True, kept_run="smollm2-135m-Q4_K_M-abc")  # fmt: skip
    first, other = mix_config(tmp_path / "Q4_K_M", "Q4_K_M", args), mix_config(tmp_path / "Q6_K", "Q6_K", args)
    assert first.run.keep_statistics and first.calibration.statistics is None
    assert not other.run.keep_statistics and other.calibration.statistics == "smollm2-135m-Q4_K_M-abc"
    assert first.run.store == other.run.store == str(tmp_path / "store")
    args.kept_statistics = False
    alone = mix_config(tmp_path / "Q6_K", "Q6_K", args)
    assert alone.run.store == str(tmp_path / "Q6_K" / "store") and alone.calibration.statistics is None


def test_a_peers_file_of_each_mix_is_found_before_any_work_and_listed_after_strata_and_llamacpp(tmp_path):
    """--peer LABEL=PATTERN: one file per mix or a refusal that names the pattern; its rows follow KINDS' rows and
    leave the verdict (strata against llama.cpp) as it was."""
    for mix in ("q4_k_m", "q2_k"):
        (tmp_path / f"gguf:{mix}").mkdir()
        (tmp_path / f"gguf:{mix}" / "model.gguf").write_bytes(b"x")
    peers = peer_files([f"auto-round (iters 0)={tmp_path}/gguf:{{mix_lower}}/*.gguf"], ["Q4_K_M", "Q2_K"])
    assert peers["Q2_K"]["auto-round (iters 0)"] == tmp_path / "gguf:q2_k" / "model.gguf"
    for bad, why in (
        ([f"ar={tmp_path}/gguf:{{mix_lower}}/*.gguf"], "0 files match"),  # no Q3_K_M file
        (["ar"], "LABEL=PATTERN"),
        ([f"{KINDS[1]}={tmp_path}/*"], "strata's own"),
    ):
        with pytest.raises(ValueError, match=why):
            peer_files(bad, ["Q4_K_M", "Q3_K_M"])
    scores = _scores("Q4_K_M", 0.02, 0.03, 100, 100)
    for row in scores.values():
        row["auto-round (iters 0)"] = {"dppl": 0.025, "kld": 0.015, "bytes": 100}
    lines = table(scores, ["Q4_K_M"], 16)
    rows = [line for line in lines if line.startswith("| Q4_K_M |")]
    assert len(rows) == len(KINDS) + 1 and rows[-1].startswith("| Q4_K_M | auto-round (iters 0) | 100 | +2.50 % |")
    assert "0.67× / 0.67× (met, bar 0.75×)" in next(line for line in lines if line.startswith("- Q4_K_M"))


def test_own_mix_is_planned_from_the_first_mix_probe_and_judged_beside_strata_run(tmp_path, monkeypatch, capsys):
    """--own-mix: the first mix's job probes every type strata solves on; strata's own file is listed right after
    its file of llama.cpp's mix and gets a verdict line of its own; without --kept-statistics it is refused."""
    import argparse
    import sys

    from benchmarks import gguf_mix_run
    from benchmarks.gguf_mix_run import OWN, PROBE_TYPES, mix_config
    from strata_quant.workers.ggml import GRIDS

    args = argparse.Namespace(model="smollm2-135m", mixes="Q4_K_M,Q2_K", calibration="fixture:austen/emma",
                              cal_windows=8, seq_len=512, workers=2, quant_overrides={}, out=str(tmp_path),
                              kept_statistics=True, kept_run="probe-id", own_mix=True)  # fmt: skip
    first, other = mix_config(tmp_path / "Q4_K_M", "Q4_K_M", args), mix_config(tmp_path / "Q2_K", "Q2_K", args)
    assert first.quant.sensitivity_types == PROBE_TYPES and sorted(PROBE_TYPES) == sorted(GRIDS)
    assert first.run.keep_statistics and other.quant.sensitivity_types == []
    scores = _scores("Q2_K", 0.03, 0.03, 100, 100)
    for row in scores.values():
        row[OWN] = {"dppl": 0.02, "kld": 0.01, "bytes": 99}
    lines = table(scores, ["Q2_K"], 16, {"Q2_K": {KINDS[0]: 90, KINDS[1]: 90, OWN: 89}})
    rows = [line.split(" | ")[1] for line in lines if line.startswith("| Q2_K |")]
    assert rows[:2] == [KINDS[0], OWN] and len(rows) == len(KINDS) + 1
    own = next(line for line in lines if line.startswith("- Q2_K (own mix)"))
    assert "0.67× / 0.67× (met, bar 0.7×)" in own and "size ≤ llama.cpp's (-1 bytes)" in own
    assert "tensor data ≤ llama.cpp's (-1 bytes)" in own
    assert "1.00× / 1.00× (NOT met" in next(line for line in lines if line.startswith("- Q2_K:"))
    monkeypatch.setattr(sys, "argv", ["gguf_mix_run", "--own-mix", "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit):
        gguf_mix_run.main()
    assert "give --kept-statistics" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_paired_gap_is_the_delta_method_over_windows():
    """Δppl, a gap between two files and the margin to a bar carry the SE of their per-window terms, paired by
    window: what a window costs every file cancels, so windows of very different difficulty give a small SE."""
    import math

    ref_w = [2.0, 3.0, 2.5, 3.5]
    a_w = [w + d for w, d in zip(ref_w, [0.10, 0.05, 0.12, 0.03], strict=True)]
    b_w = [w + d for w, d in zip(ref_w, [0.20, 0.15, 0.20, 0.17], strict=True)]
    ppl = {k: math.exp(sum(v) / len(v)) for k, v in {"ref": ref_w, "a": a_w, "b": b_w}.items()}
    per = {
        "reference": {"ppl": ppl["ref"], "window_nll": ref_w},
        "a": {"ppl": ppl["a"], "dppl": ppl["a"] / ppl["ref"] - 1, "window_nll": a_w},
        "b": {"ppl": ppl["b"], "dppl": ppl["b"] / ppl["ref"] - 1, "window_nll": b_w},
    }

    def se(terms):
        mean = sum(terms) / len(terms)
        return math.sqrt(sum((x - mean) ** 2 for x in terms) / (len(terms) - 1) / len(terms))

    da = [x - r for x, r in zip(a_w, ref_w, strict=True)]
    db = [x - r for x, r in zip(b_w, ref_w, strict=True)]
    gap, err = paired_gap(per, "a")
    assert gap == pytest.approx(math.exp(sum(da) / 4) - 1)
    assert err == pytest.approx(se([ppl["a"] / ppl["ref"] * x for x in da]))
    gap, err = paired_gap(per, "a", "b", 0.7)  # a's margin to a bar of 0.7× b
    assert gap == pytest.approx(per["a"]["dppl"] - 0.7 * per["b"]["dppl"])
    terms = [(ppl["a"] * x - 0.7 * ppl["b"] * y) / ppl["ref"] for x, y in zip(da, db, strict=True)]
    assert err == pytest.approx(se(terms)) and err < paired_gap(per, "a")[1]  # the windows' spread cancels
    # scores saved without per-window NLLs: the gap, no SE, and the table shows no ±
    old = {k: {x: y for x, y in v.items() if x != "window_nll"} for k, v in per.items()}
    assert paired_gap(old, "a") == (pytest.approx(per["a"]["dppl"]), None)


def test_the_table_gives_each_dppl_and_the_margin_to_the_bar_with_its_se():
    scores = _scores("Q2_K", 0.02, 0.03, 100, 100)
    for row in scores.values():
        row["reference"] = {"ppl": 10.0, "window_nll": [2.0, 2.4]}
        for kind, v in row.items():
            if kind != "reference":
                v["ppl"] = 10.0 * (1 + v["dppl"])
                v["window_nll"] = [2.0 + v["dppl"], 2.4 + v["dppl"] + 0.01]
    lines = table(scores, ["Q2_K"], 16, {})
    strata_row = next(line for line in lines if line.startswith(f"| Q2_K | {KINDS[0]} |"))
    assert "+2.00 % ± 0.51 | 0.0100" in strata_row  # 1.02 · sd(0.02, 0.03) / √2 = 0.0051
    verdict = next(line for line in lines if line.startswith("- Q2_K"))
    # 0.02 − 0.7 · 0.03; per window 1.02 · (0.02, 0.03) − 0.7 · 1.03 · (0.03, 0.04) = (−0.00123, 0.00176)
    assert "margin -0.10 ± 0.15 / -0.10 ± 0.15 points" in verdict
    saved = {"reference": {"ppl": 10.0, "bytes": 9}, KINDS[3]: {"dppl": 0.1}}
    merged = merge_scores(saved, {"reference": {"ppl": 10.0, "bytes": 9, "window_nll": [2.0]}, KINDS[0]: {}})
    assert merged["reference"]["window_nll"] == [2.0]  # the saved reference gains this pass's windows


def test_peers_get_the_bar_and_every_strata_file_is_paired_against_the_run_in_dppl_and_kld():
    """A peer scored beside (another solver's file) gets its own verdict against the bar; the table pairs it with
    strata's run, and strata's run with llama.cpp's imatrix file, in Δppl and KLD, each ± its SE over windows."""
    peer = "strata, another α"
    scores = _scores("Q2_K", 0.02, 0.03, 100, 100)
    for row in scores.values():
        row[peer] = {"dppl": 0.018, "kld": 0.012, "bytes": 100}
        row["reference"] = {"ppl": 10.0, "window_nll": [2.0, 2.4]}
        for kind, v in row.items():
            if kind != "reference":
                v["ppl"] = 10.0 * (1 + v["dppl"])
                v["window_nll"] = [2.0 + v["dppl"], 2.4 + v["dppl"]]
                v["window_kld"] = [v["kld"] - 0.001, v["kld"] + 0.001]
        row[peer]["window_kld"] = [0.0115, 0.0125]
    lines = table(scores, ["Q2_K"], 16, {})
    peer_verdict = next(line for line in lines if line.startswith(f"- Q2_K ({peer}): {peer} Δppl"))
    assert "0.60× / 0.60× (met, bar 0.7×; margin -0.30 ± 0.00" in peer_verdict
    pair = next(line for line in lines if line.startswith(f"- Q2_K: {peer} − {KINDS[0]}, paired"))
    # KLD: windows (0.0115 − 0.009, 0.0125 − 0.011) = (0.0025, 0.0015): mean 0.0020, sd 0.000707 / √2 = 0.0005
    assert "Δppl -0.20 ± 0.00 / -0.20 ± 0.00 points; KLD +0.0020 ± 0.0005 / +0.0020 ± 0.0005" in pair
    assert any(line.startswith(f"- Q2_K: {KINDS[0]} − {KINDS[3]}, paired: Δppl -1.00 ± 0.00") for line in lines)
    # without per-window scores no paired line is printed (the verdicts stay)
    for row in scores.values():
        for v in row.values():
            v.pop("window_kld", None)
    assert not any("paired" in line for line in table(scores, ["Q2_K"], 16, {}))
