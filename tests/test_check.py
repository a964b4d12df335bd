"""`strata check CONFIG`: every plan-time refusal, each before Ray starts, as one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tests.test_bad_input import tiny_dict

needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Starting or joining Ray is an error in these tests (an earlier test's session Ray may
    already be up in this process: the check is that these tests leave its state unchanged)."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("strata check started Ray")

    was_up = ray.is_initialized()
    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert ray.is_initialized() == was_up


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    """main() points the root logger at the stderr of the test that first calls it; drop that
    handler after each test (a later test's warnings would go to a closed capture)."""
    import logging

    import transformers

    transformers.logging.disable_default_handler()  # bound to the first test's captured stderr
    before = list(logging.getLogger().handlers)
    yield
    for handler in logging.getLogger().handlers[:]:
        if handler not in before:
            logging.getLogger().removeHandler(handler)


@pytest.fixture
def model_copy(tmp_path, tiny_model_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for f in Path(tiny_model_path).iterdir():
        (folder / f.name).symlink_to(f)
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.unlink()
    path.write_text(json.dumps(config))


def check(tmp: Path, cfg: dict, capsys) -> tuple[int, str, str]:
    from strata_quant.pipeline.cli import main

    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["check", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(tmp: Path, cfg: dict, capsys) -> str:
    rc, out, err = check(tmp, cfg, capsys)
    lines = [line for line in err.splitlines() if line.startswith("strata: error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "can run" not in out
    print(lines[0])
    return lines[0]


def gguf_dict(tmp: Path, model: Path | str = "fixture:tiny-llama", **output) -> dict:
    return tiny_dict(
        tmp, model=str(model), output={"formats": ["gptq", "gguf"], "gguf_tokenizer_pre": "smollm", **output}
    )


@needs_llamacpp
def test_a_good_config_passes_without_ray(tmp_path, capsys):
    rc, out, err = check(tmp_path, gguf_dict(tmp_path), capsys)
    assert rc == 0, err
    assert "can run" in out and "llama.cpp loads the vocabulary with pre-type 'smollm'" in out
    assert not (tmp_path / "store" / "runs").exists()  # nothing of a run is written


@needs_llamacpp
def test_unknown_tokenizer_pre_type(tmp_path, capsys):
    msg = refused(tmp_path, gguf_dict(tmp_path, gguf_tokenizer_pre="no-such-pre"), capsys)
    assert "gguf_tokenizer_pre 'no-such-pre'" in msg and "llama.cpp" in msg


def test_unknown_rope_type(tmp_path, model_copy, capsys):
    edit_config(model_copy, rope_parameters={"rope_theta": 10000.0, "rope_type": "no-such-rope", "factor": 2.0})
    assert "rope" in refused(tmp_path, gguf_dict(tmp_path, model_copy), capsys).lower()


def test_head_dim_that_does_not_match_the_weights(tmp_path, model_copy, capsys):
    edit_config(model_copy, head_dim=64)  # the shards hold 4 heads of 32
    msg = refused(tmp_path, tiny_dict(tmp_path, model=str(model_copy)), capsys)
    assert "config.json" in msg and "self_attn" in msg and "head_dim" in msg


def test_odd_head_dim(tmp_path, model_copy, capsys):
    edit_config(model_copy, head_dim=31)
    assert "head_dim 31" in refused(tmp_path, tiny_dict(tmp_path, model=str(model_copy)), capsys)


def test_gguf_holds_heads_narrower_than_hidden_over_heads(tmp_path, capsys, tiny_model_path):
    from strata_quant.pipeline.fixtures import synthetic_llama

    # 2 heads of 32 in a 96-wide model: the weights agree with config.json, and the GGUF says so
    # with attention.key_length (else llama.cpp would assume hidden / heads = 48)
    model = synthetic_llama(tmp_path / "narrow-heads", hidden=96, intermediate=128, layers=1, heads=2, kv_heads=1)
    edit_config(model, head_dim=32)
    from safetensors.torch import load_file, save_file

    shard = next(model.glob("*.safetensors"))
    tensors = load_file(shard)
    for name in list(tensors):
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            tensors[name] = tensors[name][: (64 if "q_proj" in name else 32)].contiguous()
        elif name.endswith("o_proj.weight"):
            tensors[name] = tensors[name][:, :64].contiguous()
    shard.unlink()
    save_file(tensors, shard, metadata={"format": "pt"})
    index = model / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        index.write_text(json.dumps(data))
    cfg = gguf_dict(tmp_path, model, formats=["gguf"])
    cfg["quant"]["group_size"] = 32
    rc, out, err = check(tmp_path, cfg, capsys)
    assert rc == 0, err
    from strata_quant.pipeline.checkpoint import open_checkpoint
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.preflight import _dry_writer

    writer, arch = _dry_writer(parse_config(cfg), open_checkpoint(model))
    fields = writer.kv_data[0]
    assert fields[f"{arch}.attention.key_length"].value == 32


def test_awq_needs_outputs_in_multiples_of_eight(tmp_path, capsys):
    from strata_quant.pipeline.fixtures import synthetic_llama

    model = synthetic_llama(tmp_path / "odd", hidden=120, intermediate=132, layers=1, heads=4, kv_heads=2)
    cfg = tiny_dict(tmp_path, model=str(model), quant={"method": "awq", "group_size": 12}, output={"formats": ["awq"]})
    cfg["quant"].pop("allow_partial_group")
    msg = refused(tmp_path, cfg, capsys)
    assert "awq output cannot hold" in msg and "k_proj (60×120" in msg and "multiple of 8" in msg


def test_gptq_three_bits_needs_words_of_whole_values(tmp_path, capsys):
    from strata_quant.pipeline.fixtures import synthetic_llama

    model = synthetic_llama(tmp_path / "w3", hidden=128, intermediate=336, layers=1, heads=4, kv_heads=2)
    cfg = tiny_dict(tmp_path, model=str(model), quant={"bits": 3, "group_size": 16}, output={"formats": ["gptq"]})
    msg = refused(tmp_path, cfg, capsys)
    assert "gptq output cannot hold" in msg and "336" in msg and "32-bit words" in msg


def test_calibration_text_too_short(tmp_path, capsys):
    cfg = tiny_dict(tmp_path, calibration={"num_samples": 100000, "seq_len": 512})
    assert "calibration" in refused(tmp_path, cfg, capsys).lower()


def test_too_few_samples_for_the_workers(tmp_path, capsys):
    """4 samples in batches of 4 are one batch: a second worker would get nothing."""
    cfg = tiny_dict(tmp_path, calibration={"num_samples": 4, "seq_len": 64}, run={"workers": 2})
    assert "4 samples in batches of 4 cannot feed 2 workers" in refused(tmp_path, cfg, capsys)


def test_eval_text_too_short(tmp_path, capsys):
    cfg = tiny_dict(tmp_path)
    cfg["eval"] = {"windows": 100000, "seq_len": 512}
    assert "evaluation text has" in refused(tmp_path, cfg, capsys)


def _tokenizer():
    from transformers import AutoTokenizer

    from strata_quant.pipeline.checkpoint import open_checkpoint

    return AutoTokenizer.from_pretrained(open_checkpoint("fixture:tiny-llama").path)


def test_a_texts_head_has_the_texts_first_ids():
    from strata_quant.pipeline.calibration import load_text, tokenize_head, tokenize_stream

    tok, text = _tokenizer(), load_text("fixture:austen/persuasion")
    whole = tokenize_stream(tok, text)
    head = tokenize_head(tok, text, 1000)
    assert 1000 < head.numel() < whole.numel() // 10
    assert head.tolist() == whole[: head.numel()].tolist()
    assert tokenize_head(tok, text[:3000], 10**6).tolist() == tokenize_stream(tok, text[:3000]).tolist()


def test_the_eval_check_reads_the_head_of_a_book(tmp_path, capsys, monkeypatch):
    """The off-domain default (the King James Bible, 4 MB) is checked from the head its windows
    need, not tokenized whole on the driver; a text too short is refused the same."""
    from strata_quant.pipeline import calibration

    seen = []
    real = calibration.tokenize_stream
    monkeypatch.setattr(calibration, "tokenize_stream", lambda tok, text: seen.append(len(text)) or real(tok, text))
    cfg = tiny_dict(tmp_path)
    cfg["eval"] = {"windows": 8, "seq_len": 256, "off_domain": "fixture:kjv"}
    rc, out, err = check(tmp_path, cfg, capsys)
    assert rc == 0, err
    assert "(off domain) fixture:kjv" in out
    kjv = len(calibration.load_text("fixture:kjv"))
    assert kjv > 4_000_000 and seen and max(seen) < kjv // 50
    cfg["eval"] = {"windows": 2000, "seq_len": 512, "off_domain": "fixture:kjv"}
    assert "eval.text fixture:austen/persuasion: evaluation text has" in refused(tmp_path, cfg, capsys)


def test_output_that_exists(tmp_path, capsys):
    (tmp_path / "out" / "tiny-gptq").mkdir(parents=True)
    assert "exists" in refused(tmp_path, tiny_dict(tmp_path), capsys)


def test_store_that_does_not_answer(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    cfg = tiny_dict(tmp_path, run={"store": "s3://no-bucket/strata"})
    assert "no-bucket" in refused(tmp_path, cfg, capsys)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_bad_override_is_one_line(tmp_path, capsys):
    from strata_quant.pipeline.cli import main

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path)))
    rc = main(["check", str(path), "--set", "no-equals-sign"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "strata: error: --set expects KEY=VALUE, got 'no-equals-sign'"


@pytest.mark.parametrize(
    "error", [ValueError("rope scaling 'x'\nis not supported"), OSError(28, "No space left"), KeyError("k")]
)
def test_any_error_the_pipeline_raises_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, error):
    from strata_quant.pipeline import cli, preflight

    def fail(cfg, **kwargs):
        raise error

    monkeypatch.setattr(preflight, "check_job", fail)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path)))
    rc = cli.main(["check", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"strata: error: {type(error).__name__}: ") and "Traceback" not in err
