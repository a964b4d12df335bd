"""Bad job configs fail early with a message that names the problem."""

from __future__ import annotations

import pytest

from strata_quant.pipeline.checkpoint import CheckpointError, CheckpointReader
from strata_quant.pipeline.config import ConfigError, check_against_model, load_config, parse_config

BASE = {
    "name": "t",
    "model": "fixture:tiny-llama",
    "calibration": {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 32},
}


def with_(**sections):
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def test_demo_config_loads():
    cfg = load_config("configs/smollm2-135m-gptq-w4g64.yaml")
    assert cfg.quant.bits == 4 and cfg.quant.group_size == 64 and cfg.quant.sym


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"quant\.bitz: unknown key"):
        parse_config(with_(quant={"bitz": 4}))
    with pytest.raises(ConfigError, match=r"colour: unknown key"):
        parse_config(with_(colour="blue"))


@pytest.mark.parametrize(
    "section,bad,match",
    [
        ("quant", {"bits": 5}, r"quant\.bits"),
        ("quant", {"group_size": 0}, r"quant\.group_size"),
        ("quant", {"method": "magic"}, r"quant\.method"),
        ("run", {"workers": 0}, r"run\.workers"),
        ("run", {"propagate": "sometimes"}, r"run\.propagate"),
        ("run", {"run_id": "../escape"}, r"run\.run_id"),
        ("run", {"device": "tpu"}, r"run\.device"),
        ("calibration", {"num_samples": -1}, r"calibration\.num_samples"),
    ],
)
def test_bad_values(section, bad, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(with_(**{section: bad}))


def test_gguf_needs_compatible_grid():
    with pytest.raises(ConfigError, match="gguf output"):
        parse_config(with_(quant={"bits": 8, "sym": False}, output={"formats": ["gguf"]}))  # no exact type
    with pytest.raises(ConfigError, match="multiple of 32"):
        parse_config(with_(quant={"group_size": 48}, output={"formats": ["gguf"]}))


def test_group_size_that_does_not_divide_is_refused_unless_allowed():
    model = {"hidden_size": 576, "intermediate_size": 1536}
    cfg = parse_config(with_(quant={"group_size": 128}))
    with pytest.raises(ConfigError, match=r"group_size 128 does not divide .*576"):
        check_against_model(cfg, model)
    check_against_model(parse_config(with_(quant={"group_size": 128, "allow_partial_group": True})), model)
    check_against_model(parse_config(with_(quant={"group_size": 64})), model)


def test_missing_model_path(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        CheckpointReader(tmp_path)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_bad_config_cleanly(tmp_path, capsys):
    from strata_quant.pipeline.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\nmodel: /nonexistent\ncalibration: {source: x}\nquant: {bitz: 4}\n")
    assert main(["run", str(cfg)]) == 2
    assert "quant.bitz: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/*.yaml")))
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.name and cfg.quant.bits in (2, 3, 4, 8)
