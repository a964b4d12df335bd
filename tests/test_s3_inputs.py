"""Checkpoints and calibration text read from s3:// (a real SeaweedFS), lazy range reads and block prefetch.

S3 traffic goes through a counting proxy (tests/fault_proxy.py's proxy, no faults) in front of
SeaweedFS, so the tests see every request the driver and the Ray workers made and how many bytes
each got back.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from strata_quant.pipeline.checkpoint import CheckpointError, CheckpointReader, ReadRange, coalesce
from tests.fault_proxy import FaultProxy, _ProxyHandler, _QuietServer
from tests.test_bad_input import assert_nothing_complete, run_cli, tiny_dict

SHARD = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# a proxy that counts what the S3 server served


@dataclass(frozen=True)
class Served:
    method: str
    key: str  # /bucket/key
    range: str | None  # the request's Range header
    status: int
    nbytes: int  # body bytes sent back


class CountingProxy(FaultProxy):
    """The fault proxy with no faults, recording every request's key, Range header and body size."""

    def __init__(self, upstream: str):
        super().__init__(upstream, max_lifetime_s=900)
        self.served: list[Served] = []

    def start(self) -> CountingProxy:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

            def _forward(self, body: bytes):
                status, reason, headers, payload = super()._forward(body)
                entry = Served(
                    self.command, unquote(urlsplit(self.path).path), self.headers.get("Range"), status, len(payload)
                )
                with proxy._lock:
                    proxy.served.append(entry)
                return status, reason, headers, payload

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def gets(self, key_suffix: str) -> list[Served]:
        with self._lock:
            return [s for s in self.served if s.method == "GET" and s.key.endswith(key_suffix)]

    def clear(self) -> None:
        with self._lock:
            self.served.clear()


def parse_range(header: str) -> tuple[int, int]:
    """'bytes=a-b' → (a, b + 1)."""
    assert header.startswith("bytes="), header
    a, b = header[len("bytes=") :].split("-")
    return int(a), int(b) + 1


# ---------------------------------------------------------------------------------------------
# fixtures: the tiny model and Emma in a bucket, uploaded as foreign objects (no strata checksums)


@pytest.fixture(scope="module")
def inputs_bucket(s3_server, tiny_model_path, emma_path):
    bucket = s3_server.make_bucket(f"inputs-{uuid.uuid4().hex[:8]}")
    client = s3_server.client()
    for f in sorted(Path(tiny_model_path).iterdir()):
        client.put_object(Bucket=bucket, Key=f"models/tiny/{f.name}", Body=f.read_bytes())
    for f in sorted(Path(tiny_model_path).iterdir()):  # the same model without its weights
        if f.suffix != ".safetensors":
            client.put_object(Bucket=bucket, Key=f"models/no-weights/{f.name}", Body=f.read_bytes())
    client.put_object(Bucket=bucket, Key="text/emma.txt", Body=Path(emma_path).read_bytes())
    return bucket


@pytest.fixture
def proxy(s3_server, monkeypatch, tmp_path, tiny_model_path, emma_path):
    """A counting proxy in front of SeaweedFS that this process and (through the pickled stores)
    the workers use; the s3:// metadata cache in a fresh folder."""
    with CountingProxy(s3_server.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.endpoint)
        monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
        yield p


def _local_cfg(tmp: Path, model, source, workers: int = 2) -> dict:
    cfg = tiny_dict(tmp, model=str(model), calibration={"source": str(source)})
    cfg["run"]["workers"] = workers
    return cfg


# ---------------------------------------------------------------------------------------------
# range planning and prefetch (local folder: the same code path, os.pread)


def test_coalesce_joins_neighbours_only():
    spans = [("c", 300, 400), ("a", 0, 100), ("b", 100, 250), ("far", 10_000, 10_010)]
    assert coalesce(spans, "f", gap=0) == [
        ReadRange("f", 0, 250, ("a", "b")),
        ReadRange("f", 300, 400, ("c",)),
        ReadRange("f", 10_000, 10_010, ("far",)),
    ]
    # a gap of at most `gap` bytes is read through; a larger one is not
    assert coalesce(spans, "f", gap=50) == [
        ReadRange("f", 0, 400, ("a", "b", "c")),
        ReadRange("f", 10_000, 10_010, ("far",)),
    ]
    assert coalesce([], "f") == []


@pytest.fixture
def two_shard_model(tmp_path, tiny_model_path) -> Path:
    """The tiny model re-sharded: block 1's MLP in a second shard, between the embeddings and block 2
    of the first (so block 1 spans two shards and block 0 is one range)."""
    folder = tmp_path / "two-shard"
    folder.mkdir()
    tensors = load_file(str(Path(tiny_model_path) / SHARD))
    second = {n: t for n, t in tensors.items() if n.startswith("model.layers.1.mlp.")}
    first = {n: t for n, t in tensors.items() if n not in second}
    save_file(first, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(first, "model-00001-of-00002.safetensors")}
    weight_map.update(dict.fromkeys(second, "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in Path(tiny_model_path).iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_block_reads_are_coalesced_ranges_equal_to_safetensors(two_shard_model):
    reader = CheckpointReader(two_shard_model)
    plan0 = reader.plan(reader.block_names(0))
    assert len(plan0) == 1 and plan0[0].nbytes == reader.block_bytes(0) and len(plan0[0].names) == 9
    plan1 = reader.plan(reader.block_names(1))
    assert [(r.file, len(r.names)) for r in plan1] == [
        ("model-00001-of-00002.safetensors", 6),  # norms and attention
        ("model-00002-of-00002.safetensors", 3),  # the MLP
    ]
    assert sum(r.nbytes for r in plan1) == reader.block_bytes(1)
    for b in range(reader.num_layers):
        before = reader.bytes_read
        got = reader.load_block(b)
        assert reader.bytes_read - before == reader.block_bytes(b)  # the block's bytes, nothing more
        for name, t in got.items():
            with safe_open(two_shard_model / reader.weight_map[name], "pt") as f:
                want = f.get_tensor(name)
            assert t.dtype == want.dtype and torch.equal(t, want), name
    assert reader.fingerprint() == CheckpointReader(two_shard_model).fingerprint()
    files = sorted(two_shard_model.glob("*.safetensors"))
    assert reader.num_params() == sum(t.numel() for f in files for t in load_file(str(f)).values())


def test_prefetch_gives_the_same_tensors_and_holds_one_block_ahead(two_shard_model):
    plain = CheckpointReader(two_shard_model)
    reader = CheckpointReader(two_shard_model)
    for b in range(reader.num_layers):
        reader.prefetch_block(b)
        reader.prefetch_block(b)  # idempotent
        got, want = reader.load_block(b), plain.load_block(b)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert reader.bytes_read == plain.bytes_read  # each block read once
    # a prefetch of another block replaces the pending one; loading a block not prefetched still works
    reader.prefetch_block(0)
    reader.prefetch_block(2)
    assert reader._pending[0] == (2, "model.layers")
    got = reader.load_block(1)
    assert reader._pending is None and all(torch.equal(got[n], plain.load_block(1)[n]) for n in got)
    # a reader with a prefetch in flight still pickles (no thread, no buffer)
    reader.prefetch_block(1)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._pending is None and torch.equal(
        clone.load_block(1)["model.layers.1.mlp.up_proj.weight"], got["model.layers.1.mlp.up_proj.weight"]
    )
    reader.load_block(1)


def test_prefetch_failure_surfaces_in_load_block(two_shard_model):
    reader = CheckpointReader(two_shard_model)
    shard = two_shard_model / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # cut after the reader read the header
    reader.prefetch_block(1)
    with pytest.raises(CheckpointError, match="cannot read shard 'model-00002-of-00002.safetensors'.*ends at byte"):
        reader.load_block(1)
    assert reader.load_block(0)  # the other shard is fine


# ---------------------------------------------------------------------------------------------
# s3:// checkpoints


def test_s3_reader_matches_local_and_reads_byte_ranges(proxy, inputs_bucket, tiny_model_path, tmp_path):
    uri = f"s3://{inputs_bucket}/models/tiny"
    local = CheckpointReader(tiny_model_path)
    reader = CheckpointReader(uri)
    assert reader.uri == uri and reader.source is not None
    assert reader.fingerprint() == local.fingerprint()  # same headers, same config: same run id
    assert reader.config == local.config and reader.weight_map == local.weight_map
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (reader.path / name).read_bytes() == (Path(tiny_model_path) / name).read_bytes()
    assert not list(reader.path.glob("*.safetensors"))
    size = (Path(tiny_model_path) / SHARD).stat().st_size
    (header_get,) = proxy.gets(f"/models/tiny/{SHARD}")  # the header: one ranged GET
    start, end = parse_range(header_get.range)
    assert start == 0 and end - start == header_get.nbytes < 70_000 < size

    proxy.clear()
    got = reader.load_block(1)
    want = local.load_block(1)
    assert all(t.dtype == want[n].dtype and torch.equal(t, want[n]) for n, t in got.items())
    (block_get,) = proxy.gets(f"/models/tiny/{SHARD}")  # one GET for the whole block
    assert block_get.nbytes == reader.block_bytes(1) == sum(t.numel() * t.element_size() for t in got.values())
    (planned,) = reader.plan(reader.block_names(1))
    assert parse_range(block_get.range) == (planned.start, planned.end)

    # prefetch through S3, and the pickled reader (as a worker gets it) carries no credential
    proxy.clear()
    reader.prefetch_block(2)
    got = reader.load_block(2)
    assert all(torch.equal(t, local.load_block(2)[n]) for n, t in got.items())
    assert len(proxy.gets(SHARD)) == 1
    blob = pickle.dumps(reader)
    from tests.s3_server import ACCESS_KEY, SECRET_KEY

    assert SECRET_KEY.encode() not in blob and ACCESS_KEY.encode() not in blob and len(blob) < 20_000

    # the small files are fetched once: a second reader lists and reads the header only
    proxy.clear()
    again = CheckpointReader(uri)
    assert again.path == reader.path
    whole = [s for s in proxy.served if s.method == "GET" and s.range is None]
    assert [s.key.strip("/") for s in whole] == [inputs_bucket]  # the LIST, no object read whole
    assert len(proxy.gets(SHARD)) == 1

    # the whole model for evaluation, read through the reader, equals transformers' own load
    ref_s3, ref_local = reader.reference_model(), local.reference_model()
    a, b = ref_s3.state_dict(), ref_local.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_s3_range_reads_retry_through_faults(s3_server, inputs_bucket, tiny_model_path, monkeypatch, tmp_path):
    from tests.fault_proxy import Rule

    local = CheckpointReader(tiny_model_path)
    rules = [
        Rule("slowdown", method="GET", key_contains=SHARD, first=1),
        Rule("truncate", method="GET", key_contains=SHARD, every=3),
        Rule("reset", method="GET", key_contains=SHARD, every=4),
    ]
    with FaultProxy(s3_server.endpoint, rules) as faulty:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", faulty.endpoint)
        monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
        reader = CheckpointReader(f"s3://{inputs_bucket}/models/tiny")
        reader.source.backoff_base_s = reader.source.backoff_max_s = 0.01
        for b in range(reader.num_layers):
            reader.prefetch_block(b)
            got, want = reader.load_block(b), local.load_block(b)
            assert all(torch.equal(t, want[n]) for n, t in got.items())
        assert reader.fingerprint() == local.fingerprint()
    assert set(faulty.injected) == {"slowdown", "truncate", "reset"} and reader.source.retry_count >= 3


def test_s3_shard_replaced_after_planning_is_refused(proxy, s3_server, tiny_model_path):
    bucket = s3_server.make_bucket(f"swap-{uuid.uuid4().hex[:8]}")
    client = s3_server.client()
    for f in Path(tiny_model_path).iterdir():
        client.put_object(Bucket=bucket, Key=f"m/{f.name}", Body=f.read_bytes())
    reader = CheckpointReader(f"s3://{bucket}/m")
    data = bytearray((Path(tiny_model_path) / SHARD).read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: a new ETag
    client.put_object(Bucket=bucket, Key=f"m/{SHARD}", Body=bytes(data))
    with pytest.raises(CheckpointError, match="changed while it was being read"):
        reader.load_block(0)


# ---------------------------------------------------------------------------------------------
# calibration text from s3://


def test_calibration_text_jsonl_parquet_from_s3(proxy, s3_server, inputs_bucket, emma_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from strata_quant.pipeline.calibration import CalibrationError, load_text

    paragraphs = [p for p in Path(emma_path).read_text().split("\n\n") if p.strip()][:50]
    (tmp_path / "emma.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    pq.write_table(pa.table({"text": paragraphs}), tmp_path / "emma.parquet")
    client = s3_server.client()
    for name in ("emma.jsonl", "emma.parquet"):
        client.put_object(Bucket=inputs_bucket, Key=f"text/{name}", Body=(tmp_path / name).read_bytes())
    base = f"s3://{inputs_bucket}/text"
    assert load_text(f"{base}/emma.txt") == load_text(str(emma_path))
    assert load_text(f"{base}/emma.jsonl") == load_text(str(tmp_path / "emma.jsonl")) == "\n\n".join(paragraphs)
    assert load_text(f"{base}/emma.parquet") == load_text(str(tmp_path / "emma.parquet"))
    with pytest.raises(CalibrationError, match=rf"calibration source '{base}/nope.txt' does not exist"):
        load_text(f"{base}/nope.txt")
    with pytest.raises(CalibrationError, match=r"emma.txt.jsonl:1: not a JSON object with a 'text' field"):
        client.put_object(Bucket=inputs_bucket, Key="text/emma.txt.jsonl", Body=b"plain text\n")
        load_text(f"{base}/emma.txt.jsonl")


# ---------------------------------------------------------------------------------------------
# the job: s3:// model and calibration give the very bytes local inputs give


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _result_hashes(store_root: Path, run_id: str) -> dict[str, str]:
    out = {}
    for record in sorted((store_root / "runs" / run_id / "blocks").glob("*/record.json")):
        for entry in json.loads(record.read_text())["results"]:
            out[entry["name"]] = entry["sha256"]
    return out


def test_job_with_s3_model_and_calibration_matches_local_inputs(
    proxy, inputs_bucket, tiny_model_path, emma_path, tmp_path, ray_session
):
    from strata_quant.pipeline.assemble import ResultSource, assemble_gptq
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.job import run_full_job
    from strata_quant.pipeline.run import run_job

    s3_dir, local_dir = tmp_path / "s3", tmp_path / "local"
    cfg = _local_cfg(s3_dir, f"s3://{inputs_bucket}/models/tiny", f"s3://{inputs_bucket}/text/emma.txt", workers=2)
    report = run_full_job(parse_config(cfg), progress=False)
    assert report["solved_blocks"] == 3 and report["checks"][0]["bit_exact_linears"] == 21
    assert report["params"] == CheckpointReader(tiny_model_path).num_params()
    served = proxy.gets(f"/models/tiny/{SHARD}")

    # the same job on local inputs (one worker: W=1 and W=2 give byte-identical results, see test_e2e)
    local = run_job(parse_config(_local_cfg(local_dir, tiny_model_path, emma_path, workers=1)), progress=False)
    assert local.run_id == report["run_id"]  # same model bytes, same calibration tokens
    s3_hashes = _result_hashes(s3_dir / "store", report["run_id"])
    assert len(s3_hashes) == 21 and s3_hashes == _result_hashes(local_dir / "store", local.run_id)
    gptq = assemble_gptq(local.reader, ResultSource(local.store, local.records), local_dir / "out" / "tiny-gptq")
    published = _tree_hashes(s3_dir / "out" / "tiny-gptq")
    assert published.pop("README.md")  # the job's model card; the rest is the artifact
    assert published == _tree_hashes(gptq) and len(published) >= 6

    # what S3 served for the shard: range GETs only, never the whole shard; each worker read each
    # block as one GET of exactly the block's bytes
    size = (Path(tiny_model_path) / SHARD).stat().st_size
    assert served and all(s.range and s.status == 206 for s in served), [s for s in served if not s.range]
    reader = local.reader
    for b in range(reader.num_layers):
        (block,) = reader.plan(reader.block_names(b))
        hits = [s for s in served if parse_range(s.range) == (block.start, block.end)]
        assert len(hits) == 2 and all(s.nbytes == reader.block_bytes(b) for s in hits), (b, hits)
    tensor_sizes = {e - s for s, e in reader.spans.values()}
    block_sizes = {reader.block_bytes(b) for b in range(reader.num_layers)}
    header = [s for s in served if parse_range(s.range)[0] == 0]
    assert len(header) == 1  # the driver read the header once; the workers got the table
    assert all(s.nbytes in tensor_sizes | block_sizes for s in served if s not in header)
    print(
        f"s3 job: {len(served)} range GETs of the {size}-byte shard, {sum(s.nbytes for s in served)} bytes "
        f"(block loads: {sum(2 * reader.block_bytes(b) for b in range(reader.num_layers))} bytes)"
    )


# ---------------------------------------------------------------------------------------------
# bad s3:// inputs fail while planning, with a clear message, nothing marked done


def test_missing_model_objects(proxy, inputs_bucket, emma_path, tmp_path, capsys):
    cfg = _local_cfg(tmp_path, f"s3://{inputs_bucket}/models/nothing", emma_path, workers=1)
    msg = run_cli(tmp_path, cfg, capsys)
    assert f"model location 's3://{inputs_bucket}/models/nothing' holds no objects" in msg
    assert_nothing_complete(tmp_path)

    cfg = _local_cfg(tmp_path, f"s3://{inputs_bucket}/models/no-weights", emma_path, workers=1)
    msg = run_cli(tmp_path, cfg, capsys)
    assert f"model folder 's3://{inputs_bucket}/models/no-weights' has no safetensors weights" in msg
    assert_nothing_complete(tmp_path)


def test_missing_calibration_key(proxy, inputs_bucket, tiny_model_path, tmp_path, capsys):
    source = f"s3://{inputs_bucket}/text/missing.txt"
    msg = run_cli(tmp_path, _local_cfg(tmp_path, f"s3://{inputs_bucket}/models/tiny", source, workers=1), capsys)
    assert f"calibration source '{source}' does not exist" in msg and "no such object" in msg
    assert_nothing_complete(tmp_path)


def test_wrong_credentials_for_s3_inputs(
    proxy, inputs_bucket, tiny_model_path, emma_path, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + uuid.uuid4().hex)
    msg = run_cli(tmp_path, _local_cfg(tmp_path, f"s3://{inputs_bucket}/models/tiny", emma_path, workers=1), capsys)
    assert f"cannot read the model s3://{inputs_bucket}/models/tiny" in msg and "check the credentials" in msg
    assert "not-the-secret-" not in msg
    msg = run_cli(tmp_path, _local_cfg(tmp_path, tiny_model_path, f"s3://{inputs_bucket}/text/emma.txt", 1), capsys)
    assert "cannot read calibration source" in msg and "S3 refused the request" in msg
    assert "not-the-secret-" not in msg
    assert_nothing_complete(tmp_path)
