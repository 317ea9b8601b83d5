"""Two results.json of the same comparison side by side: does a code change leave every number as it was?

    .venv/bin/python scripts/compare_results.py BEFORE/results.json AFTER/results.json

Per recipe: whether the job key is the same (same inputs, settings and library versions), whether every
fidelity number (mean and p99 KLD, top-1 agreement, both perplexities, their intervals) and the weight and
disk bytes are identical to the last bit, and the guard verdicts. Latency is timing, not compared. GPTQModel
is not bit-reproducible on CPU, so a GPTQ row may differ without a code change. Exit 1 when any deterministic
recipe differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIDELITY = ("kld_mean", "kld_p99", "top1_agreement", "ppl", "ppl_baseline", "ci95", "tokens", "generation")
MEMORY = ("weights_bytes", "disk_bytes")


def _describe(path: Path, data: dict) -> str:
    provs = [r.get("provenance") or {} for r in data["runs"]]
    shas = {}
    for run, prov in zip(data["runs"], provs):
        shas.setdefault(prov.get("git_sha"), []).append(run["recipe"])
    versions = provs[0].get("versions", {})
    return (f"{path}: run set {data['run_set']}, git " + "; ".join(f"{sha} ({', '.join(r)})" for sha, r in shas.items())
            + f"; torch {versions.get('torch')}, transformers {versions.get('transformers')}")


def main(before_path: str, after_path: str) -> int:
    print("$ .venv/bin/python scripts/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    before, after = (json.loads(Path(p).read_text()) for p in (before_path, after_path))
    print("before", _describe(Path(before_path), before))
    print("after ", _describe(Path(after_path), after))
    old = {r["recipe"]: r for r in before["runs"]}
    differ = []
    print(f"\n{'recipe':<14} {'job key':<9} {'fidelity':<10} {'bytes':<10} {'guard':<12} mean KLD before -> after")
    for run in after["runs"]:
        prev = old.get(run["recipe"])
        if prev is None:
            print(f"{run['recipe']:<14} (not in before)")
            continue
        same_key = prev.get("job_key") == run.get("job_key")
        same_fid = all(prev["fidelity"].get(k) == run["fidelity"].get(k) for k in FIDELITY)
        same_mem = all(prev["memory"].get(k) == run["memory"].get(k) for k in MEMORY)
        guard = f"{(prev.get('guard') or {}).get('ok')}->{(run.get('guard') or {}).get('ok')}"
        print(f"{run['recipe']:<14} {'same' if same_key else 'CHANGED':<9} {'identical' if same_fid else 'DIFFERS':<10} "
              f"{'identical' if same_mem else 'DIFFER':<10} {guard:<12} "
              f"{prev['fidelity']['kld_mean']:.6f} -> {run['fidelity']['kld_mean']:.6f}")
        if not (same_fid and same_mem) and run["method"] != "gptq":
            differ.append(run["recipe"])
    print("\ndeterministic recipes that differ:", ", ".join(differ) or "none")
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
