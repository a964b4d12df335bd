"""Peak memory of assembling artifacts from a run of a synthetic model larger than 4 GB, and of
one half its size: the peak should be set by the largest tensor, not by the model.

    .venv/bin/python -m benchmarks.assemble_memory [--formats gptq,gguf] [--layers 11,5] [--keep]

Builds random Llamas (hidden 4096, FFN 11008, 32/8 heads, SmolLM2's 49152-token vocabulary;
11 blocks = 2.15 G parameters = 4.30 GB in fp16, and 5 blocks = 2.17 GB) in a temporary
folder, writes an RTN W4 g128 run record for each with the workers' own functions
(``rtn_quantize``, ``result_to_bytes``, one ``blocks/<b>/record.json`` per block in the run's
format; RTN needs no statistics, so this measures assembly, not solving), then assembles
each format in a fresh process and reports, for that process: the baseline after imports
and after reading the run's records, the peak RSS (VmHWM, reset to the baseline through
``/proc/self/clear_refs`` before assembling) and the peak anonymous memory (RssAnon, sampled
every 2 ms by a thread), both as growth over the baseline and against the largest tensor.
Everything it wrote is deleted at the end unless ``--keep``.

The module's helpers are used by ``tests/test_assemble_memory.py`` too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20

# run in a fresh interpreter: argv = format, model, store, run id, destination
ASSEMBLE = r"""
import json, sys, threading, time
from pathlib import Path

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out

fmt, model, store_root, run_id, dest = sys.argv[1:6]
from strata_quant.pipeline import assemble
from strata_quant.pipeline.checkpoint import CheckpointReader
from strata_quant.pipeline.run import load_records
from strata_quant.pipeline.store import open_store
if fmt == "gguf":
    from strata_quant.pipeline.formats import gguf  # noqa: F401  (imported lazily by assemble_gguf: part of the baseline)
imports = status()

store = open_store(store_root)
reader = CheckpointReader(model)
results = assemble.ResultSource(store, load_records(store, f"runs/{run_id}", reader.num_layers))
try:  # VmHWM back to the current RSS, so it measures the assembly alone
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
baseline = status()
peak_anon = [baseline["RssAnon"]]
done = threading.Event()

def sample():
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status()["RssAnon"])
        time.sleep(0.002)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
t = time.perf_counter()
cpu = time.process_time()
if fmt == "gguf":
    assemble.assemble_gguf(reader, results, Path(dest))
else:
    fn = {"gptq": assemble.assemble_gptq, "awq": assemble.assemble_awq,
          "compressed-tensors": assemble.assemble_compressed_tensors}[fmt]
    fn(reader, results, Path(dest), shard_size="1GB")
seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
done.set()
sampler.join()
end = status()
print(json.dumps({
    "seconds": seconds, "cpu_seconds": cpu, "hwm_reset": reset,
    "imports_rss": imports["VmRSS"], "imports_anon": imports["RssAnon"],
    "baseline_rss": baseline["VmRSS"], "baseline_anon": baseline["RssAnon"],
    "peak_rss": end["VmHWM"], "peak_anon": max(peak_anon[0], end["RssAnon"]),
}))
"""


def status_bytes() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def make_model(folder: Path, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> Path:
    from strata_quant.pipeline import fixtures

    return fixtures.synthetic_llama(
        folder, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads
    )


def largest_tensor_bytes(reader) -> tuple[str, int]:
    """The checkpoint's largest tensor: (name, bytes), from the safetensors headers."""
    from strata_quant.pipeline.checkpoint import DTYPE_BYTES

    sizes = {n: math.prod(shape) * DTYPE_BYTES[dtype] for n, (dtype, shape) in reader.tensor_info.items()}
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def write_rtn_run(model: Path, store_root: Path, run_id: str, *, bits: int = 4, group_size: int = 128) -> int:
    """An RTN run record of every decoder linear, as a run stores it (result objects, then
    each block's record.json last), made in this process without Ray. Returns the linears."""
    from strata_quant.pipeline.checkpoint import CheckpointReader
    from strata_quant.pipeline.store import open_store
    from strata_quant.workers.records import result_to_bytes
    from strata_quant.workers.result import QuantSpec
    from strata_quant.workers.rtn import rtn_quantize

    reader = CheckpointReader(model)
    store = open_store(str(store_root))
    spec = QuantSpec(bits=bits, group_size=group_size, sym=True)
    count = 0
    for b in range(reader.num_layers):
        entries = []
        for name in reader.block_names(b):
            linear, _, leaf = name.rpartition(".")
            if leaf != "weight" or len(reader.shape(name)) != 2:
                continue
            weight = reader.load([name])[name]
            result = rtn_quantize(weight, spec)
            data = result_to_bytes(result)
            key = f"runs/{run_id}/blocks/{b:05d}/{linear}.safetensors"
            store.put_bytes(key, data)
            entries.append(
                {
                    "name": linear,
                    "key": key,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                    "shape": list(result.shape),
                    "bits": spec.bits,
                    "group_size": spec.group_size,
                    "sym": spec.sym,
                }
            )
            del weight, result, data
            count += 1
        record = {"block": b, "complete": True, "results": sorted(entries, key=lambda e: e["name"])}
        store.put_json(f"runs/{run_id}/blocks/{b:05d}/record.json", record)
    return count


def measure_assembly(fmt: str, model: Path, store_root: Path, run_id: str, dest: Path) -> dict:
    """Assemble ``fmt`` in a fresh interpreter; its timings and memory figures (bytes)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", ASSEMBLE, fmt, str(model), str(store_root), run_id, str(dest)],
        capture_output=True,
        text=True,
        cwd=root,
        env={**_env(), "PYTHONPATH": str(root)},
    )
    if done.returncode != 0:
        raise RuntimeError(f"assembling {fmt} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def output_bytes(dest: Path) -> int:
    if dest.is_file():
        return dest.stat().st_size
    return sum(p.stat().st_size for p in dest.glob("*.safetensors"))


def main() -> None:
    from benchmarks.common import machine
    from strata_quant.pipeline.checkpoint import CheckpointReader

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="gptq,gguf")
    parser.add_argument("--layers", default="11,5", help="block counts of the 4096-wide models, largest first")
    parser.add_argument("--keep", action="store_true", help="keep the models, records and artifacts")
    parser.add_argument("--workdir", default=None, help="where to build them (default: a temporary folder)")
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="strata-asm-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"work folder: {work} (free: {shutil.disk_usage(work).free / 1e9:.0f} GB)")
    rows = []
    try:
        for layers in (int(x) for x in args.layers.split(",")):
            t = time.perf_counter()
            model = make_model(
                work / f"model-4096x{layers}", hidden=4096, intermediate=11008, layers=layers, heads=32, kv_heads=8
            )
            made = time.perf_counter() - t
            reader = CheckpointReader(model)
            size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
            big_name, big = largest_tensor_bytes(reader)
            params = sum(math.prod(shape) for _, shape in reader.tensor_info.values())
            t = time.perf_counter()
            store = work / f"store-4096x{layers}"
            n = write_rtn_run(model, store, "rtn")
            print(
                f"\nmodel 4096 wide x {layers} blocks: {size / 1e9:.2f} GB fp16 ({params / 1e9:.2f} G "
                f"params), largest tensor {big_name} {big / MIB:.0f} MiB; built in {made:.0f}s, "
                f"RTN W4 g128 record of {n} linears in {time.perf_counter() - t:.0f}s"
            )
            for fmt in formats:
                dest = work / (f"out-4096x{layers}.gguf" if fmt == "gguf" else f"out-4096x{layers}-{fmt}")
                m = measure_assembly(fmt, model, store, "rtn", dest)
                grow_rss, grow_anon = m["peak_rss"] - m["baseline_rss"], m["peak_anon"] - m["baseline_anon"]
                rows.append((layers, size, big, fmt, m, grow_rss, grow_anon))
                print(
                    f"  {fmt:5s} {m['seconds']:5.0f}s ({m['cpu_seconds']:.0f} CPU s), output {output_bytes(dest) / 1e9:.2f} GB; "
                    f"RSS after imports {m['imports_rss'] / MIB:.0f} MiB, baseline (records read) "
                    f"{m['baseline_rss'] / MIB:.0f} MiB (anon {m['baseline_anon'] / MIB:.0f}); "
                    f"peak RSS {m['peak_rss'] / MIB:.0f} MiB (+{grow_rss / MIB:.0f}, {grow_rss / big:.2f}x the largest "
                    f"tensor{'' if m['hwm_reset'] else ', VmHWM not reset'}); peak RssAnon "
                    f"{m['peak_anon'] / MIB:.0f} MiB (+{grow_anon / MIB:.0f}, {grow_anon / big:.2f}x)"
                )
                if not args.keep:
                    shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
            if not args.keep:
                shutil.rmtree(store, ignore_errors=True)
                shutil.rmtree(model, ignore_errors=True)
        print("\n| model | checkpoint | largest tensor | format | baseline RSS | peak RSS (VmHWM) | peak RssAnon | s |")
        print("|---|---|---|---|---|---|---|---|")
        for layers, size, big, fmt, m, grow_rss, grow_anon in rows:
            print(
                f"| 4096 x {layers} blocks | {size / 1e9:.2f} GB | {big / MIB:.0f} MiB | {fmt} | "
                f"{m['baseline_rss'] / MIB:.0f} MiB | {m['peak_rss'] / MIB:.0f} MiB (+{grow_rss / MIB:.0f}) | "
                f"{m['peak_anon'] / MIB:.0f} MiB (+{grow_anon / MIB:.0f}) | {m['seconds']:.0f} |"
            )
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
