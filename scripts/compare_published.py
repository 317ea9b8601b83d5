"""Suite accuracies quantlab measured beside a model card's published scores, as Markdown.

    .venv/bin/python scripts/compare_published.py RESULTS.json experiments/published/smollm2-135m-instruct.yaml

RESULTS.json is ``quantlab eval --output``'s file. Published keys map to lm-eval tasks by prefix
(``arc`` -> arc_easy, arc_challenge). Intervals are 95 % (1.96 x lm-eval's stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import yaml

    results_path, published_path = map(Path, sys.argv[1:3])
    run = json.loads(results_path.read_text())["runs"][0]
    acc = run["accuracy"]
    card = yaml.safe_load(published_path.read_text())
    print(f"$ .venv/bin/python scripts/compare_published.py {results_path} {published_path}\n")
    print(f"Model `{run['artifact']}` ({run['recipe']}), lm-eval {acc['lm_eval']['version']}, batch "
          f"{acc['lm_eval']['batch_size']}, {acc['dtype']}, zero-shot; published: {card['model']} "
          f"({card['harness']}, {card['source']}).\n")
    print("| task | documents | acc [95% CI] | acc_norm [95% CI] | published |")
    print("|---|---|---|---|---|")
    for key, score in card["scores"].items():
        for task, info in acc["tasks"].items():
            if not task.startswith(key):
                continue
            cells = []
            for metric in ("acc", "acc_norm"):
                value, err = info["metrics"].get(metric), info["stderr"].get(metric)
                cells.append("—" if value is None else f"{100 * value:.1f} [{100 * (value - 1.96 * err):.1f}, "
                             f"{100 * (value + 1.96 * err):.1f}]")
            print(f"| {task} | {info['n']}/{info['n_total']} | {cells[0]} | {cells[1]} | {key} {score} |")
    notes = {t: i["note"] for t, i in acc["tasks"].items() if i.get("note")}
    for task, note in notes.items():
        print(f"\n{task}: {note}.")
    prov = run["provenance"]
    print(f"\nversions {prov['versions']}; device {prov['device']}; git {prov['git_sha']}; data sha256 "
          f"{ {Path(k).name: v[:12] for k, v in prov['data_sha256'].items()} }")


if __name__ == "__main__":
    main()
