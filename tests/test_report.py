"""The published report: HTML + markdown + PNG plots from a job report and its block records."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from strata_quant.pipeline import cli
from strata_quant.pipeline.report import (
    block_phase_times,
    build_report,
    compare_reports,
    errors_by_type,
    quality_rows,
)
from strata_quant.pipeline.store import LocalStore

LINEARS = [
    "mlp.down_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "self_attn.k_proj",
    "self_attn.o_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
]
SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576)}
SHAPES |= {"up": (1536, 576), "down": (576, 1536)}
PARAMS = 134_515_008
GGUF_BYTES = 105_470_000  # ≈ 6.27 bits per parameter
STRATA_ROW = "strata GPTQ W4 g64 (GGUF via transformers)"


def make_records(n_blocks: int = 3, ranks: int = 2) -> dict[int, dict]:
    rng = np.random.default_rng(0)
    records = {}
    for b in range(n_blocks):
        results = []
        for lin in LINEARS:
            t = lin.rsplit(".", 1)[1].removesuffix("_proj")
            results.append(
                {
                    "name": f"model.layers.{b}.{lin}",
                    "key": f"runs/r/blocks/{b:05d}/model.layers.{b}.{lin}.safetensors",
                    "shape": list(SHAPES[t]),
                    "bits": 4,
                    "group_size": 64,
                    "sym": True,
                    "bytes": 200_000,
                    "sha256": "0" * 64,
                    "weight_rel_error": float(0.015 + 0.005 * rng.random()),
                    "output_rel_error": float(0.002 + 0.006 * rng.random()),
                }
            )
        timings = {
            str(r): {
                "load": 0.1 + 0.01 * r,
                "stats": 2.0 + r,
                "reduce": 0.3,
                "solve": 1.0 + 0.5 * b,
                "broadcast": 0.2,
                "forward": 1.5,
            }
            for r in range(ranks)
        }
        records[b] = {"block": b, "complete": True, "results": results, "timings": timings, "wall_s": 6.0 + b}
    return records


def make_report(**over) -> dict:
    report = {
        "run_id": "smollm2-135m-gptq-w4g64-0123456789ab",
        "store": "/nonexistent-store",
        "model": "fixture:smollm2-135m",
        "params": PARAMS,
        "method": "gptq",
        "quant": {
            "method": "gptq",
            "bits": 4,
            "group_size": 64,
            "sym": True,
            "damp": 0.01,
            "block_size": 128,
            "act_order": False,
            "static_groups": True,
            "mse_grid": 0,
            "allow_partial_group": True,
        },
        "workers": 2,
        "artifacts": {
            "gptq": {"path": "/out/smollm2-gptq", "bytes": 112_000_000},
            "gguf": {"path": "/out/smollm2-Q4_0.gguf", "bytes": GGUF_BYTES},
        },
        "checks": [
            {"format": "gptq", "quantized_linears": 210, "bit_exact_linears": 210, "other_tensors": 62},
            {"format": "gguf", "reader": "transformers (gguf-py)", "bit_exact_linears": 210, "other_tensors": 62},
        ],
        "quality": {
            "text": "fixture:austen/persuasion",
            "windows": [32, 512],
            "rows": {
                "fp16 (reference)": {
                    "ppl": 15.4321,
                    "tokens": 16352,
                    "forward_s": 9.1,
                    "kld": 0.0,
                    "kld_p99": 0.0,
                    "top1": 1.0,
                    "ppl_increase": 0.0,
                },
                "RTN W4 g64": {
                    "ppl": 17.8912,
                    "tokens": 16352,
                    "forward_s": 9.3,
                    "kld": 0.08123,
                    "kld_p99": 0.61,
                    "top1": 0.8412,
                    "ppl_increase": 0.15934,
                },
                STRATA_ROW: {
                    "ppl": 16.2341,
                    "tokens": 16352,
                    "forward_s": 9.8,
                    "kld": 0.04567,
                    "kld_p99": 0.33,
                    "top1": 0.8876,
                    "ppl_increase": 0.05199,
                },
            },
        },
        "timings": {"quantize_s": 251.3, "assemble_s": 3.2, "verify_s": 20.5, "eval_s": 60.1, "total_s": 335.1},
        "phase_s": {"load": 1.0, "stats": 70.0, "reduce": 9.0, "solve": 40.0, "broadcast": 5.0, "forward": 50.0},
        "solved_blocks": 3,
        "replayed_blocks": 0,
    }
    report.update(over)
    return report


def png_pixels(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(str(path))


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the first markdown table."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report(make_report(), make_records(), out)


def test_build_report_writes_every_file(built):
    assert set(built) == {"html", "markdown", "block_error", "ppl_vs_bits", "block_time"}
    for path in built.values():
        assert path.is_file() and path.stat().st_size > 500
    for key in ("block_error", "ppl_vs_bits", "block_time"):
        px = png_pixels(built[key])
        h, w = px.shape[:2]
        assert 1000 <= w <= 1600 and 500 <= h <= 1200, (key, w, h)  # 8 in wide at 150 dpi
        assert px[..., :3].std() > 0.05, f"{key} is blank"


def test_markdown_quality_table(built):
    md = built["markdown"].read_text()
    assert md.startswith("# strata GPTQ W4 g64 — fixture:smollm2-135m\n")
    rows = {r[0]: r for r in table_rows(md)}
    assert list(rows) == ["fp16 (reference)", "RTN W4 g64", STRATA_ROW]
    bpw = f"{GGUF_BYTES * 8 / PARAMS:.2f}"
    # model, bpw, size, ppl, Δ ppl, KLD, KLD p99, top-1, quantize time
    assert rows["fp16 (reference)"] == ["fp16 (reference)", "16.00", "269.0 MB", "15.432", "—", "—", "—", "—", "—"]
    assert rows["RTN W4 g64"] == ["RTN W4 g64", bpw, "105.5 MB", "17.891", "+15.93%", "0.0812", "0.6100", "84.1%", "—"]
    assert rows[STRATA_ROW] == [STRATA_ROW, bpw, "105.5 MB", "16.234", "+5.20%", "0.0457", "0.3300", "88.8%", "4.2 min"]
    assert "- **Parameters:** 134.5 M" in md
    assert "- **gguf** `smollm2-Q4_0.gguf` — 105.5 MB" in md
    assert "- gptq: 210/210 quantized linears bit-exact against the run record; 62 other tensors checked" in md
    for key in ("block_error", "ppl_vs_bits", "block_time"):
        assert f"]({built[key].name})" in md  # relative links, next to the markdown


def test_html_is_self_contained(built):
    page = built["html"].read_text()
    assert "<link" not in page and "http://" not in page and "https://" not in page
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert base64.b64decode(srcs[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert '<tr class="ours">' in page and "&lt;" not in STRATA_ROW


def test_a_mix_solved_in_the_run_is_named_by_its_mix(tmp_path):
    """A K mix solved in the run gives each linear its own type: the unused bits / group size never name it."""
    from strata_quant.pipeline.report import method_label

    quant = make_report()["quant"]
    assert method_label(quant) == "strata GPTQ W4 g64"
    assert method_label(quant, "Q4_K_M") == "strata GPTQ Q4_K_M"
    assert method_label({**quant, "method": "nf4"}) == "strata NF4+DQ b64"
    files = build_report(make_report(solved_mix="Q4_K_M"), make_records(), tmp_path)
    assert files["markdown"].read_text().startswith("# strata GPTQ Q4_K_M — fixture:smollm2-135m\n")


def test_nominal_bits_without_parameter_count():
    report = make_report()
    del report["params"]
    rows = {r["name"]: r for r in quality_rows(report)}
    assert rows["RTN W4 g64"]["bpw"] == pytest.approx(4.25) and rows["RTN W4 g64"]["bpw_source"] == "nominal"
    assert rows[STRATA_ROW]["bpw"] == pytest.approx(4.25)
    assert rows["fp16 (reference)"]["bpw"] == 16 and rows["fp16 (reference)"]["bytes"] is None


def test_plot_inputs_follow_the_records():
    records = make_records(n_blocks=3, ranks=2)
    by_type = errors_by_type(records)
    assert list(by_type) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert sorted(by_type["down"]["output_rel_error"]) == [0, 1, 2]
    blocks, phases = block_phase_times(records)
    assert blocks == [0, 1, 2] and list(phases) == ["load", "stats", "reduce", "solve", "broadcast", "forward"]
    assert phases["stats"] == [3.0, 3.0, 3.0]  # the slower rank
    assert phases["solve"] == [1.0, 1.5, 2.0]


def test_compare_reports(tmp_path):
    w8 = make_report(run_id="smollm2-135m-gptq-w8g128-fedcba987654")
    w8["quant"] = dict(w8["quant"], bits=8, group_size=128)
    w8["artifacts"] = {"gguf": {"path": "/out/smollm2-Q8_0.gguf", "bytes": 150_000_000}}
    rows = w8["quality"]["rows"]
    rows["RTN W8 g128"] = dict(rows.pop("RTN W4 g64"), ppl=15.51, ppl_increase=0.0051)
    rows["strata GPTQ W8 g128 (GGUF via transformers)"] = dict(rows.pop(STRATA_ROW), ppl=15.47, ppl_increase=0.0025)
    files = compare_reports([make_report(), w8], tmp_path)
    body = table_rows(files["markdown"].read_text())
    names = [r[1] for r in body]
    assert names.count("fp16 (reference)") == 1  # the same reference, measured twice, listed once
    assert names == [
        "fp16 (reference)",
        "RTN W4 g64",
        STRATA_ROW,
        "RTN W8 g128",
        "strata GPTQ W8 g128 (GGUF via transformers)",
    ]
    assert body[-1][0] == "smollm2-135m-gptq-w8g128-fedcba987654" and body[-1][2] == f"{150e6 * 8 / PARAMS:.2f}"
    assert png_pixels(files["ppl_vs_bits"])[..., :3].std() > 0.05
    assert files["html"].read_text().count("data:image/png;base64,") == 1


def test_cli_report_and_compare(tmp_path, capsys):
    store = LocalStore(tmp_path / "store")
    report = make_report(store=str(store.root))
    for b, record in make_records().items():
        store.put_json(f"runs/{report['run_id']}/blocks/{b:05d}/record.json", record)
    path = tmp_path / "out" / "smollm2-report.json"
    path.parent.mkdir()
    path.write_text(json.dumps(report))
    assert cli.main(["report", str(path)]) == 0
    out_dir = tmp_path / "out" / "smollm2-report"
    assert {p.name for p in out_dir.iterdir()} == {
        "report.html",
        "report.md",
        "block_error.png",
        "ppl_vs_bits.png",
        "block_time.png",
    }
    assert cli.main(["report", str(path), "--store", str(store.root), "--out", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "report.html").is_file()
    other = tmp_path / "other.json"
    other.write_text(json.dumps(copy.deepcopy(report) | {"run_id": "second"}))
    assert cli.main(["compare", str(path), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert "compare.html" in capsys.readouterr().out
    assert len(table_rows((tmp_path / "cmp" / "compare.md").read_text())) == 4  # fp16, RTN, strata × 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(built, tmp_path):
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = built["html"].resolve().as_uri()
    shot = tmp_path / "shot.png"
    subprocess.run(
        flags + [f"--screenshot={shot}", "--window-size=1200,1600", url], check=True, capture_output=True, timeout=120
    )
    px = png_pixels(shot)[..., :3]
    assert px.shape[:2] == (1600, 1200)
    assert px.std() > 0.05, "the screenshot is blank"
    dom = subprocess.run(flags + ["--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout
    assert "<table>" in dom and STRATA_ROW in dom and "+5.20%" in dom and "88.8%" in dom
    assert dom.count("data:image/png;base64,") == 3
