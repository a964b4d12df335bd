#!/usr/bin/env bash
# Builds llama.cpp's reference tools (llama-imatrix, llama-quantize, llama-perplexity),
# CPU only, from the vendor/llama.cpp of the llama-cpp-python sdist the readers use, so the
# anchors in the GGUF benchmarks run the same ggml code as llama-cpp-python.
#   benchmarks/llamacpp_tools.sh            # → ~/.cache/strata/llama.cpp/bin/llama-*
# Env: LLAMA_CPP_PYTHON_VERSION (0.3.36), STRATA_LLAMACPP_DIR (~/.cache/strata/llama.cpp),
#      JOBS (cores to build with; 2).
set -euo pipefail
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
root="${STRATA_LLAMACPP_DIR:-$HOME/.cache/strata/llama.cpp}"
jobs="${JOBS:-2}"
mkdir -p "$root"
src="$root/llama_cpp_python-$version"
if [ ! -d "$src/vendor/llama.cpp" ]; then
    pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$root"
    tar xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
fi
for tool in cmake ninja; do
    command -v "$tool" >/dev/null || { echo "llamacpp_tools: $tool is missing (apt-get install $tool, or pip install $tool)" >&2; exit 2; }
done
build="$root/build-$version"
cmake -S "$src/vendor/llama.cpp" -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON
cmake --build "$build" -j "$jobs" --target llama-imatrix llama-quantize llama-perplexity
mkdir -p "$root/bin"
for tool in llama-imatrix llama-quantize llama-perplexity; do
    cp "$build/bin/$tool" "$root/bin/$tool"
done
"$root/bin/llama-quantize" --help 2>&1 | head -1 || true
echo "llamacpp_tools: $root/bin"
