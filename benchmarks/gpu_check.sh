#!/usr/bin/env bash
# The GPU checks of a lent device machine, in one call (see benchmarks/block70b.py):
#   bash benchmarks/gpu_check.sh OUT_DIR [MODEL_DIR]
# First the GPTQ solve with CUDA graphs against the same solve launching every call
# (benchmarks/gpu_solve.py: bit-for-bit, and the speedup); if any case differs, the rest runs
# without graphs. Then a dry run at 1/10 width (seconds; catches device bugs before the long
# step), then the Llama-70B-width block at the projection's per-GPU token count, with AWQ's
# scale search; and, when a model folder is given, the block worker on the GPU against the
# CPU for every method (benchmarks/gpu_worker.py). Uses the machine's python3.
set -u -o pipefail
out=${1:-out/gpu}
model=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, safetensors; print('torch', torch.__version__, 'transformers', transformers.__version__, 'safetensors', safetensors.__version__)"
graphs=()
if ! timeout 150 python3 -m benchmarks.gpu_solve --json "$out/gpu-solve.json" 2>&1 | tee "$out/gpu-solve.log"; then
    echo "CUDA-graph solve differs or failed: the block runs without graphs"
    graphs=(--no-cuda-graphs)
fi
timeout 120 python3 -m benchmarks.block70b --device cuda --scale 0.1 --tokens 4096 --seq 2048 --threads 16 \
    "${graphs[@]}" 2>&1 | tee "$out/block70b-dry.log"
if [ -n "$model" ]; then
    timeout 300 python3 -m benchmarks.gpu_worker --model "$model" --json "$out/gpu-worker.json" 2>&1 \
        | tee "$out/gpu-worker.log"
fi
timeout 420 python3 -m benchmarks.block70b --device cuda --tokens 65536 --seq 2048 --threads 16 \
    "${graphs[@]}" --json "$out/block70b-gpu.json" 2>&1 | tee "$out/block70b-gpu.log"
