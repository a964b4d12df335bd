"""The object store: one suite for LocalStore and S3Store (a real SeaweedFS on loopback), plus S3 faults.

S3 faults go through tests/fault_proxy.py in front of SeaweedFS; nothing under test is mocked.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import threading
import time
import uuid

import pytest

from strata_quant.pipeline.store import (
    ChecksumError,
    LocalStore,
    ObjectNotFound,
    S3Store,
    StoreError,
    StoreKeyError,
    open_store,
    sha256_bytes,
)
from tests import s3_server as s3mod
from tests.conftest import mounted_tmpfs
from tests.fault_proxy import FaultProxy, Rule

MiB = 1 << 20
BUCKET = "strata-test"
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "multipart_threshold": 5 * MiB, "part_size": 5 * MiB}


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.make_bucket(BUCKET)


def s3_store(server, endpoint=None, prefix=None, **over) -> S3Store:
    return S3Store(
        BUCKET, prefix or f"t/{uuid.uuid4().hex[:8]}", endpoint_url=endpoint or server.endpoint, **{**FAST, **over}
    )


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    request.getfixturevalue("bucket")
    return s3_store(server)


def raw_client(endpoint: str):
    """A plain boto3 client with the test credentials, for going behind the store's back."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=s3mod.ACCESS_KEY,
        aws_secret_access_key=s3mod.SECRET_KEY,
        region_name=s3mod.REGION,
        config=Config(s3={"addressing_style": "path"}),
    )


def corrupt(store, key: str, data: bytes, keep_checksum: bool = True) -> None:
    """Replace an object's bytes behind the store's back (bit rot, or a foreign writer)."""
    if isinstance(store, LocalStore):
        path = store.root / key
        path.write_bytes(data)
        if not keep_checksum:
            path.with_name(f".{path.name}.sha256").unlink()
        return
    raw = raw_client(store.endpoint_url)
    head = raw.head_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}")
    meta = head["Metadata"] if keep_checksum else {}
    raw.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data, Metadata=meta)


# ---------------------------------------------------------------------------------------------
# one suite, both backends


@pytest.mark.parametrize("size", [0, 1, 1000, 300_000])
def test_round_trip(store, size):
    data = os.urandom(size)
    store.put_bytes(f"blocks/00001/model.layers.1.mlp.up_proj-{size}.safetensors", data)
    assert store.get_bytes(f"blocks/00001/model.layers.1.mlp.up_proj-{size}.safetensors") == data
    store.put_bytes("view", memoryview(bytearray(b"abc")))
    assert store.get_bytes("view") == b"abc"


def test_overwrite_is_atomic(store):
    a, b = b"A" * 1_000_000, b"B" * 700_000
    store.put_bytes("obj", a)
    seen, stop, errors = set(), threading.Event(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(sha256_bytes(store.get_bytes("obj")))
            except Exception as err:  # surfaced below
                errors.append(err)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(12):
            store.put_bytes("obj", a if i % 2 else b)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert seen <= {sha256_bytes(a), sha256_bytes(b)} and seen  # whole objects only, never a mix
    assert store.get_bytes("obj") == a
    assert store.list("") == ["obj"]  # nothing left behind under another name
    if isinstance(store, LocalStore):
        assert sorted(p.name for p in store.root.iterdir()) == [".obj.sha256", "obj"]


def test_missing_object(store):
    with pytest.raises(ObjectNotFound) as err:
        store.get_bytes("runs/x/none.json")
    assert isinstance(err.value, FileNotFoundError) and "none.json" in str(err.value)
    assert not store.exists("runs/x/none.json")


def test_exists_and_list_by_prefix(store):
    keys = ["runs/a/run.json", "runs/a/blocks/00000/record.json", "runs/ab/run.json", "runs/b/x", "top"]
    for k in keys:
        store.put_bytes(k, k.encode())
    assert all(store.exists(k) for k in keys)
    assert not store.exists("runs/a") and not store.exists("runs/a/blocks")
    assert store.list("runs/a") == ["runs/a/blocks/00000/record.json", "runs/a/run.json"]
    assert store.list("runs/a/") == store.list("runs/a")
    assert store.list("runs/a/blocks/") == ["runs/a/blocks/00000/record.json"]
    assert store.list("runs") == sorted(keys[:4])
    assert store.list("") == sorted(keys)
    assert store.list("nothing/here") == []


def test_large_object_goes_through_multipart(store):
    data = os.urandom(11 * MiB + 3)
    store.put_bytes("big/model.layers.0.mlp.down_proj.safetensors", data)
    assert store.get_bytes("big/model.layers.0.mlp.down_proj.safetensors") == data
    if isinstance(store, S3Store):
        raw = raw_client(store.endpoint_url)
        head = raw.head_object(Bucket=BUCKET, Key=f"{store.prefix}/big/model.layers.0.mlp.down_proj.safetensors")
        assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB parts
        assert head["Metadata"]["sha256"] == sha256_bytes(data)
        uploads = raw.list_multipart_uploads(Bucket=BUCKET, Prefix=store.prefix).get("Uploads", [])
        assert uploads == []


def test_corruption_is_detected_on_read(store):
    data = b"x" * 5000
    store.put_bytes("runs/r/blocks/00000/q.safetensors", data)
    corrupt(store, "runs/r/blocks/00000/q.safetensors", b"x" * 4999 + b"y")
    with pytest.raises(ChecksumError, match="corrupt"):
        store.get_bytes("runs/r/blocks/00000/q.safetensors")
    store.put_bytes("foreign", data)
    corrupt(store, "foreign", data, keep_checksum=False)  # right bytes, but nothing vouches for them
    with pytest.raises(ChecksumError, match="no recorded sha256"):
        store.get_bytes("foreign")
    store.put_bytes("runs/r/blocks/00000/q.safetensors", data)  # a rewrite heals it
    assert store.get_bytes("runs/r/blocks/00000/q.safetensors") == data


BAD_KEYS = [
    "",
    "/etc/passwd",
    "../escape",
    "runs/../../escape",
    "runs/./x",
    "runs//x",
    "runs/x/",
    "a\\b",
    "..\\..\\windows",
    "runs/.hidden",
    "nul\x00byte",
    "line\nbreak",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_that_escape_are_rejected(store, key):
    for op in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key), lambda: store.exists(key)):
        with pytest.raises(StoreKeyError) as err:
            op()
        assert isinstance(err.value, ValueError)


def test_list_rejects_escaping_prefix(store):
    for prefix in ("..", "../x", "a/../..", "a\\b", "a//b", "/../x"):
        with pytest.raises(StoreKeyError):
            store.list(prefix)


def test_json_helpers(store):
    obj = {"block": 3, "complete": True, "results": [{"name": "model.layers.3.self_attn.q_proj", "sha256": "ab"}]}
    store.put_json("runs/r/blocks/00003/record.json", obj)
    assert store.get_json("runs/r/blocks/00003/record.json") == obj
    raw = store.get_bytes("runs/r/blocks/00003/record.json")
    assert raw.decode().startswith("{") and b'"block": 3' in raw


def test_store_pickles_without_client(store):
    store.put_bytes("k", b"v")
    blob = pickle.dumps(store)
    assert s3mod.SECRET_KEY.encode() not in blob
    clone = pickle.loads(blob)
    assert clone.get_bytes("k") == b"v" and repr(clone) == repr(store)


def test_open_store(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s3 = open_store("s3://some-bucket/runs/prefix", retries=2)
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix, s3.retries) == ("some-bucket", "runs/prefix", 2)
    assert s3.root == "s3://some-bucket/runs/prefix"
    assert open_store("s3://b-only").prefix == ""
    with pytest.raises(StoreError):
        open_store("s3:///prefix")
    with pytest.raises(StoreError):
        open_store(str(tmp_path), retries=2)


# ---------------------------------------------------------------------------------------------
# local only: a full disk


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (real ENOSPC from the kernel); needs the right to mount."""
    with mounted_tmpfs(tmp_path / "tiny", "256k") as mount:
        yield mount


def test_local_disk_full_is_a_clear_error_and_leaves_nothing(tiny_disk):
    store = LocalStore(tiny_disk / "store")
    store.put_bytes("small", b"ok")
    with pytest.raises(StoreError, match="no space left") as err:
        store.put_bytes("runs/r/blocks/00000/big.safetensors", os.urandom(1 * MiB))
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    left = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    assert left == [".small.sha256", "small"]  # no temporary file, no half object
    assert not store.exists("runs/r/blocks/00000/big.safetensors")
    assert store.get_bytes("small") == b"ok"


# ---------------------------------------------------------------------------------------------
# S3 only: faults, budgets, errors, credentials


@pytest.fixture
def proxy(s3_server, bucket):
    with FaultProxy(s3_server.endpoint, max_lifetime_s=120) as p:
        yield p


FAULT_CASES = [
    # (fault, rule kwargs, what the store does)
    ("slowdown", {"method": "GET", "first": 2}, "get"),
    ("reset", {"method": "GET", "first": 2}, "get"),
    ("truncate", {"method": "GET", "first": 2}, "get"),
    ("slow", {"method": "GET", "first": 1, "delay_s": 1.5}, "get"),
    ("slowdown", {"method": "PUT", "first": 2}, "put"),
    ("reset", {"method": "PUT", "first": 2}, "put"),
    ("slowdown", {"every": 2}, "multipart"),
    ("truncate", {"method": "PUT", "first": 1}, "put"),
    ("reset", {"method": "PUT", "key_contains": "partNumber=2", "first": 2}, "multipart"),
    ("slowdown", {"method": "POST", "key_contains": "uploadId=", "first": 1}, "multipart"),
    ("reset", {"method": "POST", "key_contains": "uploadId=", "first": 1}, "multipart"),  # completed, answer lost
    ("truncate", {"method": "GET", "key_contains": "list-type", "first": 1}, "list"),
    ("reset", {"method": "HEAD", "first": 2}, "exists"),
]


@pytest.mark.parametrize(
    ("fault", "rule", "op"), FAULT_CASES, ids=[f"{f}-{o}-{i}" for i, (f, _, o) in enumerate(FAULT_CASES)]
)
def test_faults_are_retried_and_bytes_come_back_right(s3_server, proxy, fault, rule, op):
    direct = s3_store(s3_server)
    # a short read timeout only where the fault is a stall: elsewhere a loaded machine's own slow answer
    # would be one more retry than the faults injected
    timeout = 1.0 if fault == "slow" else 30.0
    faulty = s3_store(s3_server, endpoint=proxy.endpoint, prefix=direct.prefix, read_timeout_s=timeout)
    faulty.client()  # the bucket check goes through before the schedule starts
    size = 11 * MiB if op == "multipart" else 200_000
    data = os.urandom(size)
    key = f"runs/r/blocks/00000/{op}.safetensors"
    if op in ("get", "list", "exists"):
        direct.put_bytes(key, data)
    proxy.set_rules(Rule(fault, **rule))
    proxy.reset_counts()
    if op == "get":
        assert faulty.get_bytes(key) == data
    elif op in ("put", "multipart"):
        faulty.put_bytes(key, data)
    elif op == "list":
        assert faulty.list("runs") == [key]
    elif op == "exists":
        assert faulty.exists(key)
    proxy.set_rules()
    assert proxy.injected[fault] >= 1
    assert faulty.retry_count == sum(proxy.injected.values())  # one retry per injected fault, no more
    assert direct.get_bytes(key) == data  # what is stored is right, read without any proxy
    raw = s3_server.client()
    assert raw.list_multipart_uploads(Bucket=BUCKET, Prefix=direct.prefix).get("Uploads", []) == []
    print(f"\n{fault}/{op}: {proxy.requests} requests, {dict(proxy.injected)} injected, {faulty.retry_count} retries")


def test_slow_answers_within_the_timeout_are_not_retried(s3_server, proxy):
    faulty = s3_store(s3_server, endpoint=proxy.endpoint, read_timeout_s=5.0)
    faulty.put_bytes("k", b"v")
    proxy.set_rules(Rule("slow", method="GET", first=1, delay_s=0.5))
    assert faulty.get_bytes("k") == b"v"
    assert proxy.injected["slow"] == 1 and faulty.retry_count == 0


def test_past_the_retry_budget_a_clear_error(s3_server, proxy):
    faulty = s3_store(s3_server, endpoint=proxy.endpoint, retries=3)
    faulty.put_bytes("k", b"v")
    proxy.reset_counts()
    proxy.set_rules(Rule("slowdown", method="GET", first=1000))
    with pytest.raises(StoreError, match=r"get 'k' failed after 4 attempts \(HTTP 503 SlowDown") as err:
        faulty.get_bytes("k")
    assert proxy.requests == 4 and faulty.retry_count == 3
    assert proxy.endpoint in str(err.value) and "s3://strata-test/" in str(err.value)
    proxy.set_rules(Rule("truncate", method="GET", first=1000))
    with pytest.raises(StoreError, match="after 4 attempts"):
        faulty.get_bytes("k")


def test_wrong_credentials_are_a_clear_error_without_the_secret(s3_server, bucket, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    wrong_secret = "wrong-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with pytest.raises(StoreError, match="refused the request.*check the credentials") as err:
        s3_store(s3_server).get_bytes("k")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "no-such-key-id")
    with pytest.raises(StoreError, match="check the credentials") as err2:
        s3_store(s3_server).put_bytes("k", b"v")
    for text in (str(err.value), str(err2.value), repr(err.value.__cause__), caplog.text):
        assert wrong_secret not in text and s3mod.SECRET_KEY not in text


def test_missing_credentials_are_a_clear_error(s3_server, bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no AWS credentials.*AWS_ACCESS_KEY_ID"):
        s3_store(s3_server).exists("k")


def test_missing_bucket_is_not_created_unless_asked(s3_server):
    name = f"strata-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StoreError, match=f"bucket '{name}' does not exist.*create_bucket=True"):
        S3Store(name, "p", endpoint_url=s3_server.endpoint, **FAST).put_bytes("k", b"v")
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert name not in names
    made = S3Store(name, "p", endpoint_url=s3_server.endpoint, create_bucket=True, **FAST)
    made.put_bytes("k", b"v")
    assert made.get_bytes("k") == b"v"


def test_unreachable_endpoint_is_a_clear_error():
    port = s3mod._free_ports(1)[0]  # nothing listens there
    store = S3Store(BUCKET, "p", endpoint_url=f"http://127.0.0.1:{port}", retries=2, connect_timeout_s=1, **FAST)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port} after 3 attempt"):
        store.get_bytes("k")
    assert store.retry_count == 2 and time.monotonic() - t0 < 20


def test_endpoint_from_the_environment(s3_server, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    store = open_store(f"s3://{BUCKET}/env-{uuid.uuid4().hex[:6]}")
    assert store.endpoint_url == s3_server.endpoint
    store.put_json("a.json", {"x": 1})
    assert store.get_json("a.json") == {"x": 1}


def test_credentials_never_reach_what_the_store_writes_or_logs(s3_server, bucket, proxy, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # botocore's debug log included
    secret, access = s3mod.SECRET_KEY, s3mod.ACCESS_KEY
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret
    stores = [s3_store(s3_server), s3_store(s3_server, endpoint=proxy.endpoint), LocalStore(tmp_path / "local")]
    proxy.set_rules(Rule("slowdown", every=3), Rule("truncate", method="GET", every=4))
    errors = []
    for store in stores:
        store.put_json("runs/r/run.json", {"config": {"store": str(store)}, "repr": repr(store)})
        store.put_bytes("runs/r/blocks/00000/big", os.urandom(6 * MiB))
        store.get_bytes("runs/r/blocks/00000/big")
        store.list("runs")
        try:
            store.get_bytes("runs/r/none")
        except StoreError as err:
            errors.append(f"{err!s} {err!r} {err.__cause__!r}")
    assert proxy.injected  # the retry log lines are in the capture too
    for store in stores[:2]:
        raw = s3_server.client()
        for obj in raw.list_objects_v2(Bucket=BUCKET, Prefix=store.prefix)["Contents"]:
            got = raw.get_object(Bucket=BUCKET, Key=obj["Key"])
            assert secret.encode() not in got["Body"].read() and secret not in str(got["Metadata"])
    for path in (tmp_path / "local").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes()
    text = caplog.text + "".join(errors) + "".join(repr(s) for s in stores)
    assert "retrying in" in caplog.text and secret not in text
    assert access not in "".join(errors)  # errors do not name the key id either
    for store in stores:
        assert secret.encode() not in pickle.dumps(store)


# ---------------------------------------------------------------------------------------------
# end to end: a real run records every block in S3


def test_run_job_records_every_block_in_s3(
    s3_server, bucket, tiny_model_path, emma_path, ray_session, tmp_path, monkeypatch
):
    from strata_quant.pipeline.config import parse_config
    from strata_quant.pipeline.run import load_records, record_is_complete, run_job

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # the driver's; the store carries it to workers
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    cfg = parse_config(
        {
            "name": "tiny",
            "model": "fixture:tiny-llama",
            "calibration": {"source": "fixture:austen/emma", "num_samples": 8, "seq_len": 32},
            "quant": {"method": "gptq", "bits": 4, "group_size": 64, "allow_partial_group": True},
            "run": {"workers": 1, "batch_size": 4, "store": f"s3://{BUCKET}/{prefix}"},
            "output": {"dir": str(tmp_path / "out"), "overwrite": True},
            "eval": None,
        }
    )
    outcome = run_job(cfg, progress=False)
    assert isinstance(outcome.store, S3Store) and outcome.store.root == f"s3://{BUCKET}/{prefix}"
    n = outcome.reader.num_layers
    assert outcome.solved_blocks == list(range(n))

    # read the bucket afresh, as another process would
    store = S3Store(BUCKET, prefix, endpoint_url=s3_server.endpoint)
    run = store.get_json(f"{outcome.prefix}/run.json")
    assert run["num_blocks"] == n and run["config"]["run"]["store"] == f"s3://{BUCKET}/{prefix}"
    keys = store.list(outcome.prefix)
    for b in range(n):
        record = record_is_complete(store, f"{outcome.prefix}/blocks/{b:05d}/record.json")
        assert record is not None and record["complete"] and len(record["results"]) == 7
        for entry in record["results"]:
            assert entry["key"] in keys
    assert load_records(store, outcome.prefix, n).keys() == set(range(n))
    raw = s3_server.client()
    for obj in raw.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]:
        body = raw.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
        assert s3mod.SECRET_KEY.encode() not in body and s3mod.ACCESS_KEY.encode() not in body
        assert raw.head_object(Bucket=BUCKET, Key=obj["Key"])["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
    print(f"\ne2e on S3: {n} blocks, {len(keys)} objects under {store.root}/{outcome.prefix}, {outcome.wall_s:.1f}s")
