#!/usr/bin/env bash
# Wheels the GPU machine lacks, for scripts/gpu_check.sh (see the device tool's README): into .whl/ (ignored by
# git through .git/info/exclude), Python 3.12 x86-64, no dependencies pulled. Ray (~79 MB) and the SmolLM2 GGUF
# (~93 MB) are over the tool's 64 MiB transfer, so the check skips Ray and builds random-weight models instead.
#   bash scripts/gpu_wheels.sh            # then: device run "bash scripts/gpu_check.sh" with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          "${PLATFORMS[@]}" -d .whl "$@"; }
# the pins of scripts/constraints.txt; bitsandbytes 0.50.2 carries CUDA 13 kernels
get bitsandbytes==0.50.2 torchao==0.18.0 optimum==2.3.0
# GPTQModel 7.6.0 is published as an sdist of pure Python (kernels compile at run time): build its wheel here
python3 -m pip download -q --no-deps --no-binary=:all: -d /tmp/quantlab-sdist gptqmodel==7.6.0
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl /tmp/quantlab-sdist/gptqmodel-7.6.0.tar.gz
# what GPTQModel imports that the GPU image does not hold
get logbar tokenicer device-smi pypcre defuser datasets multiprocess dill
ls -la .whl
du -sh .whl
