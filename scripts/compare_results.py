"""Two results.json of the same comparison side by side: does a code change leave every number as it was?

    .venv/bin/python scripts/compare_results.py BEFORE/results.json AFTER/results.json [--rtol R]

Per recipe: whether the job key is the same (same inputs, settings and library versions), whether every
fidelity number (mean and p99 KLD, top-1 agreement, both perplexities, their intervals) and the weight and
disk bytes are identical to the last bit, and the guard verdicts. Latency is timing, not compared. GPTQModel
is not bit-reproducible on CPU, so a GPTQ row may differ without a code change. Exit 1 when any deterministic
recipe differs. With ``--rtol R`` (two ways of computing the same numbers, e.g. layer by layer against in
memory, whose log-probs agree to ~1e-5) a fidelity number counts as the same within relative difference R, and
each recipe's largest relative difference is printed.
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


def _numbers(fid: dict) -> dict:
    """The fidelity numbers of FIDELITY, intervals flattened (``ci95.kld_mean.0``, ...)."""
    out = {}
    for key in FIDELITY:
        value = fid.get(key)
        if isinstance(value, dict):
            for k, v in value.items():
                for i, x in enumerate(v if isinstance(v, list) else [v]):
                    out[f"{key}.{k}.{i}"] = x
        elif isinstance(value, (int, float)):
            out[key] = value
    return out


def _largest_rel(a: dict, b: dict) -> tuple[float, str]:
    na, nb = _numbers(a), _numbers(b)
    worst = (0.0, "")
    for key in sorted(set(na) | set(nb)):
        x, y = na.get(key), nb.get(key)
        if x is None or y is None:
            return float("inf"), key
        rel = abs(x - y) / max(abs(x), abs(y)) if x != y else 0.0
        worst = max(worst, (rel, key))
    return worst


def main(before_path: str, after_path: str, rtol: float = 0.0) -> int:
    print("$ .venv/bin/python scripts/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    before, after = (json.loads(Path(p).read_text()) for p in (before_path, after_path))
    print("before", _describe(Path(before_path), before))
    print("after ", _describe(Path(after_path), after))
    old = {r["recipe"]: r for r in before["runs"]}
    differ = []
    if rtol:
        print(f"fidelity numbers count as the same within relative difference {rtol:g}")
    print(f"\n{'recipe':<14} {'job key':<9} {'fidelity':<10} {'bytes':<10} {'guard':<12} mean KLD before -> after"
          + ("   top-1 before -> after   ppl before -> after   largest relative difference" if rtol else ""))
    for run in after["runs"]:
        prev = old.get(run["recipe"])
        if prev is None:
            print(f"{run['recipe']:<14} (not in before)")
            continue
        same_key = prev.get("job_key") == run.get("job_key")
        rel, where = _largest_rel(prev["fidelity"], run["fidelity"])
        same_fid = rel <= rtol if rtol else all(prev["fidelity"].get(k) == run["fidelity"].get(k) for k in FIDELITY)
        same_mem = all(prev["memory"].get(k) == run["memory"].get(k) for k in MEMORY)
        guard = f"{(prev.get('guard') or {}).get('ok')}->{(run.get('guard') or {}).get('ok')}"
        print(f"{run['recipe']:<14} {'same' if same_key else 'CHANGED':<9} {'identical' if same_fid else 'DIFFERS':<10} "
              f"{'identical' if same_mem else 'DIFFER':<10} {guard:<12} "
              f"{prev['fidelity']['kld_mean']:.6f} -> {run['fidelity']['kld_mean']:.6f}"
              + (f"   {prev['fidelity']['top1_agreement']:.5f} -> {run['fidelity']['top1_agreement']:.5f}"
                 f"   {prev['fidelity']['ppl']:.4f} -> {run['fidelity']['ppl']:.4f}   {rel:.2e} ({where})" if rtol else ""))
        if not (same_fid and same_mem) and run["method"] != "gptq":
            differ.append(run["recipe"])
    print("\ndeterministic recipes that differ:", ", ".join(differ) or "none")
    return 1 if differ else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    tol = 0.0
    if "--rtol" in args:
        i = args.index("--rtol")
        tol = float(args[i + 1])
        del args[i:i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    sys.exit(main(*args, rtol=tol))
