"""The plan-time trace in a child process (pipeline/probe.py): the same structure and the same
refusals as the trace in the driver, and a child that dies is said in one line."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from strata_quant.pipeline import probe, structure
from strata_quant.pipeline.checkpoint import CheckpointError


def child_only(monkeypatch) -> None:
    """Every layer traced in the child from here on; a trace in the driver fails the test."""
    monkeypatch.setattr(probe, "IN_PLACE_BYTES", 0)
    monkeypatch.setattr(structure, "check_block_structure", lambda *a, **k: pytest.fail("traced in the driver"))


def _reader(config) -> SimpleNamespace:
    """What the trace reads of a checkpoint: its config.json (JSON-plain) and a path for messages."""
    return SimpleNamespace(config=json.loads(json.dumps(config)), path="model")


def _tiny_llama():
    from strata_quant.pipeline.checkpoint import open_checkpoint

    return open_checkpoint("fixture:tiny-llama")


@pytest.mark.parametrize("awq", [False, True])
def test_the_child_finds_the_structure_the_driver_finds(monkeypatch, awq):
    reader = _tiny_llama()
    here = structure.check_block_structure(reader, awq=awq)
    assert here.widths and (here.awq_relations if awq else here.awq_relations is None)
    child_only(monkeypatch)
    child = probe.block_structure(reader, awq=awq)
    assert asdict(child) == asdict(here)


def test_a_small_layer_is_traced_in_the_driver(monkeypatch):
    reader = _tiny_llama()
    monkeypatch.setattr(probe.subprocess, "run", lambda *a, **k: pytest.fail("a child for a small layer"))
    assert probe.block_structure(reader).widths == structure.check_block_structure(reader).widths


def _refusal(config) -> str:
    with pytest.raises(CheckpointError) as err:
        structure.check_block_structure(_reader(config))
    return str(err.value)


def test_the_child_refuses_what_the_driver_refuses_and_finds_its_experts(monkeypatch):
    """A block without linears (GPT-2's Conv1D): the driver's own words, from the child. Routed experts
    (Mixtral) run: the child finds the layout of the experts the driver finds (blocks, per-expert rows of the
    fused parameters, the router's rename), carried as JSON."""
    from transformers import GPT2Config

    from tests.moe_results import tiny_moe_config

    gpt2 = {**GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=256).to_dict(), "num_hidden_layers": 2}
    gpt2["architectures"] = ["GPT2LMHeadModel"]
    mixtral = tiny_moe_config("mixtral", 256).to_dict()
    mixtral["architectures"] = ["MixtralForCausalLM"]
    said = _refusal(gpt2)
    assert "unsupported architecture: GPT2Block has no nn.Linear layers" in said
    here = structure.check_block_structure(_reader(mixtral))
    assert here.moe_blocks == [0, 1] and len(here.expert_sources) == 4 * 3
    assert here.moe_renames == {"block_sparse_moe.gate.weight": "mlp.gate.weight"}
    child_only(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        probe.block_structure(_reader(gpt2))
    assert str(err.value) == said
    assert asdict(probe.block_structure(_reader(mixtral))) == asdict(here)


def test_awq_groups_without_a_fold_are_said_by_the_driver(monkeypatch, caplog):
    """The child logs nothing; the driver says each group its answer lists, once."""
    import subprocess

    unfolded = {"mlp.down_proj": "no earlier op absorbs a per-channel scale of their input (tried: none)"}
    answer = {"structure": {"widths": [64], "awq_relations": [], "awq_unfolded": unfolded}}
    monkeypatch.setattr(probe, "IN_PLACE_BYTES", 0)
    monkeypatch.setattr(
        probe.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 0, json.dumps(answer) + "\n", "")
    )
    with caplog.at_level(logging.WARNING, logger="strata.run"):
        found = probe.block_structure(_tiny_llama(), awq=True)
    assert found.awq_unfolded == unfolded
    said = [r.getMessage() for r in caplog.records if "without scales" in r.getMessage()]
    assert said == [f"AWQ: mlp.down_proj will be quantized without scales: {unfolded['mlp.down_proj']}"]


def test_a_child_that_dies_is_one_line(monkeypatch):
    monkeypatch.setattr(probe, "IN_PLACE_BYTES", 0)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match=r"block-structure probe of LlamaDecoderLayer exited with 1 and no answer"):
        probe.block_structure(_tiny_llama())
