"""Suite accuracies quantlab measured beside a model card's published scores, as Markdown.

    .venv/bin/python scripts/compare_published.py RESULTS.json [RESULTS.json ...] experiments/published/smollm2-135m-instruct.yaml

Each RESULTS.json is ``quantlab eval --output``'s file (or ``quantlab merge-shards``' merge of its shards),
all of one model. Published keys map to lm-eval tasks by prefix (``arc`` -> arc_easy, arc_challenge).
Intervals are 95 % (1.96 x lm-eval's stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import yaml

    *results_paths, published_path = map(Path, sys.argv[1:])
    runs = [json.loads(p.read_text())["runs"][0] for p in results_paths]
    if len({r["artifact"] for r in runs}) != 1:
        sys.exit("compare_published.py: the results files are of different models — give one model's files")
    card = yaml.safe_load(published_path.read_text())
    print(f"$ .venv/bin/python scripts/compare_published.py {' '.join(map(str, results_paths))} {published_path}\n")
    first = runs[0]["accuracy"]
    print(f"Model `{runs[0]['artifact']}` ({runs[0]['recipe']}), lm-eval {first['lm_eval']['version']}, batch "
          f"{first['lm_eval']['batch_size']}, {first['dtype']}, zero-shot; published: {card['model']} "
          f"({card['harness']}, {card['source']}).\n")
    print("| task | documents | acc [95% CI] | acc_norm [95% CI] | published | from |")
    print("|---|---|---|---|---|---|")
    for key, score in card["scores"].items():
        for path, run in zip(results_paths, runs):
            for task, info in run["accuracy"]["tasks"].items():
                if task.startswith(key):
                    print(f"| {task} | {info['n']}/{info['n_total']} | {_cell(info, 'acc')} | "
                          f"{_cell(info, 'acc_norm')} | {key} {score} | {path.name} |")
    for run in runs:
        for task, info in run["accuracy"]["tasks"].items():
            if info.get("note"):
                print(f"\n{task}: {info['note']}.")
    for path, run in zip(results_paths, runs):
        prov, acc = run["provenance"], run["accuracy"]
        merged = acc["settings"].get("merged_from")
        print(f"\n{path.name}{f' (merged from {merged} shards)' if merged else ''}: versions {prov['versions']}; device "
              f"{prov['device']}; git {prov['git_sha']}; data sha256 "
              f"{ {Path(k).name: v[:12] for k, v in prov['data_sha256'].items()} }")
        if prov.get("shards"):
            print("shards (git sha, wall s): " + ", ".join(f"{s['shard']} {(s['git_sha'] or '?')[:8]} "
                                                         f"{s['wall_s']:.0f}" for s in prov["shards"]))


def _cell(info: dict, metric: str) -> str:
    value, err = info["metrics"].get(metric), info["stderr"].get(metric)
    return "—" if value is None else f"{100 * value:.1f} [{100 * (value - 1.96 * err):.1f}, {100 * (value + 1.96 * err):.1f}]"


if __name__ == "__main__":
    main()
