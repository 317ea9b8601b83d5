"""QAT vs its PTQ twin, side by side in one run, on one model: how much of the PTQ damage training recovers,
and what the training cost.

For each scheme: fidelity of the PTQ twin (torchao-<scheme>) and of the QAT recipe on the evaluation text,
the recovered fraction (PTQ - QAT) / (PTQ - fp) for KLD and perplexity with paired bootstrap intervals,
training CPU seconds and tokens, and the recovery-vs-cost curve measured during training on held-out
windows of the training text. Artifacts are cached under QUANTLAB_HOME.

    .venv/bin/python scripts/bench_qat.py [--model smollm2-135m] [--schemes w4-g32,a8w4-g32]
        [--set steps=100 --set lr=2e-5 ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


def evaluate(model: str, recipe, per_token: Path, threads: int) -> dict:
    from quantlab.artifacts import read_manifest
    from quantlab.sweep.commands import evaluate_model, quantize_model

    art = quantize_model(model, recipe, "cpu", threads)
    fid = evaluate_model(art["artifact"], model, per_token_path=str(per_token))["fidelity"]
    return {"recipe": recipe, "fid": fid, "cost": art["cost"],
            "notes": (read_manifest(art["artifact"]) or {}).get("method_notes", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default="w4-g32")
    ap.add_argument("--set", action="append", default=[], help="QAT parameter, e.g. steps=100")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the quantize/train process "
                    "(1, as quantize-and-compare: fewer CPU-seconds per step than 2)")
    args = ap.parse_args()

    from quantlab.evaluate.recovery import recovery
    from quantlab.evaluate.text import resolve_text
    from quantlab.models.source import resolve_model
    from quantlab.provenance import provenance
    from quantlab.recipe import Recipe, parse_recipe

    source = resolve_model(args.model)
    text = resolve_text(None)
    prov = provenance("cpu", data={text.name: text.sha256})
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for scheme in args.schemes.split(","):
            qat = parse_recipe(f"qat-{scheme}")
            changes = {k: type(getattr(qat.config, k))(v) for k, v in (s.split("=", 1) for s in args.set)}
            qat = Recipe(name=qat.name, method="qat", config=replace(qat.config, **changes))
            ptq = parse_recipe(f"torchao-{scheme}")
            p = evaluate(args.model, ptq, Path(tmp) / f"{ptq.name}.npz", args.threads)
            q = evaluate(args.model, qat, Path(tmp) / f"{qat.name}.npz", args.threads)
            rec = recovery(Path(tmp) / f"{qat.name}.npz", Path(tmp) / f"{ptq.name}.npz", ptq.name)
            rows.append((p, q, rec))

    print("$ .venv/bin/python scripts/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"model {source.ref}: {source.note or source.fingerprint[:12]}")
    first = rows[0][0]["fid"]
    print(f"evaluation text {text.name} (sha256 {text.sha256[:12]}), {first['tokens']} tokens in {first['chunks']} "
          f"windows; fp token-level ppl {first['ppl_baseline']:.2f}; KLD = mean per-token KL(fp || quant), nats")
    print(f"versions {prov['versions']}; cpu {prov['device']['cpu']}; git {prov['git_sha']}")
    for p, q, rec in rows:
        cfg, tr, tt = q["recipe"].config, q["notes"]["training"], q["notes"]["train_text"]
        print(f"\n{q['recipe'].name}: steps {cfg.steps}, batch {cfg.batch} x {cfg.seq_len} tokens, lr {cfg.lr}, "
              f"ce_weight {cfg.ce_weight}, seed {cfg.seed}; training text {tt['source']} ({tt['tokens']} tokens, "
              f"sha256 {tt['sha256'][:12]}); {tr['threads']} torch threads")
        print(f"{'recipe':16s} {'KLD mean [95% CI]':28s} {'top-1':>6s} {'ppl':>7s} {'quantize s':>10s} {'peak RSS GB':>11s}")
        for r in (p, q):
            f, c = r["fid"], r["cost"]
            lo, hi = f["ci95"]["kld_mean"]
            print(f"{r['recipe'].name:16s} {f['kld_mean']:.4f} [{lo:.4f}, {hi:.4f}]       {f['top1_agreement']:6.3f} "
                  f"{f['ppl']:7.2f} {c['quantize_wall_s']:10.1f} {c['quantize_peak_rss_bytes'] / 1e9:11.2f}")
        ci = rec["ci95"]
        fmt = lambda k: f"{rec[k]:.1%} [{ci[k][0]:.1%}, {ci[k][1]:.1%}]" if rec[k] is not None else "n/a"
        print(f"recovered (PTQ - QAT) / (PTQ - fp): KLD {fmt('kld')}, perplexity {fmt('ppl')} "
              "(goal >= 70 % within 20 CPU-minutes of training)")
        curve = q["notes"]["heldout_curve"]
        print(f"training: {tr['train_wall_s']:.0f} s wall, {curve[-1]['train_cpu_s']:.0f} CPU-s "
              f"({curve[-1]['train_cpu_s'] / 60:.1f} CPU-min), {tr['tokens_seen']} tokens; teacher forward "
              f"{tr['teacher_forward_s']:.0f} s of it")
        print("recovery vs cost on held-out windows of the training text (step 0 = the PTQ twin):")
        print(f"  {'step':>5s} {'CPU-s':>7s} {'tokens':>7s} {'KLD':>7s} {'ppl':>8s} {'recovered KLD':>14s} {'recovered ppl':>14s}")
        for pt in curve:
            rk = "n/a" if pt["recovered_kld"] is None else f"{pt['recovered_kld']:.1%}"
            rp = "n/a" if pt["recovered_ppl"] is None else f"{pt['recovered_ppl']:.1%}"
            print(f"  {pt['step']:5d} {pt['train_cpu_s']:7.0f} {pt['tokens_seen']:7d} {pt['kld']:7.4f} "
                  f"{pt['ppl']:8.2f} {rk:>14s} {rp:>14s}")


if __name__ == "__main__":
    main()
