"""Object store for run records and results: one interface, two backends.

``LocalStore`` keeps objects in a local folder (the embedded default); ``S3Store`` keeps
them in an S3 bucket (AWS or any S3-compatible server) through boto3. Both offer
``put_bytes``, ``get_bytes``, ``exists``, ``list``, ``put_json`` and ``get_json``, and both:

* write atomically: a reader never sees a partial object under its final key (local:
  temporary name, then rename; S3: a PUT, or a multipart upload that only appears when
  completed);
* record a sha256 of every object when it is written and check it on every read, so a
  corrupted or half-written object raises ``ChecksumError`` instead of being used;
* accept only relative '/'-separated keys that cannot leave the store root or prefix
  (``check_key``): keys are built from tensor names and must not be able to escape;
* raise ``StoreError`` (or a subclass) with a message that says what to do, and never
  include a credential in a message, a log line or an object.

Inputs strata did not write (a checkpoint's shards, calibration text) have no recorded
sha256: ``get_bytes(key, verify=False)`` reads such an object whole (S3: its ETag is still
checked where it is a plain MD5), ``stat`` / ``list_info`` give sizes and ETags, and
``get_range`` / ``readinto_range`` read a byte range (S3: HTTP range GETs, long ranges
split into parts fetched in parallel; ``etag`` makes the read fail if the object changed).

``S3Store`` takes its endpoint from the constructor or ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, and its credentials from the standard AWS chain (environment,
shared config, instance role) of whichever process uses it: it is pickled to Ray workers
without its client or any credential, and each process builds its own client lazily.
Transient failures (throttling, 5xx, connection errors, timeouts, truncated bodies,
checksum mismatches in transit) are retried with exponential backoff and jitter, up to
``retries`` times per operation; past that a ``StoreError`` says what failed last.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("strata.store")

MiB = 1 << 20
S3_MIN_PART_SIZE = 5 * MiB  # S3's own rule: every part but the last is at least 5 MiB
SHA256_META = "sha256"  # object metadata key (x-amz-meta-sha256) holding the hex sha256


class StoreError(Exception):
    """A store operation failed; the message says what failed and what to do."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """No object under that key."""


class StoreKeyError(StoreError, ValueError):
    """A key that is not a plain relative path inside the store."""


class ChecksumError(StoreError):
    """An object's bytes do not match the sha256 recorded when it was written."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_key(key: str) -> str:
    """``key`` if it is a relative '/'-separated path that stays inside the store, else StoreKeyError.

    Rejected: empty keys, absolute keys, backslashes, control characters, and empty,
    '.', '..' or dot-leading path components (dot names are the stores' own bookkeeping).
    """
    if not isinstance(key, str) or not key:
        raise StoreKeyError(f"bad object key {key!r}: keys are non-empty strings")
    if key.startswith("/") or "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise StoreKeyError(f"bad object key {key!r}: keys are relative '/'-separated paths without control characters")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise StoreKeyError(f"object key {key!r} escapes the store root or has an empty component")
        if part.startswith("."):
            raise StoreKeyError(f"bad object key {key!r}: components may not start with '.'")
    return key


def _check_prefix(prefix: str) -> str:
    """A listing prefix: '' (everything) or a key-like folder path, returned without trailing '/'."""
    prefix = prefix.strip("/") if prefix else ""
    return check_key(prefix) if prefix else ""


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


@dataclass(frozen=True)
class ObjectInfo:
    """An object's size in bytes and its ETag (S3's; a local file's is mtime and size)."""

    size: int
    etag: str


def _check_range(key: str, start: int, end: int) -> None:
    if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end < start:
        raise StoreError(f"bad byte range [{start}, {end}) of {key!r}")


# ---------------------------------------------------------------------------------------------
# local folder


class LocalStore:
    """A store in a local directory (the embedded default).

    Each object ``a/b`` has a sidecar ``a/.b.sha256`` with its hex sha256, renamed into place
    before the object itself; dot names never show in ``list`` and cannot be keys.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        check_key(key)
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StoreKeyError(f"object key {key!r} escapes the store root")
        return path

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(f".{path.name}.sha256")

    def put_bytes(self, key: str, data: bytes, sha256: str | None = None) -> None:
        """Write ``data`` under ``key`` (atomically, with its sha256 beside it); ``sha256``: the
        digest of ``data`` where the caller has it already (a worker records it too)."""
        path = self._path(key)
        data = bytes(data)
        digest = sha256 or sha256_bytes(data)
        tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = path.with_name(f".{path.name}.{tag}")
        side, side_tmp = self._sidecar(path), path.with_name(f".{path.name}.sha256.{tag}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for target, payload in ((tmp, data), (side_tmp, digest.encode())):
                with open(target, "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
            # checksum first: a crash in between leaves a mismatch (detected), never an unverified object
            os.replace(side_tmp, side)
            os.replace(tmp, path)
        except OSError as err:
            for leftover in (tmp, side_tmp):
                try:
                    leftover.unlink()
                except OSError:
                    pass
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(
                    f"no space left on the device holding {self.root} while writing {key!r} "
                    f"({len(data)} bytes): free some space or point run.store at a larger volume"
                ) from err
            raise StoreError(f"cannot write {key!r} to {self}: {err.strerror or err}") from err

    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        """The object's bytes, checked against its recorded sha256; ``verify=False`` for an input
        strata did not write (no sha256 recorded): the bytes as they are."""
        path = self._path(key)
        if not verify:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise ObjectNotFound(f"no object {key!r} in {self}") from None
            except OSError as err:
                raise StoreError(f"cannot read {key!r} from {self}: {err.strerror or err}") from err
        side = self._sidecar(path)
        for attempt in range(3):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise ObjectNotFound(f"no object {key!r} in {self}") from None
            except OSError as err:
                raise StoreError(f"cannot read {key!r} from {self}: {err.strerror or err}") from err
            try:
                expected = side.read_text().strip()
            except FileNotFoundError:
                raise ChecksumError(
                    f"object {key!r} in {self} has no recorded sha256 (written outside strata, or its "
                    "write was interrupted); delete it and redo the step that wrote it"
                ) from None
            actual = sha256_bytes(data)
            if actual == expected:
                return data
            time.sleep(0.05 * (attempt + 1))  # a concurrent overwrite may sit between its two renames
        raise ChecksumError(
            f"object {key!r} in {self} is corrupt: sha256 of its bytes is {actual}, recorded {expected}; "
            "delete it and redo the step that wrote it"
        )

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        """Size and a change tag (mtime and size) of an object; ObjectNotFound if there is none."""
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r} in {self}") from None
        except OSError as err:
            raise StoreError(f"cannot stat {key!r} in {self}: {err.strerror or err}") from err
        return ObjectInfo(st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}")

    def list_info(self, prefix: str = "") -> dict[str, ObjectInfo]:
        """``list`` with each object's size and change tag."""
        return {key: self.stat(key) for key in self.list(prefix)}

    def get_range(self, key: str, start: int, end: int, *, etag: str | None = None) -> bytes:
        """Bytes [start, end) of an object (no checksum: a range cannot be checked against the
        whole object's sha256). StoreError if the object is shorter or (with ``etag``) changed."""
        out = bytearray(end - start) if end >= start else bytearray()
        self.readinto_range(key, start, memoryview(out), etag=etag)
        return bytes(out)

    def readinto_range(self, key: str, start: int, out: memoryview, *, etag: str | None = None) -> None:
        """Fill ``out`` with the object's bytes from ``start`` on (``os.pread``: no mapping, no seek)."""
        _check_range(key, start, start + len(out))
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r} in {self}") from None
        except OSError as err:
            raise StoreError(f"cannot read {key!r} from {self}: {err.strerror or err}") from err
        try:
            if etag is not None:
                st = os.fstat(fd)
                if f"{st.st_mtime_ns:x}-{st.st_size:x}" != etag:
                    raise StoreError(f"object {key!r} in {self} changed while it was being read; start again")
            pread_into(fd, start, out, what=f"{key!r} in {self}")
        except OSError as err:
            raise StoreError(f"cannot read {key!r} from {self}: {err.strerror or err}") from err
        finally:
            os.close(fd)

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_prefix(prefix)
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
        )

    def put_json(self, key: str, obj) -> None:
        self.put_bytes(key, _json_bytes(obj))

    def get_json(self, key: str):
        return json.loads(self.get_bytes(key))


def pread_into(fd: int, offset: int, out: memoryview, what: str = "the file") -> None:
    """Fill ``out`` from ``fd`` at ``offset`` with ``os.preadv`` (short reads continued); a
    StoreError if the file ends first."""
    done, total = 0, len(out)
    while done < total:
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            raise StoreError(
                f"{what} ends at byte {offset + done}, before the {total} bytes asked for from byte {offset}"
            )
        done += n


# ---------------------------------------------------------------------------------------------
# S3


class _Transient(Exception):
    """Internal: a failure worth another attempt (bad bytes in transit, write not confirmed)."""


_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "BadDigest",  # the body was damaged on its way to the server: send it again
    "XAmzContentSHA256Mismatch",
}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}


def _redact_url(url: str | None) -> str | None:
    """The URL without any user:password part."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return url


_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")
# environment variables whose values are secrets (or name the secret's owner) wherever they appear
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """``text`` without the user:password part of any URL in it, nor the value of any credential
    in this process's environment (``SECRET_ENV``), each replaced by ``***``."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8 and value in text:
            text = text.replace(value, "***")
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that redacts (:func:`redact`) every log line it passes: the message with
    its arguments and any exception text, whichever logger it comes from."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_redaction() -> None:
    """Put a :class:`RedactingFilter` on the root logger's handlers and on logging's last-resort
    handler (a process without handlers, such as a Ray worker, prints warnings through it)."""
    handlers = list(logging.getLogger().handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def _multipart_etag(part_md5s: list[bytes]) -> str:
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


class S3Store:
    """A store under ``s3://bucket/prefix`` (AWS S3 or an S3-compatible server).

    ``retries``: further attempts after a transient failure, per request (and per part of
    a multipart upload), with backoff ``min(backoff_max_s, backoff_base_s * 2**n)`` times a
    random factor in [0.5, 1]. Objects larger than ``multipart_threshold`` go up in parts
    of ``part_size`` (at least 5 MiB, S3's minimum). ``create_bucket``: create a missing
    bucket instead of failing. ``verify_etag``: also check the ETag the server returns
    against the MD5 of what was sent (turn off for SSE-KMS buckets, whose ETags are not
    MD5s; the server still checks Content-MD5 and the sha256 is still checked on read).
    A range read longer than ``range_part_size`` is fetched as parts, up to
    ``range_threads`` at a time, each a GET of its own with its own retries.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        *,
        retries: int = 6,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 20.0,
        multipart_threshold: int = 8 * MiB,
        part_size: int = 8 * MiB,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        region: str | None = None,
        create_bucket: bool = False,
        verify_etag: bool = True,
        max_pool_connections: int = 16,
        range_part_size: int = 16 * MiB,
        range_threads: int = 4,
    ):
        if not bucket or "/" in bucket:
            raise StoreError(f"bad S3 bucket name {bucket!r}")
        if part_size < S3_MIN_PART_SIZE:
            raise StoreError(f"part_size {part_size} is below S3's minimum part size of {S3_MIN_PART_SIZE} bytes")
        if retries < 0:
            raise StoreError("retries must be >= 0")
        self.bucket = bucket
        self.prefix = _check_prefix(prefix)
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.multipart_threshold = max(multipart_threshold, 0)
        self.part_size = part_size
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.create_bucket = create_bucket
        self.verify_etag = verify_etag
        self.max_pool_connections = max_pool_connections
        self.range_part_size = max(int(range_part_size), 1)
        self.range_threads = max(int(range_threads), 1)
        self._client = None
        self._lock = threading.Lock()
        self.retry_count = 0  # retries this process made (for reports and tests)

    # -- identity, pickling ---------------------------------------------------------------

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        where = f", endpoint={_redact_url(self.endpoint_url)!r}" if self.endpoint_url else ""
        return f"S3Store({self.root!r}{where})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"] = None
        state["_lock"] = None
        state["retry_count"] = 0
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- client ---------------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self.root} at {_redact_url(self.endpoint_url) or 'the default AWS endpoint'}"

    def client(self):
        """The boto3 S3 client of this process, made on first use (and the bucket checked)."""
        if self._client is not None:
            return self._client
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
        return self._client

    def _make_client(self):
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        creds = session.get_credentials()
        if creds is None:
            raise StoreError(
                f"no AWS credentials for {self._where()}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE / an instance role) in the environment of every process that uses the store"
            )
        self._cred_source = getattr(creds, "method", None) or "unknown source"
        config = Config(
            region_name=self.region,
            # one retry layer, ours: it also covers body reads and checksums, and counts attempts
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            max_pool_connections=self.max_pool_connections,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
        )
        client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        self._check_bucket(client)
        return client

    def _check_bucket(self, client) -> None:
        from botocore.exceptions import ClientError

        try:
            self._retrying(f"check bucket {self.bucket!r}", lambda: client.head_bucket(Bucket=self.bucket))
            return
        except StoreError as err:
            cause = err.__cause__
            if isinstance(cause, ClientError) and self._status(cause) == 403:
                # HEAD answers 403 without a reason: bad credentials, or a role scoped to a prefix
                # without s3:ListBucket. Go on; the first real request names the reason if it fails.
                log.debug("HEAD on bucket %s answered 403; checking on first use instead", self.bucket)
                return
            if not isinstance(cause, ClientError) or self._status(cause) != 404:
                raise
        if not self.create_bucket:
            raise StoreError(
                f"bucket {self.bucket!r} does not exist at {_redact_url(self.endpoint_url) or 'AWS'}: "
                "create it first, or pass create_bucket=True"
            )
        log.info("creating bucket %s", self.bucket)

        def create():
            try:
                client.create_bucket(Bucket=self.bucket)
            except ClientError as err:
                if self._code(err) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._retrying(f"create bucket {self.bucket!r}", create)

    # -- error handling -------------------------------------------------------------------

    @staticmethod
    def _code(err) -> str:
        return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))

    @staticmethod
    def _status(err) -> int:
        return int(getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)

    def _is_transient(self, err: BaseException) -> bool:
        from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, ResponseStreamingError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from urllib3.exceptions import HTTPError as Urllib3Error

        if isinstance(err, ClientError):
            status = self._status(err)
            return self._code(err) in _RETRY_CODES or status >= 500 or status == 429
        return isinstance(
            err,
            _Transient
            | HTTPClientError
            | BotoConnectionError
            | IncompleteReadError
            | ResponseStreamingError
            | Urllib3Error
            | ConnectionError
            | TimeoutError,
        )

    def _describe(self, err: BaseException) -> str:
        """One line about a failure, with nothing from the credentials in it."""
        from botocore.exceptions import ClientError

        if isinstance(err, ClientError):
            error, status = err.response.get("Error", {}), self._status(err)
            code = "" if str(error.get("Code", "")) == str(status) else f" {error.get('Code', '')}"
            return redact(f"HTTP {status}{code}: {error.get('Message', '')}".strip())
        return redact(f"{type(err).__name__}: {err}")

    def _final_error(self, what: str, err: BaseException, attempts: int) -> StoreError:
        from botocore.exceptions import ClientError, EndpointConnectionError

        if isinstance(err, StoreError):
            return err
        if isinstance(err, ClientError):
            code, status = self._code(err), self._status(err)
            if code in ("NoSuchKey", "404") or (status == 404 and code not in ("NoSuchBucket", "NoSuchUpload")):
                return ObjectNotFound(f"{what}: no such object in {self._where()}")
            if code == "NoSuchBucket":
                return StoreError(f"{what}: bucket {self.bucket!r} does not exist at {self._where()}")
            if code in _CREDENTIAL_CODES or status == 403:
                return StoreError(
                    f"{what}: S3 refused the request ({self._describe(err)}); check the credentials "
                    f"(from {getattr(self, '_cred_source', 'the environment')}) and their permissions on "
                    f"bucket {self.bucket!r} at {_redact_url(self.endpoint_url) or 'AWS'}"
                )
        if isinstance(err, EndpointConnectionError):
            return StoreError(
                f"{what}: cannot reach the S3 endpoint {_redact_url(self.endpoint_url) or 'AWS'} "
                f"after {attempts} attempt(s): check the endpoint URL (AWS_ENDPOINT_URL) and the network"
            )
        tail = f" after {attempts} attempts" if attempts > 1 else ""
        return StoreError(f"{what} failed{tail} ({self._describe(err)}) in {self._where()}")

    def _retrying(self, what: str, fn):
        """``fn()`` with up to ``retries`` retries on transient failures; a StoreError past that."""
        budget = self.retries
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except StoreError:
                raise
            except Exception as err:
                if not self._is_transient(err) or attempt > budget:
                    raise self._final_error(what, err, attempt) from err
                delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                self.retry_count += 1
                log.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.2fs",
                    what,
                    attempt,
                    budget + 1,
                    self._describe(err),
                    delay,
                )
                time.sleep(delay)

    # -- keys -----------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- the interface --------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, sha256: str | None = None) -> None:
        """Upload ``data`` under ``key`` with its sha256 as metadata (``sha256``: its digest
        where the caller has it already); multipart past ``multipart_threshold``."""
        full = self._key(key)
        data = bytes(data)
        client = self.client()
        digest = sha256 or sha256_bytes(data)
        if len(data) > self.multipart_threshold and len(data) > self.part_size:
            self._put_multipart(client, key, full, data, digest)
            return
        md5 = hashlib.md5(data)

        def put():
            response = client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=data,
                ContentMD5=base64.b64encode(md5.digest()).decode(),
                Metadata={SHA256_META: digest},
            )
            self._check_etag(response.get("ETag"), md5.hexdigest())

        self._retrying(f"put {key!r}", put)

    def _check_etag(self, etag: str | None, expected: str) -> None:
        if self.verify_etag and etag is not None and etag.strip('"') != expected:
            raise _Transient(f"server stored ETag {etag} but the bytes sent have {expected}")

    def _put_multipart(self, client, key: str, full: str, data: bytes, digest: str) -> None:
        from botocore.exceptions import ClientError

        upload_id = self._retrying(
            f"start multipart upload of {key!r}",
            lambda: client.create_multipart_upload(Bucket=self.bucket, Key=full, Metadata={SHA256_META: digest})[
                "UploadId"
            ],
        )
        try:
            parts, md5s = [], []
            for number, offset in enumerate(range(0, len(data), self.part_size), start=1):
                chunk = data[offset : offset + self.part_size]
                md5 = hashlib.md5(chunk)

                def upload(chunk=chunk, md5=md5, number=number):
                    response = client.upload_part(
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ContentMD5=base64.b64encode(md5.digest()).decode(),
                    )
                    self._check_etag(response.get("ETag"), md5.hexdigest())
                    return response["ETag"]

                parts.append({"PartNumber": number, "ETag": self._retrying(f"upload part {number} of {key!r}", upload)})
                md5s.append(md5.digest())
            expected = _multipart_etag(md5s)
            tries = 0

            def complete():
                nonlocal tries
                tries += 1
                try:
                    response = client.complete_multipart_upload(
                        Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
                    )
                except ClientError as err:
                    # an earlier attempt completed it but its answer was lost: check what is stored
                    if tries > 1 and self._code(err) == "NoSuchUpload":
                        head = client.head_object(Bucket=self.bucket, Key=full)
                        if head.get("Metadata", {}).get(SHA256_META) == digest and head["ContentLength"] == len(data):
                            self._check_etag(head.get("ETag"), expected)
                            return
                    raise
                self._check_etag(response.get("ETag"), expected)

            self._retrying(f"complete multipart upload of {key!r}", complete)
        except BaseException:
            try:
                client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except Exception as err:  # best effort: a lifecycle rule cleans up what is left
                log.warning("could not abort the multipart upload of %r: %s", key, self._describe(err))
            raise

    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        """The object's bytes, checked against the sha256 recorded when strata wrote it.

        ``verify=False``: an input strata did not write (no recorded sha256); its length is
        checked, and its ETag where that is a plain MD5 (a single-part upload without KMS).
        """
        return self._get_checked(key, self._sha256_problem if verify else self._etag_problem)

    def _sha256_problem(self, what: str, response: dict, data: bytes) -> str | None:
        """Why ``data`` is not the object strata wrote (its recorded sha256), or None."""
        expected = response.get("Metadata", {}).get(SHA256_META)
        if expected is None:
            raise ChecksumError(
                f"{what}: object in {self._where()} has no recorded sha256 (x-amz-meta-{SHA256_META}); "
                "it was not written by strata: delete it and redo the step that wrote it"
            )
        actual = sha256_bytes(data)
        return None if actual == expected else f"sha256 of the bytes read is {actual}, recorded {expected}"

    def _etag_problem(self, what: str, response: dict, data: bytes) -> str | None:
        """For an input strata did not write: a mismatch with its ETag where that is a plain MD5
        (a single-part upload without KMS), else None."""
        etag = str(response.get("ETag", "")).strip('"')
        if not (self.verify_etag and len(etag) == 32 and "-" not in etag):
            return None
        actual = hashlib.md5(data).hexdigest()
        return None if actual == etag else f"MD5 of the bytes read is {actual}, ETag {etag}"

    def _get_checked(self, key: str, problem_of) -> bytes:
        """A whole-object GET, retried; a short body or a checksum mismatch (``problem_of``) is
        transient until it survives fresh reads, then the stored object is taken as corrupt."""
        full = self._key(key)
        client = self.client()
        what = f"get {key!r}"
        mismatches = 0

        def get():
            nonlocal mismatches
            response = client.get_object(Bucket=self.bucket, Key=full)
            body = response["Body"]
            try:
                data = body.read()  # botocore raises IncompleteReadError on a short body
            finally:
                body.close()
            if "ContentLength" in response and len(data) != response["ContentLength"]:
                raise _Transient(f"body truncated: {len(data)} of {response['ContentLength']} bytes")
            problem = problem_of(what, response, data)
            if problem is not None:
                mismatches += 1
                # a mismatch that survives fresh reads is the stored object, not the network
                if mismatches > min(2, self.retries):
                    raise ChecksumError(
                        f"{what}: object in {self._where()} is corrupt: {problem} ({mismatches} reads); "
                        "delete it and redo the step that wrote it"
                    )
                raise _Transient(problem)
            return data

        return self._retrying(what, get)

    def stat(self, key: str) -> ObjectInfo:
        """Size and ETag of an object (a HEAD); ObjectNotFound if there is none."""
        full = self._key(key)
        client = self.client()
        head = self._retrying(f"stat {key!r}", lambda: client.head_object(Bucket=self.bucket, Key=full))
        return ObjectInfo(int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))

    def get_range(self, key: str, start: int, end: int, *, etag: str | None = None) -> bytes:
        """Bytes [start, end) of an object (HTTP range GETs; no checksum: a range cannot be checked
        against the whole object's sha256). With ``etag``, a StoreError if the object changed."""
        _check_range(key, start, end)
        out = bytearray(end - start)
        self.readinto_range(key, start, memoryview(out), etag=etag)
        return bytes(out)

    def readinto_range(self, key: str, start: int, out: memoryview, *, etag: str | None = None) -> None:
        """Fill ``out`` with the object's bytes from ``start`` on: one range GET per part of at
        most ``range_part_size`` bytes, up to ``range_threads`` at a time."""
        end = start + len(out)
        _check_range(key, start, end)
        if start == end:
            return
        parts = [(a, min(a + self.range_part_size, end)) for a in range(start, end, self.range_part_size)]
        if len(parts) == 1:
            self._get_part(key, start, end, out, etag)
            return
        with ThreadPoolExecutor(min(self.range_threads, len(parts)), thread_name_prefix="strata-range") as pool:
            futures = [pool.submit(self._get_part, key, a, b, out[a - start : b - start], etag) for a, b in parts]
            for future in futures:
                future.result()

    def _get_part(self, key: str, start: int, end: int, out: memoryview, etag: str | None) -> None:
        from botocore.exceptions import ClientError

        full = self._key(key)
        client = self.client()
        what = f"get bytes {start}-{end - 1} of {key!r}"

        def get():
            kwargs = {"Bucket": self.bucket, "Key": full, "Range": f"bytes={start}-{end - 1}"}
            if etag:
                kwargs["IfMatch"] = f'"{etag}"'
            try:
                response = client.get_object(**kwargs)
            except ClientError as err:
                code, status = self._code(err), self._status(err)
                if code == "PreconditionFailed" or status == 412:
                    raise StoreError(
                        f"{what}: the object in {self._where()} changed while it was being read "
                        f"(its ETag is no longer {etag}); start again"
                    ) from None
                if code == "InvalidRange" or status == 416:
                    raise StoreError(f"{what}: the object in {self._where()} is shorter than that") from None
                raise
            body = response["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            if len(data) != end - start:
                if response.get("ContentLength") == len(data) and len(data) < end - start:
                    raise StoreError(
                        f"{what}: the object in {self._where()} ends after {len(data)} of the {end - start} bytes"
                    )
                raise _Transient(f"range body has {len(data)} bytes, asked for {end - start}")
            got = str(response.get("ContentRange", ""))
            if got and not got.startswith(f"bytes {start}-{end - 1}/"):
                raise _Transient(f"the server answered range {got!r} to bytes {start}-{end - 1}")
            out[:] = data

        self._retrying(what, get)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        full = self._key(key)
        client = self.client()

        def head():
            try:
                client.head_object(Bucket=self.bucket, Key=full)
                return True
            except ClientError as err:
                if self._status(err) == 404 or self._code(err) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._retrying(f"exists {key!r}", head)

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.list_info(prefix))

    def list_info(self, prefix: str = "") -> dict[str, ObjectInfo]:
        """Every key under ``prefix`` with its size and ETag (one LIST per 1000 keys)."""
        prefix = _check_prefix(prefix)
        folder = "/".join(p for p in (self.prefix, prefix) if p)
        query = f"{folder}/" if folder else ""
        strip = len(f"{self.prefix}/") if self.prefix else 0
        client = self.client()
        out, token = {}, None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": query}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._retrying(f"list {prefix!r}", lambda kwargs=kwargs: client.list_objects_v2(**kwargs))
            for obj in page.get("Contents", []):
                out[obj["Key"][strip:]] = ObjectInfo(int(obj.get("Size", 0)), str(obj.get("ETag", "")).strip('"'))
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        return dict(sorted(out.items()))

    def put_json(self, key: str, obj) -> None:
        self.put_bytes(key, _json_bytes(obj))

    def get_json(self, key: str):
        return json.loads(self.get_bytes(key))


def s3_object(uri: str, **options) -> tuple[S3Store, str]:
    """The store of an ``s3://bucket/key`` URI's bucket (options go to S3Store; endpoint and
    credentials from the environment) and the key in it ('' for the bucket itself)."""
    rest = uri[len("s3://") :] if uri.startswith("s3://") else ""
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StoreError(f"no bucket in {uri!r}; write s3://bucket/key")
    return S3Store(bucket, **options), key.strip("/")


def open_store(location: str, **options):
    """A store for a location string: ``s3://bucket[/prefix]`` (options go to S3Store) or a local folder."""
    if location.startswith("s3://"):
        rest = location[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"no bucket in {location!r}; write s3://bucket/prefix")
        return S3Store(bucket, prefix, **options)
    if options:
        raise StoreError(f"options {sorted(options)} only apply to s3:// stores")
    return LocalStore(location)
