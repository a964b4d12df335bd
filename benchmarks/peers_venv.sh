#!/usr/bin/env bash
# Builds the peer venvs for benchmarks/peers.py, each beside torch 2.13.0 (CPU build):
#   bash benchmarks/peers_venv.sh [gptqmodel] [llmcompressor] [autoround]   (default: the first two)
#   .venv-gptqmodel      gptqmodel==7.6.0
#   .venv-llmcompressor  llmcompressor==0.14.* with the transformers it pins
#   .venv-autoround      auto-round==0.16.* with gguf==0.19.0 and sentencepiece, which its GGUF export
#                        imports but does not declare (benchmarks/peers_autoround.py)
# torch is installed first and alone, so pip takes the CPU wheel (from a local wheel cache
# when pip is configured with one, else PyPI's CPU build) and the peer cannot move it.
# Idempotent: a venv is reused once its .strata-ready stamp exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH=${STRATA_PEER_TORCH:-torch==2.13.0}

build() {  # build VENV PACKAGE...
  local venv=$1
  shift
  [ -f "$venv/.strata-ready" ] && { echo "$venv: ready"; return 0; }
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q "$TORCH"
  # pin torch so the peer's resolver keeps the CPU build installed above
  "$venv/bin/pip" install -q "$@" "$TORCH"
  "$venv/bin/python" -c "import torch; assert torch.__version__.startswith('${TORCH#torch==}'), torch.__version__"
  touch "$venv/.strata-ready"
  echo "$venv: built ($*)"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(gptqmodel llmcompressor)
for t in "${targets[@]}"; do
  case "$t" in
    gptqmodel) build .venv-gptqmodel gptqmodel==7.6.0 ;;
    llmcompressor) build .venv-llmcompressor "llmcompressor==0.14.*" ;;
    autoround) build .venv-autoround "auto-round==0.16.*" gguf==0.19.0 "sentencepiece==0.2.*" ;;
    *) echo "unknown peer: $t (gptqmodel, llmcompressor, autoround)" >&2; exit 2 ;;
  esac
done
