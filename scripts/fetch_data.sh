#!/usr/bin/env bash
# Download benchmark files into the data dir (QUANTLAB_DATA_DIR) in quantlab's layout, <data-dir>/<task>/<file>,
# from the pinned public copies their SOURCE.md files describe, each checked against its published sha256.
#   QUANTLAB_DATA_DIR=data bash scripts/fetch_data.sh              # the quick suite's tasks (the ci suite's too)
#   QUANTLAB_DATA_DIR=data bash scripts/fetch_data.sh arc_easy piqa
# A file already there with the right sha256 is kept; one with another sha256 is an error, never overwritten.
set -euo pipefail
DIR=${QUANTLAB_DATA_DIR:?set QUANTLAB_DATA_DIR to the data dir to fill, e.g. QUANTLAB_DATA_DIR=data}
GH=https://raw.githubusercontent.com
# task, file in the data dir, source URL (a commit, not a branch), sha256 of the file
FILES="
arc_easy ARC-Easy-Test.jsonl $GH/FormulaMonks/llm-benchmarker-suite/5d3c8009ab8f5adab4899c34dd203cbf7afcb372/data/ARC/ARC-e/ARC-Easy-Test.jsonl ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be
piqa valid.jsonl $GH/ybisk/ybisk.github.io/21edab439af693b961be2f069e8690a88d3b4e37/piqa/data/valid.jsonl 93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d
piqa valid-labels.lst $GH/ybisk/ybisk.github.io/21edab439af693b961be2f069e8690a88d3b4e37/piqa/data/valid-labels.lst b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb
hellaswag hellaswag_val_full.txt.bz2 $GH/klosax/hellaswag_text_data/60a646bd806bce22dcb2eb6d4fadb12f1472aa4c/hellaswag_val_full.txt.bz2 50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b
"
# files made from a downloaded one: task, file, the command that writes it to stdout, sha256
DERIVED="
hellaswag hellaswag_val_full.txt bzcat:hellaswag_val_full.txt.bz2 d572539320eb2050e858ca34b495bbe2103e3b3f1391a9c3bcdf215b0bb93bd1
"
TASKS=${*:-arc_easy hellaswag piqa}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# place TASK FILE SHA256 PRODUCER...: write FILE with PRODUCER's output (to a temp file beside it, renamed
# only once its sha256 is right), unless it is already there with that sha256.
place() {
  local task=$1 file=$2 want=$3 target tmp
  shift 3
  target="$DIR/$task/$file"
  if [ -e "$target" ]; then
    [ "$(sha "$target")" = "$want" ] && { echo "kept $target"; return; }
    echo "Error: $target exists with sha256 $(sha "$target"), not $want — move it away and rerun" >&2
    exit 1
  fi
  mkdir -p "$DIR/$task"
  tmp=$(mktemp "$DIR/$task/.$file.XXXXXX")
  trap 'rm -f "$tmp"' EXIT
  "$@" > "$tmp" || { echo "Error: could not get $file for $task — check the network and rerun" >&2; exit 1; }
  if [ "$(sha "$tmp")" != "$want" ]; then
    echo "Error: $file for $task has sha256 $(sha "$tmp"), not the published $want — its source changed; see SOURCE.md" >&2
    exit 1
  fi
  chmod 644 "$tmp"
  mv "$tmp" "$target"
  trap - EXIT
  echo "wrote $target"
}

for task in $TASKS; do
  echo "$FILES$DERIVED" | grep -q "^$task " || { echo "Error: no source for task '$task' — known: arc_easy hellaswag piqa" >&2; exit 2; }
  while read -r t file url want; do
    if [ "$t" = "$task" ]; then place "$task" "$file" "$want" curl -fsSL --retry 3 "$url"; fi
  done <<< "$FILES"
  while read -r t file how want; do
    if [ "$t" = "$task" ]; then place "$task" "$file" "$want" "${how%%:*}" "$DIR/$task/${how#*:}"; fi
  done <<< "$DERIVED"
done
