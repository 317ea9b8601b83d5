"""Sweep cache and executors, side by side in one run, on CPU-bound tiny jobs.

1. A sweep of fp + 4 recipes from an empty QUANTLAB_HOME, then the unchanged sweep again (goal: the rerun
   costs ≤ 0.05x the first run).
2. The same sweep with one recipe added (only that job runs), against that recipe's own cost: a sweep of
   fp + the recipe from an empty home minus a sweep of fp alone (goal: about 1x).
3. A sweep of fp + 7 recipes from an empty home, local serial executor vs the Ray executor with 2 workers
   (a local Ray cluster started inside the timing) (goal: Ray ≥ 1.6x faster).

The tiny model (2 layers, hidden 128, SmolLM2's tokenizer) is built here; every job is quantize ->
fidelity on WikiText-2 windows -> bench, each step a fresh process, one torch thread.

    .venv/bin/python scripts/bench_sweep.py
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

FIRST = ["bnb-int8", "bnb-nf4", "rtn-w8", "rtn-w4-g32"]
ADDED = "torchao-w4-g32"
RAY = ["bnb-int8", "bnb-nf4", "bnb-fp4", "rtn-w8", "rtn-w4-g32", "rtn-w4-g64", "torchao-w4-g32"]


def build_tiny(root: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantlab.models.source import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                         max_position_embeddings=1024, tie_word_embeddings=True))
    path = root / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sweep_file(root: Path, name: str, model: Path, recipes: list[str]) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(f"models: ['{model}']\nrecipes: [{', '.join(recipes)}]\n"
                    "evaluation: {text: wikitext2_raw, chunks: 4, chunk_tokens: 64}\n"
                    "measure: {batch_sizes: [1], repetitions: 2, decode_tokens: 4}\n")
    return path


def timed(path: Path, home: Path, **kw) -> tuple[float, dict]:
    from quantlab.sweep.commands import run_sweep
    from quantlab.sweep.driver import RunOptions

    os.environ["QUANTLAB_HOME"] = str(home)
    t0 = time.perf_counter()
    # results.json and report.html beside the home, in the temp dir: never reports/ of the working directory
    summary = run_sweep(str(path), RunOptions(store=str(home / "runs.db"), out=str(home / f"out-{path.stem}"), **kw))
    return time.perf_counter() - t0, summary


def main() -> None:
    from quantlab.provenance import provenance

    prov = provenance("cpu")
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        root = Path(tmp)
        model = build_tiny(root)
        a = sweep_file(root, "a", model, FIRST)
        b = sweep_file(root, "b", model, FIRST + [ADDED])
        first, s1 = timed(a, root / "h1")
        rerun, s2 = timed(a, root / "h1")
        added, s3 = timed(b, root / "h1")
        alone, _ = timed(sweep_file(root, "c", model, [ADDED]), root / "h2")
        fp_only, _ = timed(sweep_file(root, "d", model, ["fp"]), root / "h3")
        d = sweep_file(root, "ray", model, RAY)
        serial, s4 = timed(d, root / "h4")
        ray, s5 = timed(d, root / "h5", executor="ray", max_parallel=2)
    report(locals(), prov)


def report(v: dict, prov: dict) -> None:
    print("$ .venv/bin/python scripts/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print("tiny Llama (2 layers, hidden 128, SmolLM2 tokenizer); each job = quantize + fidelity (4 x 64 WikiText-2 "
          "tokens) + bench, each a fresh process, 1 torch thread; wall seconds of run_sweep, store included")
    print(f"\n1. sweep fp + {len(FIRST)} recipes from an empty home: {v['first']:.1f} s ({v['s1']['computed']} jobs "
          f"computed); unchanged rerun: {v['rerun']:.2f} s ({v['s2']['already_stored']} already stored)")
    print(f"   rerun / first = {v['rerun'] / v['first']:.3f} (goal ≤ 0.05): "
          f"{'met' if v['rerun'] / v['first'] <= 0.05 else 'NOT met'}")
    own = v["alone"] - v["fp_only"]
    print(f"\n2. the sweep plus {ADDED} (a new run set): {v['added']:.1f} s ({v['s3']['computed']} computed, "
          f"{v['s3']['from_cache']} from the job cache)")
    print(f"   {ADDED} alone = sweep [fp, {ADDED}] {v['alone']:.1f} s - sweep [fp] {v['fp_only']:.1f} s = {own:.1f} s; "
          f"added / alone = {v['added'] / own:.2f} (goal about 1)")
    speed = v["serial"] / v["ray"]
    print(f"\n3. sweep fp + {len(RAY)} recipes from an empty home: local serial {v['serial']:.1f} s, Ray with 2 workers "
          f"{v['ray']:.1f} s (local cluster start included); speed-up {speed:.2f}x (goal ≥ 1.6): "
          f"{'met' if speed >= 1.6 else 'NOT met'}")
    print(f"\nversions {prov['versions']}; device {prov['device']}; git {prov['git_sha']}")


if __name__ == "__main__":
    main()
