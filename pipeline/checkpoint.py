"""Lazy reads of a safetensors checkpoint: metadata up front, one block's tensors on demand.

A checkpoint is a local folder or an ``s3://bucket/prefix``. Either way there is one code path
for tensor bytes: every shard's header (8-byte length + JSON) is read once, when the reader is
made, into a table of each tensor's byte range in its shard; a tensor is then read as exactly
that byte range — locally with ``os.pread`` (no mmap, so nothing of the file stays mapped in
the process), on S3 with HTTP range GETs — and the ranges of one block that lie next to each
other in a shard are read as one. No shard is ever downloaded whole.

The small files of an ``s3://`` checkpoint (config.json, the index, tokenizer files,
generation_config.json, the chat template) are downloaded once into a local folder (cached
under ``$STRATA_CACHE/s3-meta``, keyed by the URI and the files' ETags) that ``reader.path``
points at, so code that reads the config or the tokenizer from ``reader.path`` works for both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from strata_quant.pipeline.store import ObjectInfo, S3Store, StoreError, pread_into, s3_object

# bytes per element of the safetensors dtypes
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
HEADER_PROBE_BYTES = 64 << 10  # the first read of a shard: its length and, mostly, its whole header
COALESCE_GAP_BYTES = 64 << 10  # ranges of one read this close are read as one (the gap is read and dropped)
# files of an s3:// checkpoint that are never fetched into the metadata folder
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
META_MAX_BYTES = 64 << 20


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class ReadRange:
    """One read: bytes [start, end) of ``file``, holding ``names`` (sorted by offset)."""

    file: str
    start: int
    end: int
    names: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def coalesce(spans: list[tuple[str, int, int]], file: str, gap: int = COALESCE_GAP_BYTES) -> list[ReadRange]:
    """The reads that cover ``spans`` (name, start, end) of one file: sorted by offset, and a span
    that starts at most ``gap`` bytes after the previous read ends joins that read."""
    out: list[ReadRange] = []
    start = end = -1
    names: list[str] = []
    for name, s, e in sorted(spans, key=lambda x: (x[1], x[2], x[0])):
        if names and s - end <= gap:
            end = max(end, e)
            names.append(name)
            continue
        if names:
            out.append(ReadRange(file, start, end, tuple(names)))
        start, end, names = s, e, [name]
    if names:
        out.append(ReadRange(file, start, end, tuple(names)))
    return out


def is_s3(location) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


class CheckpointReader:
    """Reads config.json and the safetensors index; loads tensors by name as byte ranges.

    ``path``: a local folder or ``s3://bucket/prefix``. Holds only the location, the
    name → file map and each tensor's byte range (and, for S3, a store that pickles without
    its client or any credential), so it is cheap to send to every worker.
    """

    def __init__(self, path: str | Path, *, coalesce_gap: int = COALESCE_GAP_BYTES):
        self.coalesce_gap = coalesce_gap
        self.source: S3Store | None = None
        self.shards: dict[str, ObjectInfo] = {}
        if is_s3(path):
            self.uri = str(path).rstrip("/")
            try:
                store, prefix = s3_object(self.uri)
                self.source = S3Store(store.bucket, prefix)
                objects = {k: v for k, v in self.source.list_info().items() if "/" not in k and not k.startswith(".")}
            except StoreError as err:
                raise CheckpointError(f"cannot read the model {self.uri}: {err}") from None
            if not objects:
                raise CheckpointError(f"model location {self.uri!r} holds no objects (is the prefix right?)")
            self.path = _fetch_metadata(self.source, self.uri, objects)
            self.shards = {k: v for k, v in objects.items() if k.endswith(".safetensors")}
        else:
            self.path = Path(path)
            self.uri = str(self.path)
            if not self.path.is_dir():
                raise CheckpointError(f"model path {self.uri!r} is not a folder")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"model folder {self.uri!r} has no config.json")
        config_bytes = config_path.read_bytes()
        try:
            self.config: dict = json.loads(config_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"config.json of {self.uri!r} is not valid JSON: {err}") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"config.json of {self.uri!r} is not a JSON object")
        # which architectures are supported is decided by tracing the model's own decoder layer
        # (pipeline.structure.check_block_structure); here only that config.json names one
        if not self.config.get("architectures"):
            raise CheckpointError(f"config.json of {self.uri!r} names no architectures")
        index = self.path / "model.safetensors.index.json"
        headers: dict[str, tuple[bytes, dict]] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map is not a mapping of tensor name to file")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index.name} of {self.uri!r} is not a valid index: {err}") from None
            for file in set(weight_map.values()):
                if "/" in file or "\\" in file or file.startswith("."):
                    raise CheckpointError(f"{index.name} names a shard outside the model folder: {file!r}")
        elif self._has_shard("model.safetensors"):
            headers["model.safetensors"] = self._read_header("model.safetensors")
            weight_map = dict.fromkeys(headers["model.safetensors"][1], "model.safetensors")
        else:
            raise CheckpointError(f"model folder {self.uri!r} has no safetensors weights")
        for file in set(weight_map.values()):
            if not self._has_shard(file):
                raise CheckpointError(f"shard {file!r} named by the index is missing")
        # every shard's header, checked up front: a damaged shard fails the plan, not block 57
        self.tensor_info: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.spans: dict[str, tuple[int, int]] = {}  # byte range of each tensor in its shard file
        fingerprint = hashlib.sha256(config_bytes)
        for file in sorted(set(weight_map.values())):
            raw, header = headers.get(file) or self._read_header(file)
            fingerprint.update(raw)
            listed = {n for n, f in weight_map.items() if f == file}
            absent = sorted(listed - set(header))
            if absent:
                raise CheckpointError(
                    f"the index names {len(absent)} tensor(s) in shard {file!r} that the shard does not hold: "
                    f"{', '.join(absent[:5])}{' …' if len(absent) > 5 else ''}"
                )
            unlisted = sorted(n for n in header if n not in weight_map)
            if unlisted:
                raise CheckpointError(
                    f"shard {file!r} holds {len(unlisted)} tensor(s) the index does not list: "
                    f"{', '.join(unlisted[:5])}{' …' if len(unlisted) > 5 else ''}; the index is incomplete"
                )
            for name in listed:
                dtype, shape, start, end = header[name]
                self.tensor_info[name] = (dtype, shape)
                self.spans[name] = (start, end)
        self.weight_map: dict[str, str] = weight_map
        self._fingerprint = fingerprint.hexdigest()
        try:
            self.num_layers = int(self.config["num_hidden_layers"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"config.json of {self.uri!r} has no valid num_hidden_layers") from None
        self.bytes_read = 0  # tensor bytes this process read through this reader (for tests and reports)
        self._init_prefetch()

    # -- pickling: the table and the location, never a thread or a client ----------------

    def _init_prefetch(self) -> None:
        self._lock = threading.Lock()
        self._pending: tuple[tuple[int, str], Future] | None = None
        self._block_digests: dict[int, dict[str, str]] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_lock", "_pending", "_block_digests"):
            state.pop(key, None)
        state["bytes_read"] = 0
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_prefetch()

    # -- raw access ----------------------------------------------------------------------

    def _has_shard(self, file: str) -> bool:
        return file in self.shards if self.source is not None else (self.path / file).is_file()

    def _read_into(self, file: str, start: int, out: memoryview) -> None:
        """Bytes of ``file`` from ``start`` into ``out``; CheckpointError if they cannot be read."""
        try:
            if self.source is not None:
                self.source.readinto_range(file, start, out, etag=self.shards[file].etag or None)
                return
            fd = os.open(self.path / file, os.O_RDONLY)
            try:
                pread_into(fd, start, out, what=f"shard {file!r}")
            finally:
                os.close(fd)
        except (OSError, StoreError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise CheckpointError(f"cannot read shard {file!r} of {self.uri!r}: {reason}") from None

    def _shard_size(self, file: str) -> int:
        if self.source is not None:
            return self.shards[file].size
        try:
            return (self.path / file).stat().st_size
        except OSError as err:
            raise CheckpointError(f"cannot read shard {file!r}: {err.strerror or err}") from None

    def _read_header(self, file: str) -> tuple[bytes, dict[str, tuple[str, tuple[int, ...], int, int]]]:
        size = self._shard_size(file)

        def read(start: int, end: int) -> bytes:
            buf = bytearray(end - start)
            self._read_into(file, start, memoryview(buf))
            return bytes(buf)

        return parse_header(file, size, read)

    # -- tensors -------------------------------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def block_names(self, b: int, layers_path: str = "model.layers") -> list[str]:
        pattern = re.compile(rf"^{re.escape(layers_path)}\.{b}\.")
        return [n for n in self.weight_map if pattern.match(n)]

    def plan(self, names: list[str]) -> list[ReadRange]:
        """The reads that load ``names``: per shard, byte ranges next to each other joined into one."""
        by_file: dict[str, list[tuple[str, int, int]]] = {}
        for name in dict.fromkeys(names):
            if name not in self.weight_map:
                raise CheckpointError(f"tensor {name!r} is not in the checkpoint")
            by_file.setdefault(self.weight_map[name], []).append((name, *self.spans[name]))
        return [r for file in sorted(by_file) for r in coalesce(by_file[file], file, self.coalesce_gap)]

    def load(
        self, names: list[str], check_finite: bool = True, digests: dict[str, str] | None = None
    ) -> dict[str, torch.Tensor]:
        """The named tensors; with ``check_finite`` a CheckpointError for any NaN or Inf in them.
        ``digests`` (a dict) receives each tensor's sha256 over its bytes as read from the shard."""
        out = {}
        for read in self.plan(names):
            buf = torch.empty(read.nbytes, dtype=torch.uint8)  # not zeroed: every byte is read into it
            self._read_into(read.file, read.start, memoryview(buf.numpy()))
            self.bytes_read += read.nbytes
            for name in read.names:
                start, end = self.spans[name]
                out[name] = self._tensor(name, buf, start - read.start)
                if digests is not None:  # hashlib lets go of the GIL: a prefetch hashes beside the solves
                    raw = memoryview(buf.numpy())[start - read.start : end - read.start]
                    digests[name] = hashlib.sha256(raw).hexdigest()
        out = {name: out[name] for name in dict.fromkeys(names)}
        if check_finite:
            for name, t in out.items():
                if t.is_floating_point():
                    bad = nonfinite_count(t)
                    if bad:
                        raise CheckpointError(
                            f"tensor {name!r} (shard {self.weight_map[name]!r}) holds {bad} NaN/Inf value(s) "
                            f"of {t.numel()}; the checkpoint is damaged: nothing of it was quantized"
                        )
        return out

    def _tensor(self, name: str, buf: torch.Tensor, offset: int) -> torch.Tensor:
        """Tensor ``name`` as a view of the bytes ``buf`` holds from ``offset`` on (a copy when
        the offset is not a multiple of its element size)."""
        dtype, shape = self.tensor_info[name]
        torch_dtype = TORCH_DTYPES.get(dtype)
        if torch_dtype is None:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which torch cannot load")
        start, end = self.spans[name]
        if start == end:
            return torch.empty(shape, dtype=torch_dtype)
        raw = buf[offset : offset + end - start]
        if offset % torch_dtype.itemsize:
            raw = raw.clone()
        return raw.view(torch_dtype).reshape(shape)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the safetensors header, without reading its data."""
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint")
        return self.tensor_info[name][1]

    def load_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of tensor ``name`` (along its first dimension), reading only their bytes."""
        dtype, shape = self.tensor_info[name]
        torch_dtype = TORCH_DTYPES.get(dtype)
        if torch_dtype is None:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which torch cannot load")
        row = math.prod(shape[1:]) * torch_dtype.itemsize
        buf = torch.empty((end - start) * row, dtype=torch.uint8)
        self._read_into(self.weight_map[name], self.spans[name][0] + start * row, memoryview(buf.numpy()))
        self.bytes_read += buf.numel()
        return buf.view(torch_dtype).reshape(end - start, *shape[1:])

    def num_params(self) -> int:
        """Parameters in the checkpoint, from the header table."""
        return sum(math.prod(shape) for _, shape in self.tensor_info.values())

    def block_bytes(self, b: int, layers_path: str = "model.layers") -> int:
        """Bytes of block ``b``'s tensors in the shards."""
        return sum(end - start for start, end in (self.spans[n] for n in self.block_names(b, layers_path)))

    # -- blocks and prefetch -------------------------------------------------------------

    # set on the copy of the one worker that fingerprints the blocks it reads (``take_block_digests``)
    hash_blocks: bool = False

    def _load_block_now(self, b: int, layers_path: str) -> dict[str, torch.Tensor]:
        names = self.block_names(b, layers_path)
        if not names:
            raise CheckpointError(f"checkpoint has no tensors for block {b}")
        digests: dict[str, str] | None = {} if self.hash_blocks else None
        tensors = self.load(names, digests=digests)
        if digests is not None:
            with self._lock:
                self._block_digests[b] = digests
        return tensors

    def take_block_digests(self, b: int) -> dict[str, str] | None:
        """The sha256 of each tensor of block ``b`` as it was last loaded (with ``hash_blocks``
        on), by tensor name; None when it was not hashed. Taken once."""
        with self._lock:
            return self._block_digests.pop(b, None)

    def prefetch_block(self, b: int, layers_path: str = "model.layers") -> None:
        """Start loading block ``b``'s tensors in a background thread; ``load_block(b)`` takes them.

        At most one block is prefetched: a prefetch of another block first waits for the
        pending one and drops it, so the reader holds at most the block in use plus one.
        A failure of the background load is raised by ``load_block(b)``.
        """
        key = (b, layers_path)
        with self._lock:
            pending = self._pending
            if pending is not None and pending[0] == key:
                return
            self._pending = None
        if pending is not None:
            pending[1].exception()  # wait, and drop it (errors included)
        future: Future = Future()

        def run():
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self._load_block_now(b, layers_path))
            except BaseException as err:
                future.set_exception(err)

        thread = threading.Thread(target=run, name=f"strata-prefetch-{b}", daemon=True)
        with self._lock:
            self._pending = (key, future)
        thread.start()

    def load_block(self, b: int, layers_path: str = "model.layers") -> dict[str, torch.Tensor]:
        """Block ``b``'s tensors: the prefetched ones when ``prefetch_block(b)`` came first."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            if pending[0] == (b, layers_path):
                return pending[1].result()
            pending[1].exception()  # another block's: wait for it and drop it
        return self._load_block_now(b, layers_path)

    def reference_model(self):
        """The whole model in float32 for evaluation (transformers' class for config.json, eval
        mode). A local folder loads as transformers loads it; an s3:// checkpoint from every
        tensor read through this reader (evaluation needs the whole model in memory anyway)."""
        if self.source is None:
            from strata_quant.pipeline.eval import load_reference

            return load_reference(self.path)
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.path)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
        state = self.load(self.tensor_names, check_finite=False)
        model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32)
        return model.eval()

    def fingerprint(self) -> str:
        """Hash of config.json and every shard's safetensors header (names, dtypes, shapes, offsets),
        taken from the bytes read when the reader was made (no shard data is read)."""
        return self._fingerprint


# values per isfinite() call: it allocates ~6.5 bytes per fp16 value, so 2^18 values stay under
# 2 MB (reused from the heap); a whole 384 MiB embedding cost 1.7 GB
FINITE_CHUNK = 1 << 18


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values a float tensor holds, checked FINITE_CHUNK values at a time.

    Each chunk is first screened by its sum: NaN and ±Inf carry through a sum (Inf − Inf is NaN),
    so a finite sum means a clean chunk, and only a chunk whose sum is not finite (a bad value,
    or finite values that overflow the accumulator) is counted value by value. A 16-bit chunk
    is summed in fp32 (2^18 fp16 values cannot overflow it), a wider one in fp64: 3–10× faster
    than isfinite() on every value, and every worker checks every block it loads. fp8 chunks
    are widened to fp32 first (exactly; isfinite has no fp8 kernels)."""
    flat = tensor.reshape(-1)
    accumulate = torch.float32 if tensor.element_size() <= 2 else torch.float64
    bad = 0
    step = FINITE_CHUNK
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        if chunk.element_size() == 1:
            chunk = chunk.float()
        if not torch.isfinite(chunk.sum(dtype=accumulate)):
            bad += chunk.numel() - int(torch.isfinite(chunk).sum())
    return bad


def open_checkpoint(ref: str | Path) -> CheckpointReader:
    """The reader of a job's ``model``: a local folder, ``fixture:NAME`` or ``s3://bucket/prefix``."""
    if is_s3(ref):
        return CheckpointReader(ref)
    from strata_quant.pipeline import fixtures

    return CheckpointReader(fixtures.resolve(str(ref)))


def parse_header(name: str, size: int, read) -> tuple[bytes, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """The raw header of a safetensors file of ``size`` bytes and its tensors (name → (dtype, shape,
    start, end), the byte range in the file), after checking that the header is sane: its length
    fits the file, it parses as JSON, and every tensor's data_offsets lie inside the data section
    and match its dtype and shape. ``read(start, end)`` gives bytes of the file. A truncated or
    damaged shard fails here."""
    if size < 8:
        raise CheckpointError(f"shard {name!r} is {size} bytes, too short for a safetensors header")
    head = read(0, min(size, 8 + HEADER_PROBE_BYTES))
    n = int.from_bytes(head[:8], "little")
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(
            f"shard {name!r} is not a valid safetensors file: its header claims {n} bytes, "
            f"the file has {size} (truncated or damaged)"
        )
    raw = head[8 : 8 + n] if 8 + n <= len(head) else head[8:] + read(len(head), 8 + n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"shard {name!r} has a corrupt safetensors header (not JSON: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {name!r} has a corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"shard {name!r}: header entry of {tensor!r} is malformed") from None
        if not 0 <= start <= end:
            raise CheckpointError(f"shard {name!r}: tensor {tensor!r} has bad data_offsets [{start}, {end}]")
        if end > data_len:
            raise CheckpointError(
                f"shard {name!r} is truncated: tensor {tensor!r} ends at byte {end} of the data section, "
                f"which holds {data_len} bytes"
            )
        width = DTYPE_BYTES.get(dtype)
        if width is not None and end - start != math.prod(shape) * width:
            raise CheckpointError(
                f"shard {name!r}: tensor {tensor!r} ({dtype} {list(shape)}) needs {math.prod(shape) * width} "
                f"bytes but its data_offsets span {end - start}"
            )
        out[tensor] = (dtype, shape, 8 + n + start, 8 + n + end)
    return raw, out


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A local safetensors file's tensors (name → (dtype, shape)), checked as ``parse_header`` does."""
    path = Path(path)
    try:
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise CheckpointError(f"cannot read shard {path.name!r}: {err.strerror or err}") from None

    def read(start: int, end: int) -> bytes:
        buf = bytearray(end - start)
        try:
            pread_into(fd, start, memoryview(buf), what=f"shard {path.name!r}")
        except (OSError, StoreError) as err:
            raise CheckpointError(f"cannot read shard {path.name!r}: {err}") from None
        return bytes(buf)

    try:
        _, header = parse_header(path.name, size, read)
    finally:
        os.close(fd)
    return {name: (dtype, shape) for name, (dtype, shape, _, _) in header.items()}


# ---------------------------------------------------------------------------------------------
# the small files of an s3:// checkpoint


def _meta_root() -> Path:
    from strata_quant.pipeline import fixtures

    return fixtures.cache_dir() / "s3-meta"


def _fetch_metadata(store: S3Store, uri: str, objects: dict[str, ObjectInfo]) -> Path:
    """A local folder with the checkpoint's small files (everything at the top of the prefix that is
    not a weights file and at most META_MAX_BYTES), downloaded once: the folder's name is a hash
    of the URI and every file's name, size and ETag, so a changed file means a fresh folder."""
    small = {
        k: v
        for k, v in objects.items()
        if not k.startswith(".") and not k.endswith(WEIGHT_SUFFIXES) and v.size <= META_MAX_BYTES
    }
    if "config.json" not in small:
        raise CheckpointError(f"model location {uri!r} has no config.json")
    digest = hashlib.sha256(
        json.dumps([uri, sorted((k, v.size, v.etag) for k, v in small.items())]).encode()
    ).hexdigest()[:24]
    root = _meta_root()
    folder = root / digest
    if (folder / ".strata-complete").is_file():
        return folder
    tmp = root / f".tmp-{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for key, info in small.items():
            try:
                data = store.get_bytes(key, verify=False)
            except StoreError as err:
                raise CheckpointError(f"cannot read {key!r} of the model {uri}: {err}") from None
            if len(data) != info.size:
                raise CheckpointError(f"{key!r} of the model {uri} changed while it was read; start again")
            (tmp / key).write_bytes(data)
        (tmp / ".strata-complete").write_text(json.dumps({"uri": uri, "files": sorted(small)}))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it first (or a stale incomplete folder is in the way)
            if not (folder / ".strata-complete").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
