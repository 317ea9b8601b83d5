#!/usr/bin/env bash
# Wheels the GPU machine lacks, for scripts/gpu_check.sh (see the device tool's README): into .whl/ (ignored by
# git through .git/info/exclude), for its Python 3.12 on x86-64, no dependencies pulled, the versions the venv
# holds. Ray (~79 MB) and the SmolLM2 GGUF (~93 MB) are over the tool's 64 MiB transfer: the check skips Ray
# and builds random-weight models instead.
#   bash scripts/gpu_wheels.sh      # then the device tool: command "bash scripts/gpu_check.sh", carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}  # the venv's pip and setuptools (GPTQModel's pyproject needs setuptools >= 77)
PY312=${PYTHON312:-$(ls -d /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}  # to build the one compiled sdist for the GPU machine's Python
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pin() { echo "$1==$(version "$1")"; }
# published wheels (bitsandbytes 0.50.2 carries CUDA 13 kernels)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl "$(pin bitsandbytes)" "$(pin torchao)" "$(pin optimum)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)"
# sdists of pure Python (GPTQModel's kernels compile at run time): wheels built here
for pkg in gptqmodel logbar tokenicer device-smi defuser; do
  "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary=:all: -w .whl "$(pin "$pkg")"
done
# pypcre is compiled: built with a Python 3.12
"$PY312" -m pip wheel -q --no-deps -w .whl "$(pin pypcre)"
ls -la .whl
du -sh .whl
