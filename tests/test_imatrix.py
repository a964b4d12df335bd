"""`strata imatrix RUN`: the run's stored activation statistics as llama.cpp's importance matrix.

A tiny one-worker GPTQ run (float propagation); block 0's statistics equal Σ x² of its linears'
inputs recomputed here through the float model on the same calibration windows;
the GGUF file has llama-imatrix's keys and tensors (read back by gguf-py), the legacy .dat holds
the same means; a run without statistics is refused before anything is written; and, where
llama.cpp's tools are built (benchmarks/llamacpp_tools.sh), llama-quantize --imatrix accepts both.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from strata_quant.pipeline.cli import main
from strata_quant.pipeline.job import run_full_job
from tests.test_e2e import tiny_config

TOOLS = Path(os.environ.get("STRATA_LLAMACPP_DIR", Path.home() / ".cache/strata/llama.cpp")) / "bin"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_path, emma_path, ray_session):
    tmp = tmp_path_factory.mktemp("imatrix")
    # float propagation, all of a block's statistics from one pass: every input is the float model's,
    # which this test recomputes (true-sequential runs record o_proj / MLP inputs after the solved q/k/v)
    cfg = tiny_config(
        tmp,
        workers=1,
        quant={"true_sequential": False},
        run={"propagate": "float"},
        output={"dir": str(tmp / "out"), "formats": ["gguf"]},
    )
    report = run_full_job(cfg, progress=False)  # the run and its GGUF (llama-quantize's input below)
    return tmp, report["run_id"], cfg


def _block0_sums(model_path, cfg) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strata_quant.pipeline.calibration import calibration_windows, load_text, tokenize_stream

    tok = AutoTokenizer.from_pretrained(model_path)
    stream = tokenize_stream(tok, load_text(cfg.calibration.source))
    windows = calibration_windows(stream, cfg.calibration.num_samples, cfg.calibration.seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    mods = {"attn_q": layer.self_attn.q_proj, "attn_output": layer.self_attn.o_proj, "ffn_down": layer.mlp.down_proj}
    sums = {k: 0 for k in mods}

    def hook(k):
        def f(_m, inp):
            sums[k] = sums[k] + inp[0].double().reshape(-1, inp[0].shape[-1]).square().sum(0)

        return f

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in mods.items()]
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {k: v.numpy() for k, v in sums.items()}


def test_imatrix_gguf_holds_the_runs_input_statistics(tiny_run, tiny_model_path):
    from gguf import GGUFReader

    tmp, run_id, cfg = tiny_run
    out = tmp / "tiny.imatrix.gguf"
    assert main(["imatrix", run_id, "--store", str(tmp / "store"), "-o", str(out)]) == 0
    reader = GGUFReader(out)
    fields = {f.name: f for f in reader.fields.values()}
    assert "general.architecture" not in fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(fields["imatrix.chunk_count"].parts[-1][0]) == cfg.calibration.num_samples
    assert int(fields["imatrix.chunk_size"].parts[-1][0]) == cfg.calibration.seq_len
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 21  # 3 blocks × 7 linears, in_sum2 and counts each
    bases = sorted({n.rsplit(".", 1)[0] for n in tensors})  # llama-imatrix's order: by name, sums then counts
    assert list(tensors) == [f"{b}.{part}" for b in bases for part in ("in_sum2", "counts")]
    tokens = cfg.calibration.num_samples * cfg.calibration.seq_len
    expected = _block0_sums(tiny_model_path, cfg)
    for short, sums in expected.items():
        t = tensors[f"blk.0.{short}.weight.in_sum2"]
        assert [int(x) for x in t.shape] == [sums.size, 1]  # ggml order: ne0 = K, ne1 = matrices
        np.testing.assert_allclose(np.asarray(t.data).reshape(-1), sums, rtol=2e-4)
        assert float(np.asarray(tensors[f"blk.0.{short}.weight.counts"].data).reshape(-1)[0]) == tokens
    # q, k and v read one input: one statistic
    q = np.asarray(tensors["blk.1.attn_q.weight.in_sum2"].data)
    assert np.array_equal(q, np.asarray(tensors["blk.1.attn_v.weight.in_sum2"].data))


def test_imatrix_dat_holds_the_means(tiny_run):
    tmp, run_id, cfg = tiny_run
    gguf_out, dat_out = tmp / "a.imatrix.gguf", tmp / "a.imatrix.dat"
    assert main(["imatrix", run_id, "--store", str(tmp / "store"), "-o", str(gguf_out)]) == 0
    assert main(["imatrix", run_id, "--store", str(tmp / "store"), "-o", str(dat_out), "--dat"]) == 0
    from gguf import GGUFReader

    sums = {t.name: np.asarray(t.data).reshape(-1) for t in GGUFReader(gguf_out).tensors}
    raw = dat_out.read_bytes()
    (n,), at = struct.unpack_from("<i", raw), 4
    means = {}
    for _ in range(n):
        (length,) = struct.unpack_from("<i", raw, at)
        name = raw[at + 4 : at + 4 + length].decode()
        at += 4 + length
        ncall, nval = struct.unpack_from("<ii", raw, at)
        at += 8
        means[name] = np.frombuffer(raw, dtype="<f4", count=nval, offset=at) / ncall
        at += 4 * nval
    chunks, length = struct.unpack_from("<ii", raw, at)
    assert chunks == cfg.calibration.num_samples and raw[at + 8 :].decode() == cfg.calibration.source
    assert n == 21 and list(means) == sorted(means)
    for name, mean in means.items():
        np.testing.assert_allclose(mean, sums[f"{name}.in_sum2"] / sums[f"{name}.counts"][0], rtol=1e-6)


def test_run_without_statistics_is_refused(tiny_run, tmp_path, capsys):
    tmp, run_id, _ = tiny_run
    assert main(["imatrix", "no-such-run", "--store", str(tmp / "store"), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.skipif(not (TOOLS / "llama-quantize").exists(), reason="llama.cpp tools not built")
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_llama_quantize_accepts_the_imatrix(tiny_run, fmt):
    tmp, run_id, _ = tiny_run
    imatrix = tmp / f"q.imatrix.{fmt}"
    args = ["--dat"] if fmt == "dat" else []
    assert main(["imatrix", run_id, "--store", str(tmp / "store"), "-o", str(imatrix), *args]) == 0
    src = next((tmp / "out").rglob("*.gguf"))
    dst = tmp / f"requant-{fmt}.gguf"
    done = subprocess.run(
        [str(TOOLS / "llama-quantize"), "--allow-requantize", "--imatrix", str(imatrix), str(src), str(dst), "Q4_K_M"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded 21 importance matrix entries" in done.stdout + done.stderr
    assert dst.stat().st_size > 0
