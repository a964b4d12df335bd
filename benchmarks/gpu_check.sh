#!/usr/bin/env bash
# The GPU checks of a lent device machine, in one call (see benchmarks/block70b.py):
#   bash benchmarks/gpu_check.sh OUT_DIR
# A dry run at 1/10 width first (seconds; catches device bugs before the long step), then the
# Llama-70B-width block at the projection's per-GPU token count, with AWQ's scale search; and,
# when a model folder is given, the block worker on the GPU against the CPU for every method
# (benchmarks/gpu_worker.py). Uses the machine's python3.
#   bash benchmarks/gpu_check.sh OUT_DIR [MODEL_DIR]
set -u
out=${1:-out/gpu}
model=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.txt"
python3 -c "import torch, transformers, safetensors; print('torch', torch.__version__, 'transformers', transformers.__version__, 'safetensors', safetensors.__version__)"
timeout 120 python3 -m benchmarks.block70b --device cuda --scale 0.1 --tokens 4096 --seq 2048 --threads 16 \
    --json "$out/block70b-dry.json" 2>&1 | tee "$out/block70b-dry.log"
if [ -n "$model" ]; then
    timeout 300 python3 -m benchmarks.gpu_worker --model "$model" --json "$out/gpu-worker.json" 2>&1 \
        | tee "$out/gpu-worker.log"
fi
timeout 420 python3 -m benchmarks.block70b --device cuda --tokens 65536 --seq 2048 --threads 16 \
    --json "$out/block70b-gpu.json" 2>&1 | tee "$out/block70b-gpu.log"
