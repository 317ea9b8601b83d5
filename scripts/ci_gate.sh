#!/usr/bin/env bash
# The project gates itself: evaluate the CI configuration (SmolLM2 fp and rtn-w4-g64 on the `ci` suite)
# with the current code and gate each against its committed baseline in reports/baselines/ci/.
#   bash scripts/ci_gate.sh            # exit 0 pass, 3 regression, 1 error; outputs in $OUT (default: a temp dir)
#   bash scripts/ci_gate.sh --update   # re-record the baselines instead (commit them with the reason)
set -euo pipefail
cd "$(dirname "$0")/.."
Q=.venv/bin/quantlab
BASE=reports/baselines/ci
OUT=${OUT:-$(mktemp -d)}
UPDATE=0
[ "${1:-}" = "--update" ] && UPDATE=1
mkdir -p "$OUT"
rtn=$($Q quantize rtn-w4-g64 --model smollm2-135m 2>"$OUT/quantize.log") || { tail -3 "$OUT/quantize.log"; exit 1; }
status=0
for name in fp rtn-w4-g64; do
  model=smollm2-135m
  [ "$name" = fp ] || model=$rtn
  $Q eval "$model" --suite ci --output "$OUT/$name.json" > /dev/null 2> "$OUT/$name.log" \
    || { tail -3 "$OUT/$name.log"; exit 1; }
  if [ $UPDATE = 1 ]; then
    mkdir -p "$BASE" && cp "$OUT/$name.json" "$BASE/$name.json" && echo "recorded $BASE/$name.json"
    continue
  fi
  rc=0
  $Q gate --baseline "$BASE/$name.json" --candidate "$OUT/$name.json" --policy experiments/gates/ci.yaml \
    --summary "$OUT/$name.md" > /dev/null || rc=$?
  echo "ci gate $name: exit $rc — $(head -1 "$OUT/$name.md" 2>/dev/null | sed 's/## //')"
  [ $rc -gt $status ] && status=$rc
done
exit $status
