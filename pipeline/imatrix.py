"""`strata imatrix RUN`: a run's activation statistics as llama.cpp's importance matrix.

Workers store, beside each GPTQ result, in_sum2[k] = Σ_t x_tk² over all calibration tokens of
the linear's input (workers/records.py, ``activations`` in the record entry). llama-quantize reads
the importance of input k as in_sum2[k] / count, the mean square activation. Two files, as
tools/imatrix/imatrix.cpp writes them (llama.cpp of the llama-cpp-python 0.3.36 sdist):

* GGUF (current): KV general.type = "imatrix", imatrix.datasets [str], imatrix.chunk_count
  and imatrix.chunk_size (u32); per weight tensor ``<gguf name>.in_sum2`` F32 [K, 1] (ggml
  order) and ``<gguf name>.counts`` F32 [1, 1], sorted by name;
* legacy .dat: i32 entry count; per entry (sorted) i32 name length, name, i32 ncall, i32 K,
  f32 mean·ncall [K]; then i32 chunk count, i32 dataset-name length and the name.

Tensor names are the GGUF names the model's llama.cpp file uses (blk.N.attn_q.weight, …).
The output head and the token embedding have no statistics (the run does not quantize them);
llama-quantize quantizes tensors without an entry as it would without an imatrix.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np

from strata_quant.pipeline.config import ConfigError


def run_activations(store, run_id: str) -> tuple[dict, dict[str, tuple[np.ndarray, int]]]:
    """The run's config and {GGUF tensor name: (in_sum2 float32 [K], tokens)}, hash-checked."""
    from safetensors.torch import load as load_safetensors

    from strata_quant.pipeline.formats.gguf import hf_to_gguf_name
    from strata_quant.pipeline.run import recorded_entries

    run, entries = recorded_entries(store, run_id)
    missing = [n for n, e in entries.items() if not e.get("activations")]
    if missing:
        raise ConfigError(
            f"run {run_id!r} stored no activation statistics for {len(missing)} linear(s) (e.g. {missing[0]}): "
            "they come with GPTQ solves (quant.method gptq) of runs that record them"
        )
    out: dict[str, tuple[np.ndarray, int]] = {}
    for name, entry in entries.items():
        act = entry["activations"]
        data = store.get_bytes(act["key"])
        if hashlib.sha256(data).hexdigest() != act["sha256"]:
            raise ConfigError(f"stored activation statistics {act['key']} do not match their record")
        gguf_name = hf_to_gguf_name(f"{name}.weight")
        if gguf_name is None:
            raise ConfigError(f"no GGUF tensor name for {name}")
        values = load_safetensors(data)[f"{name}.in_sum2"].float().numpy()
        out[gguf_name] = (values, int(act["tokens"]))
    return run["config"], out


def write_imatrix_gguf(path: Path, stats: dict[str, tuple[np.ndarray, int]], *, dataset: str, chunks: int,
                       chunk_size: int) -> Path:  # fmt: skip
    """The GGUF importance matrix llama-imatrix writes (see the module docstring)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="imatrix")
    for kv in writer.kv_data:
        kv.pop("general.architecture", None)  # llama-imatrix writes none; general.type says what it is
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(stats):
        values, tokens = stats[name]
        writer.add_tensor(f"{name}.in_sum2", values.astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[float(tokens)]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_imatrix_dat(path: Path, stats: dict[str, tuple[np.ndarray, int]], *, dataset: str, chunks: int) -> Path:
    """The legacy .dat importance matrix (means × ncall per entry, ncall = the chunk count)."""
    ncall = max(1, chunks)
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(stats)))
        for name in sorted(stats):
            values, tokens = stats[name]
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw)
            f.write(struct.pack("<ii", ncall, values.size))
            mean = values.astype(np.float64) / max(tokens, 1)
            f.write((mean * ncall).astype("<f4").tobytes())
        raw = dataset.encode()
        f.write(struct.pack("<ii", chunks, len(raw)) + raw)
    return path


def write_imatrix(store, run_id: str, path: Path, *, legacy: bool = False) -> Path:
    """The run's importance matrix at ``path`` (GGUF, or the legacy .dat with ``legacy``)."""
    config, stats = run_activations(store, run_id)
    cal = config.get("calibration", {})
    dataset = str(cal.get("source", ""))
    chunks, chunk_size = int(cal.get("num_samples", 0)), int(cal.get("seq_len", 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        return write_imatrix_dat(path, stats, dataset=dataset, chunks=chunks)
    return write_imatrix_gguf(path, stats, dataset=dataset, chunks=chunks, chunk_size=chunk_size)
