"""docs/configuration.md is generated from the config schema and must not drift from it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from strata_quant.pipeline import config_reference
from strata_quant.pipeline.cli import main
from strata_quant.pipeline.config import JobConfig, QuantConfig, RunConfig

ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = ROOT / "docs" / "configuration.md"


def test_checked_in_reference_matches_the_schema():
    assert CHECKED_IN.read_text(encoding="utf-8") == config_reference.render(), (
        "docs/configuration.md differs from the config schema: run `strata config-reference --out "
        "docs/configuration.md` to update"
    )


def test_every_field_is_documented():
    text = config_reference.render()
    sections = {"": JobConfig}
    sections.update({f"{n}.": model for n, model in config_reference._sections(JobConfig, "")})
    assert "quant.moe." in sections  # a section inside a section has its own table
    for prefix, model in sections.items():
        if model is None:
            continue
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no Field(description=...)"
            assert f"| `{prefix}{name}` |" in text, f"{prefix}{name} missing from the reference"


def test_type_default_bounds_and_allowed_values_are_rendered():
    text = config_reference.render()
    row = next(line for line in text.splitlines() if line.startswith("| `run.propagate` |"))
    assert "one of `quantized`, `float`" in row and "| `quantized` |" in row
    row = next(line for line in text.splitlines() if line.startswith("| `calibration.num_samples` |"))
    assert "int, ≥ 1" in row and "| `64` |" in row
    row = next(line for line in text.splitlines() if line.startswith("| `quant.awq_duo` |"))
    assert "mean\\|x\\|" in row  # a pipe inside a cell would split the table
    assert "| `model` | str | required |" in text
    assert "| `calibration.source` | str | `fixture:calib-mix` |" in text  # a job that names no text gets the mix


def test_a_new_field_changes_the_reference(monkeypatch):
    """The drift the checked-in test guards against: a field added without regenerating."""
    before = config_reference.render()

    class Quant(QuantConfig):
        new_knob: Literal["a", "b"] = Field("a", description="a knob added later")

    class Job(JobConfig):
        quant: Quant = Field(Quant(), description="method and settings")

    monkeypatch.setattr(config_reference, "JobConfig", Job)
    after = config_reference.render()
    assert after != before
    assert "| `quant.new_knob` | one of `a`, `b` | `a` | a knob added later |" in after
    assert RunConfig.model_fields["workers"].description  # the real schema is untouched


def test_cli_writes_the_reference(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    assert main(["config-reference", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == config_reference.render()
    assert main(["config-reference"]) == 0
    assert capsys.readouterr().out.endswith(config_reference.render())


@pytest.mark.parametrize(
    "value, text", [((128, 128), "[128, 128]"), (None, "null"), (["gptq", "gguf"], "[gptq, gguf]")]
)
def test_values_read_as_yaml(value, text):
    assert config_reference._value(value) == text
