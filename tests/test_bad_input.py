"""Bad input through the command line: each case exits 2 with a clear `strata: error: …` line and
leaves nothing marked complete (no block record, no summary, no artifact).

Most cases fail while the driver plans, before Ray starts; NaN weights and a full disk are found
by a worker, and the driver reports the worker's own error.
"""

from __future__ import annotations

import json
import socket
import struct
import uuid
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import mounted_tmpfs


def tiny_dict(tmp: Path, model: str = "fixture:tiny-llama", **over) -> dict:
    cfg = {
        "name": "tiny",
        "model": model,
        "calibration": {"source": "fixture:austen/emma", "num_samples": 16, "seq_len": 64},
        "quant": {"method": "gptq", "bits": 4, "group_size": 64, "allow_partial_group": True},
        "run": {"workers": 1, "batch_size": 4, "store": str(tmp / "store")},
        "output": {"dir": str(tmp / "out"), "formats": ["gptq"]},
        "eval": None,
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return cfg


def run_cli(tmp: Path, cfg: dict, capsys, *extra: str) -> str:
    """`strata run` on ``cfg``: asserts exit status 2 and one `strata: error:` line; returns it."""
    from strata_quant.pipeline.cli import main

    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["run", str(path), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("strata: error: ")]
    assert lines, err
    assert "Traceback" not in err
    msg = err[err.index("strata: error: ") :]
    print(msg)  # shown with -rP: the message a user gets
    return msg


def assert_nothing_complete(tmp: Path) -> None:
    store = tmp / "store"
    if store.exists():
        done = [p for p in store.rglob("*") if p.name in ("record.json", "summary.json")]
        assert not done, done
    out = tmp / "out"
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.fixture
def model_copy(tmp_path, tiny_model_path) -> Path:
    """The tiny model as links to the cached files; a test replaces the file it breaks."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in Path(tiny_model_path).iterdir():
        (folder / f.name).symlink_to(f)
    return folder


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# the checkpoint


def test_truncated_shard(tmp_path, model_copy, capsys):
    shard = model_copy / "model.safetensors"
    _replace(shard, shard.read_bytes()[: shard.stat().st_size // 2])
    msg = run_cli(tmp_path, tiny_dict(tmp_path, str(model_copy)), capsys)
    assert "shard 'model.safetensors' is truncated: tensor" in msg
    assert_nothing_complete(tmp_path)


def test_corrupt_safetensors_header(tmp_path, model_copy, capsys):
    shard = model_copy / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\x00garbage\xff\xfe{[}]!!"
    _replace(shard, bytes(data))
    msg = run_cli(tmp_path, tiny_dict(tmp_path, str(model_copy)), capsys)
    assert "shard 'model.safetensors' has a corrupt safetensors header (not JSON" in msg
    assert_nothing_complete(tmp_path)

    # a header length that cannot be right
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    _replace(shard, bytes(data))
    msg = run_cli(tmp_path, tiny_dict(tmp_path, str(model_copy)), capsys)
    assert f"its header claims {1 << 40} bytes" in msg
    assert_nothing_complete(tmp_path)


def _write_index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_names_a_tensor_the_shard_lacks(tmp_path, model_copy, tiny_model_path, capsys):
    from strata_quant.pipeline.checkpoint import read_header

    names = read_header(Path(tiny_model_path) / "model.safetensors")
    weight_map = dict.fromkeys(names, "model.safetensors")
    weight_map["model.layers.1.mlp.gate_proj.bias"] = "model.safetensors"
    _write_index(model_copy, weight_map)
    msg = run_cli(tmp_path, tiny_dict(tmp_path, str(model_copy)), capsys)
    assert "index names 1 tensor(s) in shard 'model.safetensors' that the shard does not hold" in msg
    assert "model.layers.1.mlp.gate_proj.bias" in msg
    assert_nothing_complete(tmp_path)


def test_block_tensor_absent_from_the_index(tmp_path, model_copy, tiny_model_path, capsys):
    from strata_quant.pipeline.checkpoint import read_header

    names = read_header(Path(tiny_model_path) / "model.safetensors")
    weight_map = {n: "model.safetensors" for n in names if n != "model.layers.1.mlp.down_proj.weight"}
    _write_index(model_copy, weight_map)
    msg = run_cli(tmp_path, tiny_dict(tmp_path, str(model_copy)), capsys)
    assert "holds 1 tensor(s) the index does not list: model.layers.1.mlp.down_proj.weight" in msg
    assert_nothing_complete(tmp_path)

    # absent from the index and from the shard: the block's layer class needs it
    tensors = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    (model_copy / "model.safetensors.index.json").unlink()
    _replace(model_copy / "model.safetensors", b"")
    save_file(tensors, str(model_copy / "model.safetensors"), metadata={"format": "pt"})
    msg = run_cli(tmp_path, tiny_dict(tmp_path, str(model_copy)), capsys)
    assert "block 1 lacks 1 tensor(s) in the checkpoint index: model.layers.1.mlp.down_proj.weight" in msg
    assert_nothing_complete(tmp_path)


def test_nan_and_inf_in_weights(tmp_path, model_copy, tiny_model_path, capsys, ray_session):
    tensors = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"][3, 5] = float("nan")
    tensors["model.layers.0.self_attn.k_proj.weight"][7, 1] = float("inf")
    _replace(model_copy / "model.safetensors", b"")
    save_file(tensors, str(model_copy / "model.safetensors"), metadata={"format": "pt"})
    msg = run_cli(tmp_path, tiny_dict(tmp_path, str(model_copy)), capsys)
    assert "tensor 'model.layers.0.self_attn.k_proj.weight' (shard 'model.safetensors') holds 2 NaN/Inf" in msg
    assert_nothing_complete(tmp_path)


def test_unsupported_architecture(tmp_path, model_copy, capsys):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    _replace(model_copy / "config.json", json.dumps(config).encode())
    msg = run_cli(tmp_path, tiny_dict(tmp_path, str(model_copy)), capsys)
    assert (
        "unsupported architecture ['GPT2LMHeadModel']: for model_type 'llama' transformers builds LlamaForCausalLM"
        in msg
    )
    assert_nothing_complete(tmp_path)


def test_tokenizer_missing(tmp_path, model_copy, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_copy / name).unlink()
    msg = run_cli(tmp_path, tiny_dict(tmp_path, str(model_copy)), capsys)
    assert f"cannot load the tokenizer from {str(model_copy)!r}" in msg
    assert_nothing_complete(tmp_path)


# ---------------------------------------------------------------------------------------------
# calibration and config


def test_calibration_text_too_short(tmp_path, tiny_model_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich. " * 20)
    cfg = tiny_dict(tmp_path, calibration={"source": str(text)})
    msg = run_cli(tmp_path, cfg, capsys)
    assert "fewer than num_samples × seq_len = 16 × 64 = 1024" in msg
    assert_nothing_complete(tmp_path)


def test_group_size_that_does_not_fit(tmp_path, tiny_model_path, capsys):
    cfg = tiny_dict(tmp_path, quant={"allow_partial_group": False})
    msg = run_cli(tmp_path, cfg, capsys)
    assert "quant.group_size 64 does not divide the input width(s) [352]" in msg
    assert_nothing_complete(tmp_path)


def test_awq_format_at_three_bits(tmp_path, capsys):
    cfg = tiny_dict(tmp_path, quant={"bits": 3}, output={"formats": ["awq"]})
    msg = run_cli(tmp_path, cfg, capsys)
    assert "awq output holds 4-bit results" in msg
    assert_nothing_complete(tmp_path)


def test_unknown_config_key(tmp_path, capsys):
    cfg = tiny_dict(tmp_path, run={"wrokers": 2})
    msg = run_cli(tmp_path, cfg, capsys)
    assert "run.wrokers: unknown key" in msg
    assert_nothing_complete(tmp_path)


def test_output_location_not_empty(tmp_path, capsys):
    existing = tmp_path / "out" / "tiny-gptq"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("someone's earlier artifact")
    msg = run_cli(tmp_path, tiny_dict(tmp_path), capsys)
    assert "exists; pass --overwrite" in msg
    assert (existing / "keep.txt").read_text() == "someone's earlier artifact"
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("record.json"))


# ---------------------------------------------------------------------------------------------
# the store


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_store_unreachable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_closed_port()}")
    msg = run_cli(tmp_path, tiny_dict(tmp_path, run={"store": "s3://nowhere/strata"}), capsys)
    assert "cannot reach the S3 endpoint http://127.0.0.1:" in msg
    assert_nothing_complete(tmp_path)


def test_wrong_credentials(tmp_path, capsys, monkeypatch, s3_server):
    bucket = s3_server.make_bucket(f"creds-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + uuid.uuid4().hex)
    msg = run_cli(tmp_path, tiny_dict(tmp_path, run={"store": f"s3://{bucket}/strata"}), capsys)
    assert "S3 refused the request" in msg and "check the credentials" in msg
    assert "not-the-secret-" not in msg
    assert not s3_server.client().list_objects_v2(Bucket=bucket).get("Contents")


def test_missing_bucket(tmp_path, capsys, monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    msg = run_cli(tmp_path, tiny_dict(tmp_path, run={"store": f"s3://{bucket}/strata"}), capsys)
    assert f"bucket {bucket!r} does not exist" in msg


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KiB tmpfs: room for run.json, not for a block's results (real ENOSPC)."""
    with mounted_tmpfs(tmp_path / "disk", "16k") as mount:
        yield mount


def test_disk_full_on_the_local_store(tmp_path, small_disk, capsys, ray_session):
    cfg = tiny_dict(tmp_path, run={"store": str(small_disk / "store")})
    msg = run_cli(tmp_path, cfg, capsys)
    assert "no space left on the device holding" in msg
    assert (small_disk / "store" / "runs").is_dir()  # the run started: the disk filled up mid-run
    assert not [p for p in (small_disk / "store").rglob("*") if p.name in ("record.json", "summary.json")]
    assert not (tmp_path / "out").exists()


def test_cuda_device_without_gpus_is_refused(tmp_path, capsys, ray_session):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run.device cuda is valid here")
    cfg = tiny_dict(tmp_path, run={"device": "cuda"})
    msg = run_cli(tmp_path, cfg, capsys)
    assert "run.device cuda needs one GPU per worker (1); the Ray cluster has 0" in msg
    assert_nothing_complete(tmp_path)


def test_to_device_moves_nested_tensors():
    import torch

    from strata_quant.workers.capture import to_device

    kwargs = {"position_embeddings": (torch.ones(2), torch.zeros(2)), "mask": None, "ids": [torch.arange(3)], "n": 4}
    moved = to_device(kwargs, torch.device("meta"))
    assert all(t.device.type == "meta" for t in moved["position_embeddings"])
    assert moved["ids"][0].device.type == "meta" and moved["mask"] is None and moved["n"] == 4
    assert isinstance(moved["position_embeddings"], tuple)
