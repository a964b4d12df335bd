"""Mixture-of-Experts in the output formats, read back by the real readers.

Tiny random Mixtral and Qwen3-MoE (transformers' config classes, SmolLM2's tokenizer), every expert quantized by
GPTQ on the tokens its own router sends it (tests/moe_results.py), stored as the run stores results and
assembled by the real assemblers:

* GGUF: llama.cpp's stacked experts (``ffn_{gate,up,down}_exps``, router ``ffn_gate_inp`` F32, expert keys);
  every expert's rows in the stack dequantize (gguf-py) bit for bit to its result; llama.cpp against the dense
  model carrying the dequantized results; transformers (``gguf_file=``) against both where it reads the arch.
* compressed-tensors: per-expert linears under the checkpoint's names; transformers loads them into the fused
  experts and its logits are the dense model's.
* GPTQ / AWQ: per-expert linears under GPTQModel's names; GPTQModel 7.6 (its own venv) loads them.
* Plan-time refusals: a family a format's readers do not take, routing llama.cpp does not compute, a stack
  whose expert count is not the config's.

Numbers are printed (run with -s). The SmolLM2 MoE fixtures run in the tests marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from strata_quant.pipeline.assemble import assemble_awq, assemble_compressed_tensors, assemble_gguf, assemble_gptq
from strata_quant.pipeline.checkpoint import CheckpointReader
from strata_quant.pipeline.config import ConfigError
from strata_quant.pipeline.formats import moe as moe_format
from strata_quant.pipeline.formats.gguf import GGUFError, check_gguf, read_metadata
from strata_quant.pipeline.verify import (
    compare_logits,
    llamacpp_logits,
    load_llamacpp,
    verify_awq,
    verify_compressed_tensors,
    verify_gguf,
    verify_gptq,
)
from strata_quant.workers.result import QuantSpec
from tests.moe_results import dense_moe, moe_results, tiny_moe, tiny_moe_config

REPO = Path(__file__).resolve().parent.parent
GPTQMODEL_PYTHON = REPO / ".venv-gptqmodel" / "bin" / "python"
N_TOKENS = 96
SPEC = QuantSpec(4, 32, True)
FAMILIES = ["mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def ids(tokenizer) -> list[int]:
    from strata_quant.pipeline.calibration import load_text

    return tokenizer.encode(load_text("fixture:austen/persuasion")[20000:30000], add_special_tokens=False)[:N_TOKENS]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tokenizer, ids, tmp_path_factory):
    """(family, reader, stored results, {linear: result}, dense logits on ``ids``, folder)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    folder = tiny_moe(family, tokenizer, root / "model")
    reader = CheckpointReader(folder)
    calib = torch.randint(0, len(tokenizer), (1, 256), generator=torch.Generator().manual_seed(0))
    source, results = moe_results(reader, root / "store", SPEC, calib)
    with torch.no_grad():
        want = dense_moe(folder, results)(input_ids=torch.tensor([ids])).logits[0]
    return family, reader, source, results, want, root


def _experts(results: dict) -> list[str]:
    return [n for n in results if ".experts." in n]


# ------------------------------------------------------------------------------------------------ GGUF


def _gguf_tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(path).tensors}


def test_moe_gguf_in_llamacpp_and_transformers(built, ids) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers import AutoConfig, AutoModelForCausalLM

    family, reader, source, results, want, root = built
    path = assemble_gguf(reader, source, root / "moe.gguf", tokenizer_pre="smollm", name="tiny")
    summary, _ = verify_gguf(path, reader, source)  # each expert's rows of its stack, by gguf-py
    assert summary["bit_exact_linears"] == summary["quantized_linears"] == len(results), summary
    tensors = _gguf_tensors(path)
    arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[family]
    meta = read_metadata(path, prefix=f"{arch}.")
    assert meta[f"{arch}.expert_count"] == 4 and meta[f"{arch}.expert_used_count"] == 2
    assert (f"{arch}.expert_feed_forward_length" in meta) is (family == "qwen3_moe")
    inter = 64 if family == "mixtral" else 32
    for b in range(2):
        assert tensors[f"blk.{b}.ffn_gate_inp.weight"].tensor_type == GGMLQuantizationType.F32
        for part, shape in (("gate", [64, inter, 4]), ("up", [64, inter, 4]), ("down", [inter, 64, 4])):
            t = tensors[f"blk.{b}.ffn_{part}_exps.weight"]
            assert t.tensor_type == GGMLQuantizationType.Q4_0 and t.shape.tolist() == shape
    assert not any(".experts." in n or "_exps.0" in n for n in tensors)
    # every expert's rows of its stack: the solver's result, bit for bit (gguf-py's own dequantizer)
    parts = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    experts = _experts(results)
    assert len(experts) == 2 * 4 * 3
    for linear in experts:
        b, e, leaf = int(linear.split(".")[2]), int(linear.split(".")[-2]), linear.split(".")[-1]
        stack = dequantize(tensors[f"blk.{b}.ffn_{parts[leaf]}_exps.weight"].data, GGMLQuantizationType.Q4_0)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(stack[e])), results[linear].dequantize()), linear

    llm = load_llamacpp(path, n_ctx=len(ids))
    cpp = llamacpp_logits(llm, ids)
    del llm
    cpp_dense = compare_logits(cpp, want)
    line = f"\n{family} GGUF (Q4_0, {len(experts)} expert linears): llama.cpp vs dense {cpp_dense}"
    # the llama.cpp criterion of pipeline.verify.check_llamacpp: a top-1 flip only at a near tie
    # against the float dense model the difference holds Q4_0's rounding too: flips need not be near ties there
    assert cpp_dense["mean_abs_diff"] <= 0.1 * cpp_dense["logit_std"], cpp_dense
    assert cpp_dense["top1_agreement"] >= 0.9, cpp_dense
    assert cpp_dense["mean_abs_diff"] <= 0.01 * cpp_dense["logit_std"], cpp_dense
    if family == "qwen3_moe":
        # transformers' GGUF loader reads no expert width (expert_feed_forward_length): given the model's config,
        # it reads every tensor of the file, and computes the dense model exactly
        config = AutoConfig.from_pretrained(reader.path)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32)
        with torch.no_grad():
            got = hf.eval()(input_ids=torch.tensor([ids])).logits[0]
        hf_dense, cpp_hf = compare_logits(got, want), compare_logits(cpp, got)
        line += (
            f"; transformers(GGUF) vs dense max |Δ| {hf_dense['max_abs_diff']:.3g}; llama.cpp vs transformers {cpp_hf}"
        )
        assert hf_dense["max_abs_diff"] <= 1e-4 * hf_dense["logit_std"], hf_dense
        assert max(cpp_hf["mean_abs_diff"], cpp_hf["top1_flip_margin"]) <= 0.1 * cpp_hf["logit_std"], cpp_hf
    print(line)


def test_moe_gguf_asymmetric_experts_carry_exactly_as_q5_0(built, tmp_path: Path) -> None:
    """Asymmetric 4-bit experts: Q5_0 stacks (q − z + 16), each expert's rows its result bit for bit; Q8_0 too."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    family, reader, _source, _results, _want, _root = built
    calib = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(1))
    source, results = moe_results(reader, tmp_path / "store", QuantSpec(4, 32, False), calib)
    for gguf_type, qtype in (("auto", GGMLQuantizationType.Q5_0), ("Q8_0", GGMLQuantizationType.Q8_0)):
        path = assemble_gguf(reader, source, tmp_path / f"{gguf_type}.gguf", gguf_type=gguf_type)
        tensors = _gguf_tensors(path)
        for linear in _experts(results)[:6]:
            b, e = int(linear.split(".")[2]), int(linear.split(".")[-2])
            leaf = linear.split(".")[-1]
            part = {"w1": "gate", "w3": "up", "w2": "down"}.get(leaf, leaf.removesuffix("_proj"))
            t = tensors[f"blk.{b}.ffn_{part}_exps.weight"]
            assert t.tensor_type == qtype
            got = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, qtype)[e]))
            assert torch.equal(got, results[linear].dequantize()), (gguf_type, linear)


def test_moe_f16_gguf_of_the_results_is_the_dense_model_in_llamacpp(built, ids, tmp_path: Path) -> None:
    """benchmarks.gguf_agreement's F16 file of a MoE (the assembler's plan, every stack F16): each expert's rows
    are its result, and llama.cpp on it computes the dense model up to fp16 activations, where the Q4_0 file of
    the same results differs by its 8-bit activations (the reason the agreement figures give)."""
    from gguf import GGMLQuantizationType

    from benchmarks.gguf_agreement import write_f16_gguf

    family, reader, source, results, want, root = built
    path = write_f16_gguf(reader, source, tmp_path / "f16.gguf", "smollm")
    tensors = _gguf_tensors(path)
    parts = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    for linear in _experts(results):
        b, e, leaf = int(linear.split(".")[2]), int(linear.split(".")[-2]), linear.split(".")[-1]
        t = tensors[f"blk.{b}.ffn_{parts[leaf]}_exps.weight"]
        assert t.tensor_type == GGMLQuantizationType.F16
        got = torch.from_numpy(np.array(t.data[e])).float()
        assert torch.equal(got, results[linear].dequantize().half().float()), linear
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == GGMLQuantizationType.F32
    llm = load_llamacpp(path, n_ctx=len(ids))
    f16 = compare_logits(llamacpp_logits(llm, ids), want)
    del llm
    print(f"\n{family} F16 GGUF of the results: llama.cpp vs dense {f16}")
    assert f16["mean_abs_diff"] <= 0.005 * f16["logit_std"], f16
    assert f16["top1_flip_margin"] <= 0.01 * f16["logit_std"], f16


# ------------------------------------------------------------------------------------------------ compressed-tensors


def test_moe_compressed_tensors_in_transformers(built, ids) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    family, reader, source, results, want, root = built
    out = assemble_compressed_tensors(reader, source, root / "ct")
    assert verify_compressed_tensors(out, reader, source)["bit_exact_linears"] == len(results)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for linear in _experts(results):  # per expert, under the checkpoint's own names (what vLLM reads)
        assert {f"{linear}.weight_packed", f"{linear}.weight_scale"} <= names, linear
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    routers = [n.removesuffix(".weight") for n in reader.tensor_names if n.endswith(".gate.weight")]
    assert len(routers) == 2 and set(routers) <= set(qcfg["ignore"])  # routers stay 16-bit
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0]
    stats = compare_logits(got, want)
    print(f"\n{family} compressed-tensors in transformers vs dense: {stats}")
    # the experts decompress to the solver's weights in fp16: the dense fp32 model up to that rounding
    assert stats["max_abs_diff"] <= 2e-3 * stats["logit_std"] and stats["top1_agreement"] == 1.0, stats
    experts = model.model.layers[1].mlp.experts
    linear = next(n for n in _experts(results) if n.startswith("model.layers.1.") and ".experts.2." in n)
    e_rows = results[linear].dequantize().half()
    fused = experts.down_proj[2] if linear.endswith(("w2", "down_proj")) else experts.gate_up_proj[2]
    assert any(torch.equal(fused[i : i + e_rows.shape[0]].half(), e_rows) for i in (0, e_rows.shape[0]))


# ------------------------------------------------------------------------------------------------ GPTQ / AWQ


def test_moe_gptq_names_experts_as_gptqmodel_reads_them(built) -> None:
    from safetensors import safe_open

    family, reader, source, results, _want, root = built
    out = assemble_gptq(reader, source, root / "gptq-names")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for b in range(2):
        for e in range(4):
            for part in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{b}.mlp.experts.{e}.{part}.qweight" in names
        assert f"model.layers.{b}.mlp.gate.weight" in names  # the router, 16-bit, under its transformers name
    assert not any("block_sparse_moe" in n or ".w1." in n for n in names)
    assert sum(n.endswith(".qweight") for n in names) == len(results)
    # read back under the checkpoint's names: every linear decodes to its result, every other tensor as stored
    summary = verify_gptq(out, reader, source)
    assert summary["bit_exact_linears"] == len(results) and summary["other_tensors"] > 0, summary


@pytest.mark.skipif(
    not GPTQMODEL_PYTHON.is_file(),
    reason="GPTQModel reader check needs .venv-gptqmodel (python -m venv .venv-gptqmodel; "
    ".venv-gptqmodel/bin/pip install torch==2.13.0 gptqmodel==7.6.0); NOT a pass",
)
def test_moe_gptq_and_awq_load_in_gptqmodel(built, ids, tmp_path: Path) -> None:
    """GPTQModel 7.6 on CPU loads the GPTQ and AWQ files: every quantized module (experts included) is the
    solver's weight rounded to fp16, and the logits are the dense model's."""
    from safetensors.torch import save_file

    family, reader, source, results, want, root = built
    names = moe_format.defused_names(reader)
    ref = tmp_path / "ref.safetensors"
    tensors = {"input_ids": torch.tensor([ids]), "logits": want[None].contiguous()}
    tensors.update({f"weight:{names.get(n, n)}": r.dequantize() for n, r in results.items()})
    save_file(tensors, ref)
    gptq = assemble_gptq(reader, source, root / "gptq")
    awq = assemble_awq(reader, source, root / "awq")
    assert verify_awq(awq, reader, source)["bit_exact_linears"] == len(results)
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", PYTHONPATH="", STRATA_GPTQMODEL_BACKENDS="torch")
    proc = subprocess.run(
        [
            str(GPTQMODEL_PYTHON),
            str(REPO / "tests" / "readers" / "gptqmodel_check.py"),
            f"{gptq}={ref}",
            f"{awq}={ref}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(f"\n{family}: " + "\n".join(json.dumps(out) for out in lines), file=sys.stderr)
    assert len(lines) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    for out in lines:
        assert "error" not in out, out
        assert out["quantized_linears"] == len(results) == out["weights_equal_fp16_of_reference"], out
        assert out["logits_max_abs_diff"] < 2e-3, out


# ------------------------------------------------------------------------------------------------ refusals


def _config(family: str, **extra) -> dict:
    config = tiny_moe_config(family, 320, **extra).to_dict()
    config["architectures"] = [{"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[family]]
    return config


def _deepseek_v3() -> dict:
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(hidden_size=64, num_hidden_layers=2, n_routed_experts=8, vocab_size=320).to_dict()
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    return config


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_safetensors_formats_name_their_moe_reader_or_refuse(fmt: str) -> None:
    for family in FAMILIES:
        assert moe_format.check_moe_format(fmt, _config(family))
    assert moe_format.check_moe_format(fmt, {"model_type": "llama", "num_hidden_layers": 2}) is None  # dense
    with pytest.raises(ConfigError, match=f"{fmt} output: no reader loads a {fmt} Mixture-of-Experts 'deepseek_v3'"):
        moe_format.check_moe_format(fmt, _deepseek_v3())


@pytest.mark.parametrize(
    "config,match",
    [
        (_deepseek_v3(), r"no GGUF layout for architecture \['DeepseekV3ForCausalLM'\]"),
        (_config("qwen3_moe", norm_topk_prob=False), "norm_topk_prob=False: llama.cpp's MoE architecture assumes True"),
        (_config("qwen3_moe", mlp_only_layers=[0]), r"mlp_only_layers=\[0\]"),
        (_config("qwen3_moe", decoder_sparse_step=2), "decoder_sparse_step=2"),
    ],
)
def test_check_gguf_refuses_moe_llamacpp_does_not_compute(config: dict, match: str) -> None:
    with pytest.raises(GGUFError, match=match):
        check_gguf(config)


def test_check_gguf_refuses_a_stack_short_of_an_expert(built) -> None:
    family, reader, *_ = built
    names = list(reader.tensor_names)
    layout = check_gguf(reader.config, names)
    assert layout.name(next(n for n in names if ".experts.3." in n)).startswith("blk.")
    # expert 3 gone from every linear of block 1: the stacks hold 3 experts, the config says 4
    short = [n for n in names if not (n.startswith("model.layers.1.") and ".experts.3." in n)]
    with pytest.raises(GGUFError, match="ffn_.*_exps.weight: the checkpoint has 3 experts, the config 4"):
        check_gguf(reader.config, short)
    # expert 1 gone: the experts are not 0 … E − 1
    holed = [n for n in names if not (n.startswith("model.layers.0.") and ".experts.1." in n)]
    with pytest.raises(GGUFError, match=r"experts are \[0, 2, 3\]"):
        check_gguf(reader.config, holed)


def test_preflight_checks_moe_formats(built) -> None:
    """preflight.check_moe_formats: each output format of the job says whether it holds this MoE family."""
    from types import SimpleNamespace

    from strata_quant.pipeline.preflight import check_moe_formats

    _family, reader, *_ = built
    cfg = SimpleNamespace(output=SimpleNamespace(formats=["gptq", "compressed-tensors", "gguf"]))
    line = check_moe_formats(cfg, reader.config)
    assert "gptq: GPTQModel" in line and "compressed-tensors: transformers" in line and "gguf: llama.cpp" in line
    with pytest.raises(ConfigError, match="deepseek_v3"):
        check_moe_formats(cfg, _deepseek_v3())
    assert check_moe_formats(cfg, {"model_type": "llama"}) is None


# ------------------------------------------------------------------------------------------------ SmolLM2 MoE fixtures

SLOW_SPEC = QuantSpec(4, 64, True)  # GPTQ W4 g64: Q4_0 in GGUF, carried exactly
EVAL_WINDOWS, EVAL_LEN = 4, 128


RUN_FIXTURE = "smollm2-mixtral"  # the one fixture also quantized by `strata run` (W=1 and W=2)


def _persuasion(tokenizer) -> tuple[str, list[int]]:
    from strata_quant.pipeline.calibration import load_text

    text = load_text("fixture:austen/persuasion")
    return text, tokenizer.encode(text, add_special_tokens=False)


def _eval_windows(ids: list[int]) -> torch.Tensor:
    held_out = len(ids) // 2  # eval windows from the second half of the novel, away from the calibration
    return torch.tensor(ids[held_out : held_out + EVAL_WINDOWS * EVAL_LEN]).reshape(EVAL_WINDOWS, EVAL_LEN)


@pytest.fixture(scope="module")
def smollm2_run(tokenizer, tmp_path_factory, ray_session):
    """The Mixtral fixture through `strata run` (GPTQ W4 g64, propagate quantized) with one worker and with two,
    on the same batches (4 windows of 256 tokens of Persuasion's first half, two per batch): {workers: (outcome,
    {linear: entry})}, and the root the runs wrote under."""
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.moe_fixtures import smollm2_moe
    from strata_quant.pipeline.run import recorded_entries, run_job

    root = tmp_path_factory.mktemp("smollm2-run")
    text, _ = _persuasion(tokenizer)
    calib = root / "persuasion-first-half.txt"  # the eval windows are in the second half
    calib.write_text(text[: len(text) // 2])
    runs = {}
    for workers in (1, 2):
        cfg = {
            "name": f"{RUN_FIXTURE}-w{workers}",
            "model": str(smollm2_moe(RUN_FIXTURE)),
            "calibration": {"source": str(calib), "num_samples": 4, "seq_len": 256},
            "quant": {"method": "gptq", "bits": 4, "group_size": 64, "true_sequential": False},
            # one torch thread per worker in both runs: under the default (cores ÷ W: 2 threads against 1) the
            # runs differed first at block 0's expert 7 down (8 routed tokens, a near-singular Hessian), then in
            # every later block; the thread count was the one setting the two runs did not share
            "run": {
                "workers": workers,
                "batch_size": 2,
                "store": str(root / f"w{workers}"),
                "propagate": "quantized",
                "threads_per_worker": 1,
            },
            "output": {"dir": str(root / "out"), "formats": []},
            "eval": None,
        }
        outcome = run_job(parse_config(cfg), progress=False)
        runs[workers] = outcome, recorded_entries(outcome.store, outcome.run_id)[1]
    return runs, root


def _run_built(smollm2_run):
    """fixture_built's tuple from the W=2 run's stored results (the tokens each expert's router sent it)."""
    from strata_quant.pipeline.assemble import ResultSource
    from strata_quant.workers.records import result_from_bytes

    runs, root = smollm2_run
    outcome, entries = runs[2]
    source = ResultSource(outcome.store, {0: {"results": list(entries.values())}})
    results = {n: result_from_bytes(outcome.store.get_bytes(e["key"])) for n, e in entries.items()}
    return source, results, root / "formats"


@pytest.fixture(scope="module", params=["smollm2-mixtral", "smollm2-qwen3-moe", f"{RUN_FIXTURE}@run-w2"])
def fixture_built(request, tokenizer, tmp_path_factory):
    """(fixture, reader, stored results, {linear: result}, eval windows [W, T], dense logits [W, T, V], root):
    every expert by GPTQ W4 g64 on the Persuasion tokens its router sends it (an expert with no token: RTN), by
    the reference solver or, for the run's parameter, by `strata run` with two workers."""
    from strata_quant.pipeline.moe_fixtures import smollm2_moe

    name = request.param.split("@")[0]
    reader = CheckpointReader(smollm2_moe(name))
    _, ids = _persuasion(tokenizer)
    windows = _eval_windows(ids)
    if request.param.endswith("@run-w2"):
        source, results, root = _run_built(request.getfixturevalue("smollm2_run"))
        root.mkdir()
    else:
        root = tmp_path_factory.mktemp(name)
        calib = torch.tensor(ids[: 4 * 256]).reshape(4, 256)
        source, results = moe_results(reader, root / "store", SLOW_SPEC, calib)
    with torch.no_grad():
        dense = dense_moe(reader.path, results)
        want = torch.stack([dense(input_ids=w[None]).logits[0] for w in windows])
    del dense
    return name, reader, source, results, windows, want, root


@pytest.mark.slow
def test_smollm2_moe_run_two_workers_give_the_one_worker_bytes(smollm2_run, tmp_path: Path) -> None:
    """The Mixtral fixture through `strata run`: W=2 stores W=1's bytes for every linear, and the block records
    hold every expert's routed token count (top-2 of every calibration token) and its decision, as the report
    plots them."""
    from strata_quant.pipeline.report import expert_summary, plot_expert_tokens

    runs, _ = smollm2_run
    (one, w1), (two, w2) = runs[1], runs[2]
    experts = [n for n in w2 if ".experts." in n]
    assert set(w1) == set(w2) and len(experts) == 30 * 8 * 3 and len(w2) == 30 * (4 + 8 * 3)
    for name, entry in w1.items():
        assert entry["sha256"] == w2[name]["sha256"], name
        assert entry.get("expert") == w2[name].get("expert"), name
    per_block: dict[str, dict[int, int]] = {}
    for name in experts:
        info = w2[name]["expert"]
        per_block.setdefault(name.split(".")[2], {})[info["index"]] = info["tokens"]
        # quant.moe defaults: min_tokens 1, policy rtn (an expert the router never picked is rounded)
        assert info["decision"] == ("routed" if info["tokens"] >= 1 else "rtn"), (name, info)
    assert all(sum(t.values()) == 2 * 4 * 256 for t in per_block.values()), per_block
    summary = expert_summary(two.records)
    assert summary == expert_summary(one.records)
    print(f"\n{RUN_FIXTURE} run W=2: {summary}; block 0 tokens per expert {per_block['0']}")
    starved = sum(t == 0 for tokens in per_block.values() for t in tokens.values())
    assert summary["modules"] == 30 and summary["experts_per_module"] == 8
    assert summary["decisions"] == {"routed": 240 - starved, **({"rtn": starved} if starved else {})}, summary
    # the seeded router is uneven: the least-routed expert sees far fewer tokens than the most-routed one
    assert summary["tokens_min"] * 4 < summary["tokens_max"], summary
    assert plot_expert_tokens(two.records, tmp_path / "tokens.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_smollm2_moe_gguf_in_llamacpp_and_transformers(fixture_built) -> None:
    """The GGUF of a SmolLM2 MoE fixture: every expert's rows bit for bit (gguf-py); llama.cpp's top-1 against
    transformers on the same GGUF (Qwen3-MoE) and against the dense model over Persuasion eval windows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name, reader, source, results, windows, want, root = fixture_built
    path = assemble_gguf(reader, source, root / f"{name}.gguf", tokenizer_pre="smollm", name=name)
    summary, _ = verify_gguf(path, reader, source)
    assert summary["bit_exact_linears"] == summary["quantized_linears"] == len(results), summary
    llm = load_llamacpp(path, n_ctx=EVAL_LEN)
    cpp = torch.stack([llamacpp_logits(llm, w.tolist()) for w in windows])
    del llm
    cpp_dense = compare_logits(cpp.flatten(0, 1), want.flatten(0, 1))
    line = (
        f"\n{name} GGUF Q4_0 ({len(results)} linears), {EVAL_WINDOWS}×{EVAL_LEN} tokens: llama.cpp vs dense {cpp_dense}"
    )
    if name == "smollm2-qwen3-moe":  # transformers reads the GGUF given the model's config (no expert width key)
        hf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=AutoConfig.from_pretrained(reader.path), dtype=torch.float32
        ).eval()
        with torch.no_grad():
            got = torch.stack([hf(input_ids=w[None]).logits[0] for w in windows])
        del hf
        cpp_hf, hf_dense = (
            compare_logits(cpp.flatten(0, 1), got.flatten(0, 1)),
            compare_logits(got.flatten(0, 1), want.flatten(0, 1)),
        )
        line += f"; llama.cpp vs transformers(GGUF) {cpp_hf}; transformers(GGUF) vs dense max |Δ| {hf_dense['max_abs_diff']}"
        assert hf_dense["max_abs_diff"] <= 1e-3 * hf_dense["logit_std"], hf_dense
    print(line)
    # against the float dense model the difference holds Q4_0's rounding too: flips need not be near ties there
    assert cpp_dense["mean_abs_diff"] <= 0.1 * cpp_dense["logit_std"], cpp_dense
    assert cpp_dense["top1_agreement"] >= 0.9, cpp_dense
    # every assertion above holds first; then the two readers of one file, held to the near-tie rule
    if name == "smollm2-qwen3-moe" and not (
        cpp_hf["top1_agreement"] >= 0.99 or cpp_hf["top1_flip_margin"] <= 0.1 * cpp_hf["logit_std"]
    ):
        # measured on a 2-core AMD EPYC: top-1 92 %, flip margin 0.19 std, mean |Δ| 0.06 std on the same file;
        # llama.cpp's 8-bit input rounding may flip the router's top-2 choice; not yet explained, not a pass
        pytest.xfail(f"llama.cpp and transformers disagree on one Qwen3-MoE GGUF beyond near ties: {cpp_hf}")


@pytest.mark.slow
def test_smollm2_moe_compressed_tensors_in_transformers(fixture_built) -> None:
    from transformers import AutoModelForCausalLM

    name, reader, source, results, windows, want, root = fixture_built
    out = assemble_compressed_tensors(reader, source, root / "ct")
    assert verify_compressed_tensors(out, reader, source)["bit_exact_linears"] == len(results)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = torch.stack([model(input_ids=w[None]).logits[0] for w in windows])
    del model
    stats = compare_logits(got.flatten(0, 1), want.flatten(0, 1))
    print(f"\n{name} compressed-tensors in transformers vs dense: {stats}")
    # fp16 experts (decompressed) against the fp32 dense model: far below one quantization step
    assert stats["mean_abs_diff"] <= 0.01 * stats["logit_std"], stats
    assert max(stats["mean_abs_diff"], stats["top1_flip_margin"]) <= 0.1 * stats["logit_std"], stats


@pytest.mark.slow
@pytest.mark.skipif(not GPTQMODEL_PYTHON.is_file(), reason="GPTQModel reader check needs .venv-gptqmodel; NOT a pass")
def test_smollm2_moe_gptq_in_gptqmodel(fixture_built, tmp_path: Path) -> None:
    """GPTQModel 7.6 loads the fixture's GPTQ: the first and last blocks' modules (experts included) are the
    solver's weights rounded to fp16; logits on one eval window against the dense model."""
    from safetensors.torch import load_file, save_file

    name, reader, source, results, windows, want, root = fixture_built
    out = assemble_gptq(reader, source, root / "gptq")
    assert verify_gptq(out, reader, source)["bit_exact_linears"] == len(results)
    names = moe_format.defused_names(reader)
    last = reader.num_layers - 1
    checked = {n: r for n, r in results.items() if n.startswith(("model.layers.0.", f"model.layers.{last}."))}
    ref = tmp_path / "ref.safetensors"
    tensors = {"input_ids": windows[:1].contiguous(), "logits": want[:1].contiguous()}
    tensors.update({f"weight:{names.get(n, n)}": r.dequantize() for n, r in checked.items()})
    save_file(tensors, ref)
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", PYTHONPATH="", STRATA_GPTQMODEL_BACKENDS="torch")
    proc = subprocess.run(
        [str(GPTQMODEL_PYTHON), str(REPO / "tests" / "readers" / "gptqmodel_check.py"), f"{out}={ref}"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(f"\n{name} GPTQ in GPTQModel: {lines}", file=sys.stderr)
    assert len(lines) == 1 and "error" not in lines[0], proc.stdout[-3000:] + proc.stderr[-3000:]
    got = lines[0]
    assert got["quantized_linears"] == len(checked) == got["weights_equal_fp16_of_reference"], got
    # fp16 inference of 30 blocks against the fp32 dense model: fp16 rounding moves router scores, so a
    # single position's max |Δ| is no measure (0.87 of 38 on Qwen3-MoE); the mean stays small and any
    # top-1 flip is a near tie, the rule verify holds llama.cpp's 8-bit rounding to
    stats = compare_logits(load_file(got["logits_file"])["logits"][0], want[0])
    print(f"{name} GPTQModel fp16 vs fp32 dense: {stats}", file=sys.stderr)
    assert stats["mean_abs_diff"] <= 0.01 * stats["logit_std"], stats
    assert stats["top1_flip_margin"] <= 0.1 * stats["logit_std"] and stats["top1_agreement"] >= 0.9, stats
