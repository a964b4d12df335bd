"""The off-domain held-out text, the calibration mix and the Hessian shrinkage (issue #22)."""

from __future__ import annotations

import torch

from strata_quant.pipeline import fixtures, text_fixtures
from strata_quant.pipeline.config import JobConfig
from strata_quant.pipeline.job import format_report
from strata_quant.pipeline.report import eval_to_report
from strata_quant.workers.gptq import gptq_quantize, shrink_to_diagonal
from strata_quant.workers.grids import dequantize, group_params, quantize
from strata_quant.workers.job import WorkerJob
from strata_quant.workers.methods import quantize_group
from strata_quant.workers.result import QuantSpec
from strata_quant.workers.rtn import rtn_quantize
from tests.test_bad_input import tiny_dict
from tests.test_check import refused


def test_kjv_text_drops_verse_numbers():
    raw = "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\nGenesis 2\n\n  1 Thus the heavens.\n"
    assert (
        text_fixtures.kjv_text(raw)
        == "Genesis 1\n\nIn the beginning. And the earth.\n\nGenesis 2\n\nThus the heavens.\n"
    )


def test_interleave_takes_every_source_in_turn():
    a, b = "".join(f"a{i}\n" for i in range(50)), "".join(f"b{i}\n" for i in range(50))
    out = text_fixtures.interleave([a, b], share=60, piece=10)
    assert out.count("a") == a[:60].count("a") and out.count("b") == b[:60].count("b")
    first_b = out.index("b")
    assert 0 < first_b < 20 and out.index("a", first_b) < out.index("b", first_b + 15)


def test_text_fixtures_are_pinned_and_mix_holds_no_eval_text():
    texts = {name: fetch() for name, fetch in text_fixtures.FETCH.items()}  # cached by `strata fixtures`
    for name, path in texts.items():
        assert fixtures.resolve(f"fixture:{name}") == path
        assert fixtures.file_sha256(path) == text_fixtures._pinned(name)
    kjv = texts["kjv"].read_text()
    persuasion = fixtures.austen("persuasion").read_text()
    for name in text_fixtures.MIXES:
        mix = texts[name].read_text()
        for held in (persuasion, kjv):  # spot checks: lines from all along each held-out text
            lines = [x for x in held.splitlines() if len(x) > 60]
            assert not any(x in mix for x in lines[:: max(1, len(lines) // 200)])
        for f in text_fixtures.CODE_EVAL_FILES:
            assert f"# file: {f}\n" not in mix
        for f in text_fixtures.MIX_CODE_FILES:
            assert f"# file: {f}\n" in mix
        assert "Emma Woodhouse" in mix and "def " in mix  # fiction and code, interleaved from the start
        assert mix.index("def ") < len(mix) // 10


def test_code_weighted_mix_is_the_mix_with_half_its_prose():
    """calib-code keeps every line of the mix's code and about half of its fiction and quotations."""
    mix, code = (text_fixtures.mixed_text(n).read_text() for n in ("calib-mix", "calib-code"))
    defs = [x for x in mix.splitlines() if x.startswith("    def ")]
    assert defs and all(x in code for x in defs)
    prose = [x for x in mix.splitlines() if len(x) > 60 and not x.startswith((" ", "#"))][::50]
    kept = sum(x in code for x in prose) / len(prose)
    assert 0.3 < kept < 0.7, kept
    assert 0.5 * len(mix) < len(code) < 0.7 * len(mix)


def test_shrink_to_diagonal_math():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    h = x.T @ x
    out = shrink_to_diagonal(h, 0.25)
    assert torch.allclose(out.diagonal(), h.diagonal())
    off = ~torch.eye(16, dtype=torch.bool)
    assert torch.allclose(out[off], 0.75 * h[off])
    assert torch.linalg.eigvalsh(out).min() > 0


def test_full_shrink_is_rounding_to_nearest_and_partial_shrink_differs():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 64, generator=gen)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # correlated inputs
    h = 2 * x.T @ x / 512
    spec = QuantSpec(4, 32, True)
    rtn = rtn_quantize(w, spec)
    assert torch.equal(gptq_quantize(w, h, spec, diag_shrink=1.0).codes, rtn.codes)
    plain, half = gptq_quantize(w, h, spec), gptq_quantize(w, h, spec, diag_shrink=0.5)
    assert not torch.equal(plain.codes, half.codes) and half.params["diag_shrink"] == 0.5


def test_weighted_grid_search_minimises_the_weighted_error():
    """The importance-weighted scale search picks, per row, the shrink with the least
    Σ_k c_k·|ŵ_k − w_k|^2.4 among the candidates; uniform weights give the plain search."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=gen)
    c = torch.rand(32, generator=gen) ** 4 * 100  # a few inputs dominate, as in a real H diagonal
    spec = QuantSpec(4, 32, True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(group_params(w, spec, 100, col_weight=torch.ones(32)), group_params(w, spec, 100))
    )
    s, z = group_params(w, spec, 100, col_weight=c)
    plain_s, plain_z = group_params(w, spec, 100)

    def weighted(scale, zero):
        return (dequantize(quantize(w, scale, zero, spec.maxq), scale, zero) - w).abs().pow(2.4) @ c

    assert (weighted(s, z) <= weighted(plain_s, plain_z) + 1e-6).all()
    assert (weighted(s, z) < weighted(plain_s, plain_z) - 1e-6).any()


def test_gptq_weighted_grid_changes_static_group_scales():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 64, generator=gen)
    x = torch.randn(512, 64, generator=gen) * torch.linspace(0.1, 3, 64)  # unequal input energies
    h = 2 * x.T @ x / 512
    spec = QuantSpec(4, 32, True)
    plain = gptq_quantize(w, h, spec, act_order=True, mse_grid=100)
    weighted = gptq_quantize(w, h, spec, act_order=True, mse_grid=100, mse_weight="hessian")
    assert weighted.params["mse_weight"] == "hessian" and not torch.equal(plain.scales, weighted.scales)
    # a diagonal H: no error feedback, so the weighted search's own objective is what the codes show
    d = torch.diag(h.diagonal())
    err = {}
    for k in ("uniform", "hessian"):
        approx = gptq_quantize(w, d, spec, mse_grid=100, mse_weight=k).dequantize()
        err[k] = float(((approx - w).abs().pow(2.4) @ h.diagonal()).sum())
    assert err["hessian"] < err["uniform"]
    try:
        gptq_quantize(w, h, spec, mse_weight="fisher")
    except ValueError as e:
        assert "mse_weight" in str(e)
    else:
        raise AssertionError("mse_weight fisher accepted")


def test_mse_weight_reaches_the_solver_from_the_config():
    cfg = JobConfig.model_validate(
        {"name": "t", "model": "m", "calibration": {"source": "x"}, "quant": {"mse_weight": "hessian", "mse_grid": 50}}
    )
    options = WorkerJob(model_config={}, spec=QuantSpec(4, 32, True), mse_weight=cfg.quant.mse_weight).method_options()
    gen = torch.Generator().manual_seed(4)
    w, x = torch.randn(8, 64, generator=gen), torch.randn(256, 64, generator=gen)
    result = quantize_group("gptq", w, 2 * x.T @ x / 256, QuantSpec(4, 32, True), options)
    assert result.params["mse_weight"] == "hessian"
    try:
        JobConfig.model_validate(
            {"name": "t", "model": "m", "calibration": {"source": "x"}, "quant": {"mse_weight": "fisher"}}
        )
    except ValueError as err:
        assert "mse_weight" in str(err)
    else:
        raise AssertionError("mse_weight fisher accepted")


def test_config_defaults_and_range():
    cfg = JobConfig.model_validate({"name": "t", "model": "fixture:tiny-llama", "calibration": {"source": "x"}})
    assert cfg.eval.off_domain == "fixture:kjv" and cfg.quant.diag_shrink == 0.0
    try:
        JobConfig.model_validate(
            {"name": "t", "model": "m", "calibration": {"source": "x"}, "quant": {"diag_shrink": 1.5}}
        )
    except ValueError as err:
        assert "diag_shrink" in str(err)
    else:
        raise AssertionError("diag_shrink 1.5 accepted")


def test_short_off_domain_text_is_refused_before_the_work(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("too short to score")
    cfg = tiny_dict(tmp_path)
    cfg["eval"] = {"windows": 2, "seq_len": 64, "off_domain": str(tmp_path / "short.txt")}
    msg = refused(tmp_path, cfg, capsys)
    assert "eval.off_domain" in msg and "short.txt" in msg


def _rows(ppl: float) -> dict:
    return {
        "fp16 (reference)": {"ppl": ppl, "ppl_increase": 0.0, "kld": 0.0, "top1": 1.0},
        "strata GPTQ": {"ppl": ppl * 1.1, "ppl_increase": 0.1, "kld": 0.1, "top1": 0.8},
    }


def test_printed_table_names_both_texts():
    report = {
        "run_id": "r",
        "quant": {"method": "gptq", "bits": 4, "group_size": 32},
        "workers": 1,
        "quality": {
            "text": "fixture:austen/persuasion",
            "windows": [2, 64],
            "rows": _rows(30.0),
            "off_domain": {"text": "fixture:kjv", "windows": [2, 64], "rows": _rows(5.0)},
        },
        "artifacts": {},
        "checks": [],
        "timings": {"quantize_s": 1.0},
        "store": "runs",
    }
    text = format_report(report)
    assert "held-out (in domain) perplexity: fixture:austen/persuasion" in text
    assert "held-out (off domain) perplexity: fixture:kjv" in text
    assert text.count("strata GPTQ  ") == 2  # the row in each table


def test_eval_results_carry_the_off_domain_rows_into_the_report():
    models = [
        {"name": "ref", "reference": True, "ppl": 30.0, "ppl_increase": 0.0, "bytes_on_disk": 10},
        {"name": "q", "reference": False, "ppl": 33.0, "ppl_increase": 0.1, "bytes_on_disk": 5},
    ]
    data = {
        "text": {"source": "fixture:austen/persuasion"},
        "windows": {"count": 2, "context": 64},
        "models": models,
        "off_domain": {
            "text": {"source": "fixture:kjv"},
            "windows": {"count": 2, "context": 64},
            "models": [
                {"name": "ref", "ppl": 5.0, "ppl_increase": 0.0},
                {"name": "q", "ppl": 6.0, "ppl_increase": 0.2},
            ],
        },
    }
    off = eval_to_report(data)["quality"]["off_domain"]
    assert off["text"] == "fixture:kjv" and off["rows"]["q"]["ppl"] == 6.0 and off["rows"]["q"]["bytes"] == 5


def test_offdomain_hessians_kept_between_invocations(tmp_path, tiny_model_path):
    """benchmarks/offdomain's Hessian cache: written once, read back equal; q/k/v and gate/up share
    one matrix; a second read does not run the model (its hooks would fail on a broken forward)."""
    from benchmarks import offdomain
    from strata_quant.pipeline.eval import load_reference

    model = load_reference(tiny_model_path)
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    kept = tmp_path / "h.safetensors"
    first = offdomain.cached_hessians(model, windows, kept)
    assert kept.is_file()
    names = offdomain.decoder_linears(model)
    assert set(first) == set(names) and any(n.endswith("k_proj") for n in names)
    k = next(n for n in names if n.endswith("k_proj"))
    assert torch.equal(first[k], first[k.replace("k_proj", "q_proj")])
    model.model.forward = None  # a recomputation would fail now
    again = offdomain.cached_hessians(model, windows, kept)
    assert all(torch.equal(first[n], again[n]) for n in names)
    h = first[k]
    assert torch.allclose(h, h.T) and (h.diagonal() > 0).all()


def test_offdomain_grid_fit_rows_solve_on_q4_0s_own_grid():
    """The "Q4_0 grid fit" variants: q/k/v stacked and solved by workers.ggml.gptq_ggml on Q4_0 with the shrunk H,
    each linear's rows its share of the stacked result; every other variant stays on the W4 g32 solver."""
    from benchmarks import offdomain
    from strata_quant.workers.ggml import gptq_ggml

    g = torch.Generator().manual_seed(3)
    w = {
        f"model.layers.0.self_attn.{p}_proj": torch.randn(n, 64, generator=g)
        for p, n in (("q", 64), ("k", 32), ("v", 32))
    }
    x = torch.randn(256, 64, generator=g)
    h = {"model.layers.0.self_attn.q_proj": 2 * x.T @ x / 256}
    variants = offdomain.variants(32, 8)
    opts = variants["Q4_0 grid fit + shrink α=0.3"][2]
    out = offdomain.solve_all(w, h, QuantSpec(4, 32, True), opts)
    whole = gptq_ggml(torch.cat(list(w.values())), h["model.layers.0.self_attn.q_proj"], "Q4_0", diag_shrink=0.3)
    assert torch.equal(torch.cat([out[n] for n in w]), whole.dequantize())
    assert all("ggml" not in v[2] for k, v in variants.items() if not k.startswith("Q4_0 grid fit"))
