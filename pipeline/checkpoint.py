"""Lazy reads of a safetensors checkpoint: metadata up front, one block's tensors on demand."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


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
        self.config: dict = json.loads(config_path.read_text())
        archs = set(self.config.get("architectures") or [])
        if not archs & SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {sorted(archs) or '(none)'}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", "pt") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        else:
            raise CheckpointError(f"model folder {str(self.path)!r} has no safetensors weights")
        for file in set(weight_map.values()):
            if not (self.path / file).is_file():
                raise CheckpointError(f"shard {file!r} named by the index is missing")
        self.weight_map: dict[str, str] = weight_map
        self.num_layers = int(self.config["num_hidden_layers"])

    def __getstate__(self):
        return self.__dict__

    @property
    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def block_names(self, b: int, layers_path: str = "model.layers") -> list[str]:
        pattern = re.compile(rf"^{re.escape(layers_path)}\.{b}\.")
        return [n for n in self.weight_map if pattern.match(n)]

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"tensor {name!r} is not in the checkpoint")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(self.path / file, "pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the safetensors header, without reading its data."""
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint")
        with safe_open(self.path / self.weight_map[name], "pt") as f:
            return tuple(f.get_slice(name).get_shape())

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
