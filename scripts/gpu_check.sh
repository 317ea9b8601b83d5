#!/usr/bin/env bash
# The GPU check: every CUDA path quantlab has, once, on one H100/H200 with no hub, in at most 8 minutes.
# Prepare here:  bash scripts/gpu_wheels.sh
# Run there:     the device tool, command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 560
# It writes reports/gpu/<date>-<gpu>.jsonl (and a copy under $OUT, which the device tool brings back); commit that.
# Dry run on this CPU machine: .venv/bin/python scripts/gpu_check.py --device cpu --small --out /tmp/gpu-dry
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export QUANTLAB_HOME=${QUANTLAB_HOME:-/tmp/quantlab-gpu-home}
out=${OUT:-reports/gpu}
timeout 500 "$PY" scripts/gpu_check.py --out reports/gpu --deadline 470 "$@" || echo "gpu_check.py ended with $?"
mkdir -p "$out" && cp reports/gpu/*.jsonl "$out"/ 2>/dev/null || true
