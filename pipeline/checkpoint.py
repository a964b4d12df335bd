"""Lazy reads of a safetensors checkpoint: metadata up front, one block's tensors on demand."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}

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
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


class CheckpointError(ValueError):
    pass


class CheckpointReader:
    """Reads config.json and the safetensors index; loads tensors by name with mmap.

    Holds only paths and the name → file map, so it is cheap to send to every worker.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model path {str(self.path)!r} is not a folder")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"model folder {str(self.path)!r} has no config.json")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"config.json of {str(self.path)!r} is not valid JSON: {err}") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"config.json of {str(self.path)!r} is not a JSON object")
        archs = set(self.config.get("architectures") or [])
        if not archs & SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {sorted(archs) or '(none)'}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map is not a mapping of tensor name to file")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index.name} of {str(self.path)!r} is not a valid index: {err}") from None
            for file in set(weight_map.values()):
                if "/" in file or "\\" in file or file.startswith("."):
                    raise CheckpointError(f"{index.name} names a shard outside the model folder: {file!r}")
        elif (self.path / "model.safetensors").is_file():
            weight_map = {name: "model.safetensors" for name in read_header(self.path / "model.safetensors")}
        else:
            raise CheckpointError(f"model folder {str(self.path)!r} has no safetensors weights")
        for file in set(weight_map.values()):
            if not (self.path / file).is_file():
                raise CheckpointError(f"shard {file!r} named by the index is missing")
        # every shard's header, checked up front: a damaged shard fails the plan, not block 57
        self.tensor_info: dict[str, tuple[str, tuple[int, ...]]] = {}
        for file in sorted(set(weight_map.values())):
            header = read_header(self.path / file)
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
                self.tensor_info[name] = header[name]
        self.weight_map: dict[str, str] = weight_map
        try:
            self.num_layers = int(self.config["num_hidden_layers"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"config.json of {str(self.path)!r} has no valid num_hidden_layers") from None

    def __getstate__(self):
        return self.__dict__

    @property
    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def block_names(self, b: int, layers_path: str = "model.layers") -> list[str]:
        pattern = re.compile(rf"^{re.escape(layers_path)}\.{b}\.")
        return [n for n in self.weight_map if pattern.match(n)]

    def load(self, names: list[str], check_finite: bool = True) -> dict[str, torch.Tensor]:
        """The named tensors; with ``check_finite`` a CheckpointError for any NaN or Inf in them."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"tensor {name!r} is not in the checkpoint")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(self.path / file, "pt") as f:
                    for name in file_names:
                        out[name] = f.get_tensor(name)
            except (OSError, SafetensorError) as err:
                raise CheckpointError(f"cannot read shard {file!r} of {str(self.path)!r}: {err}") from None
        if check_finite:
            for name, t in out.items():
                if t.is_floating_point():
                    bad = int((~torch.isfinite(t)).sum())
                    if bad:
                        raise CheckpointError(
                            f"tensor {name!r} (shard {self.weight_map[name]!r}) holds {bad} NaN/Inf value(s) "
                            f"of {t.numel()}; the checkpoint is damaged: nothing of it was quantized"
                        )
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the safetensors header, without reading its data."""
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint")
        return self.tensor_info[name][1]

    def load_block(self, b: int, layers_path: str = "model.layers") -> dict[str, torch.Tensor]:
        names = self.block_names(b, layers_path)
        if not names:
            raise CheckpointError(f"checkpoint has no tensors for block {b}")
        return self.load(names)

    def fingerprint(self) -> str:
        """Hash of config.json and every shard's safetensors header (names, dtypes, shapes, offsets)."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for file in sorted(set(self.weight_map.values())):
            with open(self.path / file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(n))
        return h.hexdigest()


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A safetensors file's tensors (name → (dtype, shape)), after checking that the header is
    sane: its length fits the file, it parses as JSON, and every tensor's data_offsets lie inside
    the data section and match its dtype and shape. A truncated or damaged shard fails here."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"shard {name!r} is {size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"shard {name!r} is not a valid safetensors file: its header claims {n} bytes, "
                    f"the file has {size} (truncated or damaged)"
                )
            raw = f.read(n)
    except OSError as err:
        raise CheckpointError(f"cannot read shard {name!r}: {err.strerror or err}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"shard {name!r} has a corrupt safetensors header (not JSON: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {name!r} has a corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
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
        out[tensor] = (dtype, shape)
    return out
