"""The dense families beyond Llama through the run: block structure traced from the model's own
code, per-layer masks (sliding-window layers), AWQ's relations (fused rows, (1 + w) norms), and
tiny random Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma 3 through W=2 into verified GPTQ and
compressed-tensors folders.
Refusals of what cannot be handled come before block 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from strata_quant.pipeline.fixtures import TINY_FAMILIES, resolve

# per block: the shared-input groups and AWQ's op before each, as the trace finds them
LLAMA_LAYOUT = (
    [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)]
    + [("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)],
    ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"],
)
LAYOUTS = {
    "mistral": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    "qwen3": LLAMA_LAYOUT,
    "phi3": (
        [("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)],
        ["input_layernorm", "self_attn.qkv_proj", "post_attention_layernorm", "mlp.gate_up_proj"],
    ),
    "gemma3": (
        LLAMA_LAYOUT[0],
        ["input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm", "mlp.up_proj"],
    ),
}


def _block_and_inputs(family: str, index: int = 0):
    """Block ``index`` of the tiny model (fp32) with the hidden states and arguments the
    model's own forward passes it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve(f"fixture:tiny-{family}"), dtype=torch.float32).eval()
    layer = model.model.layers[index]
    seen = {}
    hook = layer.register_forward_pre_hook(lambda _m, a, kw: seen.update(x=a[0], kw=kw), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0)))
    hook.remove()
    return layer, seen["x"], {k: v for k, v in seen["kw"].items() if k != "cache"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_trace_finds_the_groups_and_awq_relations_of_each_family(family):
    from strata_quant.workers.awq import find_scale_groups, fold_scales
    from strata_quant.workers.block import trace_block

    layer, x, kwargs = _block_and_inputs(family)
    trace = trace_block(layer, x, kwargs)
    groups, prevs = LAYOUTS[family]
    assert list(trace.groups) == groups and not trace.unreached
    found, missing = find_scale_groups(layer, trace, x, kwargs)
    assert not missing and [g.prev for g in found] == prevs
    by_prev = {g.prev: g for g in found}
    if family == "phi3":  # the v rows of qkv_proj (after 4·32 q and 2·32 k rows), the up half of gate_up
        assert by_prev["self_attn.qkv_proj"].rows == (192, 256)
        assert by_prev["mlp.gate_up_proj"].rows == (256, 512)
    else:
        assert all(g.rows is None for g in found)
    # Gemma's norms compute x̂ · (1 + w): the fold is (1 + w)/s − 1
    offsets = {g.prev: g.offset for g in found if "norm" in g.prev}
    assert set(offsets.values()) == ({1.0} if family == "gemma3" else {0.0})
    # folding any scales keeps the block's function
    with torch.no_grad():
        ref = layer(x, **kwargs)
        gen = torch.Generator().manual_seed(1)
        for g in found:
            fold_scales(layer, g, torch.exp(torch.randn(g.slots(layer), generator=gen)))
        out = layer(x, **kwargs)
    assert float((out - ref).norm() / (ref - x).norm()) < 1e-5


def test_a_norm_that_cannot_absorb_a_scale_is_reported_not_guessed():
    """A norm whose output does not scale with its weight (here: weight applied before the
    normalisation) gets no fold; the group is named with the reason."""
    from torch import nn

    from strata_quant.workers.awq import find_scale_groups
    from strata_quant.workers.block import trace_block

    class PreScaledNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n) + 0.1 * torch.randn(n))

        def forward(self, x):
            y = x * self.weight
            return y / y.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    layer, x, kwargs = _block_and_inputs("qwen2")
    layer.post_attention_layernorm = PreScaledNorm(128)
    trace = trace_block(layer, x, kwargs)
    found, missing = find_scale_groups(layer, trace, x, kwargs)
    assert [g.prev for g in found] == ["input_layernorm", "self_attn.v_proj", "mlp.up_proj"]
    assert list(missing) == [("mlp.gate_proj", "mlp.up_proj")]
    assert "post_attention_layernorm" in missing[("mlp.gate_proj", "mlp.up_proj")]


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_each_layer_gets_its_own_mask_and_rotary_tables(family, tmp_path):
    """propagate float through every block in a worker gives the model's own last-layer output:
    Gemma's full-attention layer between sliding ones, Mistral's sliding window (40 > 16, 32)."""
    from transformers import AutoModelForCausalLM

    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.store import LocalStore
    from strata_quant.workers.actor import BlockWorker
    from strata_quant.workers.job import WorkerJob
    from strata_quant.workers.result import QuantSpec

    reader = open_checkpoint(f"fixture:tiny-{family}")
    job = WorkerJob(
        model_config=reader.config,
        spec=QuantSpec(bits=8, group_size=64, sym=True),
        run_prefix="runs/t",
        propagate="float",
        overlap_depth=0,
        batch_size=2,
    )
    worker = BlockWorker(0, 1, reader, LocalStore(tmp_path), job)
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    worker.load_samples(ids)
    if family == "gemma3":
        assert len(worker.layer_kwargs) == 2 and worker.kwargs_variant == [0, 1, 0]
    for b in range(reader.num_layers):
        worker.process_block(b)
    model = AutoModelForCausalLM.from_pretrained(reader.path, dtype=torch.float32).eval()
    seen = {}
    model.model.layers[-1].register_forward_hook(lambda _m, _a, out: seen.update(y=out))
    with torch.no_grad():
        model(ids)
    got = worker.batches[0][0]
    # measured 3e-5 for Gemma (0 for Mistral); layer 0's mask for every layer gives 0.34
    assert float((got - seen["y"]).norm() / seen["y"].norm()) < 1e-4


def _family_config(tmp_path: Path, family: str, method: str = "gptq") -> dict:
    return {
        "name": f"tiny-{family}",
        "model": f"fixture:tiny-{family}",
        "calibration": {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 48},
        "quant": {"method": method, "bits": 4, "group_size": 64, **({"awq_grid": 5} if "awq" in method else {})},
        "run": {"workers": 2, "batch_size": 4, "store": str(tmp_path / "store")},
        "output": {"dir": str(tmp_path / "out"), "formats": ["gptq"]},
        "eval": None,
    }


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_runs_on_two_workers_into_verified_gptq_and_ct_folders(family, tmp_path, emma_path, ray_session):
    from safetensors import safe_open

    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.job import run_full_job

    cfg = _family_config(tmp_path, family)
    cfg["output"]["formats"] = ["gptq", "compressed-tensors"]
    report = run_full_job(parse_config(cfg), progress=False)
    per_block = 4 if family == "phi3" else 7
    assert report["solved_blocks"] == 3
    check, ct_check = report["checks"]
    for c in (check, ct_check):  # packed linears decode to the results; biases and other tensors equal
        assert c["quantized_linears"] == c["bit_exact_linears"] == 3 * per_block
    folder = tmp_path / "out" / f"tiny-{family}-gptq"
    src = resolve(f"fixture:tiny-{family}")
    with safe_open(src / "model.safetensors", "pt") as f:
        original = {n: f.get_tensor(n) for n in f.keys()}
    index = folder / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    carried = [n for n in original if not n.endswith("_proj.weight")]
    for name in carried:  # norms (four per Gemma block, Qwen3's q/k norms), biases, embeddings: unchanged
        with safe_open(folder / shard.get(name, "model.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor(name), original[name]), name
    biases = [n for n in carried if n.endswith("_proj.bias")]
    assert len(biases) == (9 if family == "qwen2" else 0)
    assert check["other_tensors"] == ct_check["other_tensors"] == len(carried)


@pytest.mark.parametrize("family", ["phi3", "gemma3"])
def test_awq_folds_into_fused_rows_and_offset_norms_on_two_workers(family, tmp_path, emma_path, ray_session):
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import run_job

    outcome = run_job(parse_config(_family_config(tmp_path, family, "awq")), progress=False)
    assert outcome.solved_blocks == [0, 1, 2]
    entries = {e["name"].split(".", 3)[-1]: e for e in outcome.records[1]["results"]}
    from strata_quant.workers.records import result_from_bytes

    params = {n: result_from_bytes((tmp_path / "store" / e["key"]).read_bytes()).params for n, e in entries.items()}
    _, prevs = LAYOUTS[family]
    assert {p["awq_prev"] for p in params.values()} == set(prevs)  # every linear of a group names its op
    assert not any("awq_unfolded" in p for p in params.values())
    if family == "gemma3":
        assert params["self_attn.q_proj"]["awq_prev_offset"] == 1.0
    floats = sorted(f["name"].split(".", 3)[-1] for e in entries.values() for f in e.get("float_results", []))
    norms = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    if family == "gemma3":
        norms = ["input_layernorm.weight", "pre_feedforward_layernorm.weight"]
    assert floats == sorted(norms)
    assert all(e["output_rel_error"] < 0.2 for e in entries.values())


@pytest.mark.parametrize(
    "family, formats",
    [
        # tiny Mistral has sliding-window layers, which llama.cpp's llama architecture lacks: its GGUF is refused
        ("mistral", ["awq", "compressed-tensors"]),
        ("qwen3", ["awq", "compressed-tensors", "gguf"]),
        ("phi3", ["awq", "compressed-tensors", "gguf"]),
    ],
)
def test_awq_run_on_two_workers_into_every_format_it_has(family, formats, tmp_path, emma_path, ray_session):
    """AWQ through W=2 into the AWQ folder, compressed-tensors and the Q4_0 GGUF where the family has one: every
    linear of each bit-exact against the run's results (the GGUF also read by llama.cpp in the job's verify)."""
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.job import run_full_job

    cfg = _family_config(tmp_path, family, "awq")
    # llama.cpp gives a model named like Phi-3 (general.name) Phi-3's special tokens, which SmolLM2's vocabulary
    # (the tiny models') lacks: a name without the family's keeps the file loadable
    cfg["name"] = "tiny-awq"
    cfg["output"]["formats"] = formats
    report = run_full_job(parse_config(cfg), progress=False)
    per_block = 4 if family == "phi3" else 7
    assert report["solved_blocks"] == 3
    assert len(report["checks"]) == len(formats)
    for check in report["checks"]:
        assert check["quantized_linears"] == check["bit_exact_linears"] == 3 * per_block, check
    made = {p.name for p in (tmp_path / "out").iterdir()}
    assert "tiny-awq-awq" in made and "tiny-awq-compressed-tensors" in made
    assert ("tiny-awq-Q4_0.gguf" in made) is ("gguf" in formats)


def _refused(tmp_path, capsys, model_dir: Path, **quant) -> str:
    """`strata run` on a tiny config for ``model_dir``: exit 2, one error line, nothing complete."""
    from tests.test_bad_input import assert_nothing_complete, run_cli

    cfg = _family_config(tmp_path, "qwen2")
    cfg["model"] = str(model_dir)
    cfg["quant"].update(quant)
    msg = run_cli(tmp_path, cfg, capsys)
    assert_nothing_complete(tmp_path)
    return msg


def _save_random(folder: Path, config) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve("fixture:tiny-qwen2")).save_pretrained(folder)
    return folder


def test_a_block_without_linears_is_refused_before_block_0(tmp_path, capsys):
    """GPT-2 computes with Conv1D, not nn.Linear: nothing the run could quantize."""
    from transformers import GPT2Config

    model = _save_random(tmp_path / "gpt2", GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=49152))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))  # GPT-2 says n_layer
    err = _refused(tmp_path, capsys, model)
    assert "unsupported architecture: GPT2Block has no nn.Linear layers to quantize" in err


def test_a_missing_expert_tensor_is_refused_before_block_0(tmp_path, capsys):
    """Routed experts run (tests/test_moe_run.py); a checkpoint that lacks one expert's tensor is named at plan
    time by its checkpoint name (the family's conversion reversed), not found when its block is built."""
    from safetensors.torch import load_file, save_file

    from tests.moe_results import tiny_moe_config

    config = tiny_moe_config("mixtral", 49152)
    folder = _save_random(tmp_path / "mixtral", config)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    err = _refused(tmp_path, capsys, folder)
    assert "block 1 lacks 1 tensor(s)" in err and "model.layers.1.block_sparse_moe.experts.2.w3.weight" in err


def test_an_architecture_transformers_does_not_build_is_refused(tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(resolve("fixture:tiny-qwen2"), model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["Qwen2ForTokenClassification"]
    (model / "config.json").write_text(json.dumps(config))
    err = _refused(tmp_path, capsys, model)
    assert "unsupported architecture ['Qwen2ForTokenClassification']: for model_type 'qwen2'" in err


def test_a_format_that_cannot_hold_the_method_is_refused_before_block_0(tmp_path, capsys):
    err = _refused(tmp_path, capsys, resolve("fixture:tiny-qwen2"), method="nf4")
    assert "bitsandbytes" in err


def test_stage_cache_gives_the_full_pass_bytes_on_gemma3(tmp_path, emma_path, ray_session):
    """Gemma's block applies its post-attention / post-feedforward norms around the stand-ins the
    stage passes use: the cached passes still give the bytes of running the whole block."""
    full, cached = stage_cache_hashes(tmp_path, "gemma3")
    assert len(full) == 21 and cached == full


def stage_cache_hashes(tmp_path: Path, family: str) -> tuple[dict[str, str], dict[str, str]]:
    """Each result's sha256 of a tiny ``family`` run without the stage cache and with it (the default)."""
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import run_job

    def hashes(sub, **run):
        cfg = _family_config(tmp_path / sub, family)
        cfg["run"].update(run)
        outcome = run_job(parse_config(cfg), progress=False)
        return {e["name"]: e["sha256"] for r in outcome.records.values() for e in r["results"]}

    return hashes("full", stage_cache=False), hashes("cached")
