"""quantlab's llama.cpp engine vs llama.cpp's own tools on one GGUF recipe, side by side in one run.

(a) Fidelity. llama-perplexity saves the F32 GGUF's log-probs (``--kl-divergence-base``), then scores the quantized
    GGUF against them (``--kl-divergence``): its "Mean KLD" and "Same top p". quantlab scores the same text, tokens,
    context and positions: the data dir's wikitext2_raw/wiki.test.raw (found the way quantlab finds it), less one
    trailing newline (what ``-f`` reads), tokenized by llama.cpp's tokenizer with its special tokens
    (``common_tokenize(ctx, text, true)``); chunk c is tokens [c*ctx, (c+1)*ctx), its first token the BOS if the
    vocabulary adds one; the scored positions are ctx/2 .. ctx-2 of each chunk (each predicts the next token). Both
    GGUFs run through ``LlamaCppModel.log_probs`` and each chunk goes through ``quantlab.evaluate.fidelity
    .compare_window``: KLD(base || quant) over the full vocabulary in float32, top-1 agreement. Goals: mean KLD
    within 5 % relative, same-top-1 within 0.5 points.
(b) Speed. ``llama-bench -p P -n N -t T -r R -o json`` on the quantized GGUF (every other flag at its default) beside
    ``LlamaCppModel.measure`` with the same prompt and generated tokens, threads and repetitions, one warm-up: prefill
    tokens/s (P / prefill seconds) and decode tokens/s, each as each reports it (llama-bench: mean over repetitions
    of tokens/s; quantlab: median). The two alternate for ``--rounds`` rounds on this shared machine; each round's
    ratio quantlab / llama-bench is taken (back to back, the machine's load moves both) and the median ratio is
    compared. Goal: within 5 %.

llama.cpp's tools come from scripts/build_llama_tools.sh (built once from the llama-cpp-python source distribution
with setup.sh's GGML flags), or ``--tools DIR``.

    .venv/bin/python scripts/bench_gguf.py [--model smollm2-135m] [--qtype q4_k_m] [--ctx 512] [--chunks 10]
        [--threads 1] [--prompt 128] [--gen 32] [--repetitions 5] [--rounds 10] [--tools DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KLD_GOAL = 0.05  # relative
TOP_GOAL = 0.5  # points
SPEED_GOAL = 0.05  # relative


def tools_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_tools.sh")], check=True, text=True,
                         stdout=subprocess.PIPE)
    return Path(out.stdout.strip().splitlines()[-1])


def run_tool(cmd: list[str], log: Path, merge: bool = True) -> tuple[str, float]:
    """Run one of llama.cpp's tools; (its stdout, with its stderr unless ``merge`` is off, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                          text=True, errors="replace")
    took = time.perf_counter() - start
    log.write_text(proc.stdout + (proc.stderr or ""))
    if proc.returncode:
        sys.exit(f"{Path(cmd[0]).name} failed ({proc.returncode}); its log: {log}\n{log.read_text()[-2000:]}")
    return proc.stdout, took


def number(pattern: str, text: str) -> tuple[float, float]:
    """(value, ± value) of one statistics line of llama-perplexity's output."""
    m = re.search(pattern + r"\s*:\s*([-\d.]+)\s*±\s*([-\d.]+)", text)
    if not m:
        sys.exit(f"llama-perplexity printed no '{pattern}' line")
    return float(m.group(1)), float(m.group(2))


def read_base_tokens(path: Path) -> tuple[int, int, list[int]]:
    """(n_ctx, n_chunk, tokens) from the header of llama-perplexity's base log-prob file: "_logits_", u32 n_ctx,
    i32 n_vocab, i32 n_chunk, then n_chunk * n_ctx int32 tokens."""
    import numpy as np

    with open(path, "rb") as fh:
        if fh.read(8) != b"_logits_":
            sys.exit(f"{path} is not a llama-perplexity log-prob file")
        n_ctx, _, n_chunk = (int(v) for v in np.fromfile(fh, dtype=np.int32, count=3))
        tokens = np.fromfile(fh, dtype=np.int32, count=n_ctx * n_chunk)
    return n_ctx, n_chunk, tokens.tolist()


def llama_tokens(gguf: Path, text: str) -> tuple[list[int], int | None]:
    """The text's tokens as llama-perplexity makes them (``common_tokenize(ctx, text, add_special=true,
    parse_special=false)``), and the BOS id if the vocabulary adds one (else None)."""
    from quantlab.engines.llamacpp import require_llama_cpp

    llama_cpp = require_llama_cpp()
    vocab_model = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    try:
        ids = vocab_model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        vocab = llama_cpp.llama_model_get_vocab(vocab_model._model.model)
        bos = int(llama_cpp.llama_vocab_bos(vocab)) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
    finally:
        vocab_model.close()
    return ids, bos


def quantlab_fidelity(base_path: Path, quant_path: Path, windows, threads: int) -> dict:
    """KLD(base || quant), top-1 agreement and both NLLs at positions ctx/2 .. ctx-2 of each window, through
    ``LlamaCppModel.log_probs`` and ``compare_window``; arrays of shape (chunks * (ctx - 1 - ctx/2),)."""
    import torch

    from quantlab.engines.llamacpp import LlamaCppModel
    from quantlab.evaluate.fidelity import compare_window

    ctx = windows.shape[1]
    first = ctx // 2
    base, quant = LlamaCppModel(base_path, threads=threads), LlamaCppModel(quant_path, threads=threads)
    out = {k: [] for k in ("kl", "agree", "nll", "nll_baseline")}
    seconds = {"base": 0.0, "quant": 0.0}
    try:
        for c in range(windows.shape[0]):
            window = windows[c:c + 1]
            start = time.perf_counter()
            lp = base.log_probs(window)[0]  # (ctx - 1, vocab): row i predicts token i + 1
            seconds["base"] += time.perf_counter() - start
            start = time.perf_counter()
            lq = quant.log_probs(window)[0]
            seconds["quant"] += time.perf_counter() - start
            compare_window(lq[first:], lp[first:], window[0, first + 1:], out)
            del lp, lq
    finally:
        base.close()
        quant.close()
    return {**{k: torch.cat(v).double().numpy() for k, v in out.items()}, "seconds": seconds}


def fidelity(args, tools: Path, f32: Path, quant: Path, text_path: Path, work: Path) -> dict:
    import numpy as np
    import torch

    common = ["-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads)]
    base_file = work / "base.kld"
    base_log, base_s = run_tool([str(tools / "llama-perplexity"), "-m", str(f32), "-f", str(text_path), *common,
                                 "--kl-divergence-base", str(base_file)], work / "perplexity-base.log")
    kld_log, kld_s = run_tool([str(tools / "llama-perplexity"), "-m", str(quant), *common, "--kl-divergence",
                               "--kl-divergence-base", str(base_file)], work / "perplexity-kld.log")
    theirs = {"kld": number(r"Mean\s+KLD", kld_log), "same_top": number(r"Same top p", kld_log),
              "ppl_q": number(r"Mean PPL\(Q\)", kld_log), "ppl_base": number(r"Mean PPL\(base\)", kld_log),
              "seconds": {"base": base_s, "quant": kld_s},
              "n_seq": re.search(r"n_seq=(\d+)", kld_log).group(1),
              "batch": re.search(r"batch_size=(\d+)", kld_log).group(1)}
    file_ctx, file_chunks, file_tokens = read_base_tokens(base_file)

    text = text_path.read_text(encoding="utf-8")
    if text.endswith("\n"):  # llama.cpp's -f drops one trailing newline
        text = text[:-1]
    ids, bos = llama_tokens(f32, text)
    chunks = min(args.chunks, len(ids) // args.ctx)
    windows = torch.tensor(ids[:chunks * args.ctx], dtype=torch.long).reshape(chunks, args.ctx)
    if bos is not None:
        windows[:, 0] = bos
    ours = quantlab_fidelity(f32, quant, windows, args.threads)
    n = ours["kl"].size
    kl_mean = float(ours["kl"].mean())
    same = 100 * float(ours["agree"].mean())
    return {"theirs": theirs, "ours": {"kld": (kl_mean, float(ours["kl"].std(ddof=1) / np.sqrt(n))),
                                       "same_top": (same, 100 * np.sqrt(same / 100 * (1 - same / 100) / (n - 1))),
                                       "ppl_q": float(np.exp(ours["nll"].mean())),
                                       "ppl_base": float(np.exp(ours["nll_baseline"].mean())),
                                       "seconds": ours["seconds"], "positions": n},
            "tokens": {"total": len(ids), "chunks": chunks, "file_ctx": file_ctx, "file_chunks": file_chunks,
                       "identical": file_tokens == ids[:chunks * args.ctx] and file_ctx == args.ctx
                       and file_chunks == chunks, "bos": bos}}


def llama_bench(tools: Path, quant: Path, args, work: Path, round_: int) -> dict:
    log, _ = run_tool([str(tools / "llama-bench"), "-m", str(quant), "-p", str(args.prompt), "-n", str(args.gen),
                       "-t", str(args.threads), "-r", str(args.repetitions), "-o", "json"],
                      work / f"llama-bench-{round_}.log", merge=False)
    rows = json.loads(log)
    pp = next(r for r in rows if r["n_prompt"] == args.prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == args.gen and r["n_prompt"] == 0)
    return {"prefill": pp["avg_ts"], "decode": tg["avg_ts"], "prefill_samples": pp["samples_ts"],
            "decode_samples": tg["samples_ts"], "row": tg}


def quantlab_bench(quant: Path, args) -> dict:
    from quantlab.engines.llamacpp import LlamaCppModel
    from quantlab.measure.latency import LatencySettings

    model = LlamaCppModel(quant, threads=args.threads)
    try:
        m = model.measure(LatencySettings(prompt_tokens=args.prompt, decode_tokens=args.gen, batch_sizes=(1,),
                                          warmup=1, repetitions=args.repetitions))
        cp = model._llm.context_params  # what the engine asked llama.cpp for, printed beside llama-bench's
        m["context"] = {"n_ctx": cp.n_ctx, "n_batch": cp.n_batch, "n_ubatch": cp.n_ubatch, "type_k": cp.type_k,
                        "type_v": cp.type_v, "flash_attn_type": cp.flash_attn_type,
                        "use_extra_bufts": model._llm.model_params.use_extra_bufts}
    finally:
        model.close()
    return {"prefill": m["prefill_tok_s"]["median"], "decode": m["decode_tok_s"]["1"]["median"],
            "prefill_samples": [args.prompt * 1000 / ms for ms in m["prefill_ms_samples"]],
            "decode_samples": m["decode_tok_s_samples"]["1"], "context": m["context"]}


def speed(args, tools: Path, quant: Path, work: Path) -> dict:
    rounds = {"llama-bench": [], "quantlab": []}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        rounds["llama-bench"].append(llama_bench(tools, quant, args, work, r))
        rounds["quantlab"].append(quantlab_bench(quant, args))
        loads.append(os.getloadavg()[0])
    return {"rounds": rounds, "loads": loads}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(args, tools: Path, paths: dict, text_path: Path, fid: dict | None, spd: dict | None) -> None:
    from quantlab.engines.llamacpp import require_llama_cpp
    from quantlab.provenance import library_version, provenance, sha256_file

    prov = provenance("cpu")
    info = tools.parent / "BUILD_INFO"
    print("$ .venv/bin/python scripts/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"model {args.model}; recipes gguf-f32 (base) and gguf-{args.qtype}; threads {args.threads}")
    for name, path in paths.items():
        print(f"  {name}: {path} ({path.stat().st_size:,} bytes, sha256 {sha256_file(path)[:16]})")
    print(f"text {text_path} (sha256 {sha256_file(text_path)[:16]})")
    print(f"versions {prov['versions']}; llama-cpp-python {library_version('llama_cpp_python')} "
          f"({require_llama_cpp().llama_print_system_info().decode().strip()})")
    built = " | ".join(info.read_text().splitlines()) if info.is_file() else "no BUILD_INFO"
    print(f"llama.cpp tools {tools}: {built}")
    print(f"cpu {prov['device']['cpu']}, {os.cpu_count()} cores (shared); git {prov['git_sha']}")

    if fid:
        t, o, tok = fid["theirs"], fid["ours"], fid["tokens"]
        print(f"\n(a) fidelity: gguf-{args.qtype} against gguf-f32 on the same text, context {args.ctx}, "
              f"{tok['chunks']} chunks ({tok['total']:,} tokens in the text), positions {args.ctx // 2}.."
              f"{args.ctx - 2} of each chunk: {o['positions']} scored")
        bos = "not added" if tok["bos"] is None else f"id {tok['bos']}"
        same = "yes" if tok["identical"] else "NO"
        print(f"    tokens: llama.cpp's tokenizer through llama-cpp-python, BOS {bos}; identical to the tokens "
              f"llama-perplexity saved in its base file: {same}")
        print(f"    llama-perplexity: {t['n_seq']} chunks per batch of {t['batch']} (its default n_batch 2048); "
              f"quantlab: one chunk per LlamaCppModel.log_probs call")
        print(f"    Mean KLD = mean over scored positions of sum_v p_base(v) (log p_base(v) - log p_quant(v)), nats "
              f"(llama.cpp: base log-probs stored as 16-bit, terms with log p_base <= -16 dropped)")
        print(f"    Same top p = % of scored positions where argmax p_quant == argmax p_base")
        print(f"{'':34s} {'llama-perplexity':>20s} {'quantlab':>20s}")
        print(f"{'Mean KLD':34s} {t['kld'][0]:11.6f} ± {t['kld'][1]:.6f} {o['kld'][0]:11.6f} ± {o['kld'][1]:.6f}")
        print(f"{'Same top p (%)':34s} {t['same_top'][0]:12.3f} ± {t['same_top'][1]:5.3f} "
              f"{o['same_top'][0]:12.3f} ± {o['same_top'][1]:5.3f}")
        print(f"{'PPL(Q) (scored positions)':34s} {t['ppl_q'][0]:20.4f} {o['ppl_q']:20.4f}")
        print(f"{'PPL(base)':34s} {t['ppl_base'][0]:20.4f} {o['ppl_base']:20.4f}")
        print(f"{'wall s (base run, quant run)':34s} {t['seconds']['base']:9.1f} {t['seconds']['quant']:9.1f} "
              f"{o['seconds']['base']:9.1f} {o['seconds']['quant']:9.1f}")
        rel = o["kld"][0] / t["kld"][0] - 1
        pts = o["same_top"][0] - t["same_top"][0]
        print(f"mean KLD, quantlab / llama-perplexity - 1: {100 * rel:+.2f} % (goal within ±{100 * KLD_GOAL:.0f} %) "
              f"{verdict(abs(rel) <= KLD_GOAL)}")
        print(f"same top p, quantlab - llama-perplexity: {pts:+.3f} points (goal within ±{TOP_GOAL}) "
              f"{verdict(abs(pts) <= TOP_GOAL)}")

    if spd:
        row = spd["rounds"]["llama-bench"][0]["row"]
        print(f"\n(b) speed: gguf-{args.qtype}, {args.threads} thread(s), prompt {args.prompt} tokens, {args.gen} "
              f"generated, {args.repetitions} repetitions after one warm-up; {args.rounds} rounds, llama-bench and "
              f"quantlab alternating (1-min load average {' '.join(f'{x:.1f}' for x in spd['loads'])})")
        print(f"    llama-bench (defaults kept): n_batch {row['n_batch']}, n_ubatch {row['n_ubatch']}, type_k "
              f"{row['type_k']}, type_v {row['type_v']}, flash_attn {row.get('flash_attn')}, "
              f"repack {row['repack']}, poll {row['poll']}, "
              f"n_ctx = prompt + generated per test")
        c = spd["rounds"]["quantlab"][0]["context"]
        print(f"    quantlab's engine asks llama.cpp for: n_ctx {c['n_ctx']}, n_batch {c['n_batch']}, n_ubatch "
              f"{c['n_ubatch']}, type_k {c['type_k']}, type_v {c['type_v']} (1 = f16), flash_attn_type "
              f"{c['flash_attn_type']} (-1 auto, 0 off, 1 on), repack (use_extra_bufts) {c['use_extra_bufts']}")
        print("    prefill tok/s = prompt tokens / seconds of one batch of them from an empty KV cache")
        print("    decode tok/s = generated tokens / seconds of generating them one at a time from an empty KV cache")
        print("    as reported: llama-bench avg_ts = mean over repetitions; quantlab = median over repetitions")
        for kind in ("prefill", "decode"):
            print(f"{kind} tok/s, per round:")
            for who, values in spd["rounds"].items():
                shown = "  ".join(f"{v[kind]:8.1f} [{' '.join(f'{s:.0f}' for s in v[kind + '_samples'])}]"
                                  for v in values)
                spread = max(v[kind] for v in values) / min(v[kind] for v in values) - 1
                print(f"  {who:12s} {shown}  (rounds spread {100 * spread:.0f} %)")
        print("ratio = quantlab / llama-bench of the same round (the two ran back to back, so the machine's load, "
              "which moves both, mostly cancels); the goal is on the median of the rounds' ratios")
        for kind in ("prefill", "decode"):
            theirs = statistics.median(v[kind] for v in spd["rounds"]["llama-bench"])
            ours = statistics.median(v[kind] for v in spd["rounds"]["quantlab"])
            ratios = [q[kind] / b[kind] for q, b in zip(spd["rounds"]["quantlab"], spd["rounds"]["llama-bench"])]
            ratio = statistics.median(ratios)
            print(f"{kind} tok/s: median round llama-bench {theirs:.1f}, quantlab {ours:.1f}; ratio per round "
                  f"{' '.join(f'{r:.2f}' for r in ratios)}; median ratio {ratio:.3f} (goal within "
                  f"±{100 * SPEED_GOAL:.0f} %) {verdict(abs(ratio - 1) <= SPEED_GOAL)}")
        for kind in ("prefill", "decode"):
            pooled = {who: statistics.median(s for v in values for s in v[kind + "_samples"])
                      for who, values in spd["rounds"].items()}
            best = {who: max(s for v in values for s in v[kind + "_samples"]) for who, values in spd["rounds"].items()}
            print(f"  (one statistic for both: median of every repetition of every round, {kind}: llama-bench "
                  f"{pooled['llama-bench']:.1f}, quantlab {pooled['quantlab']:.1f}, ratio "
                  f"{pooled['quantlab'] / pooled['llama-bench']:.3f}; fastest repetition: llama-bench "
                  f"{best['llama-bench']:.1f}, quantlab {best['quantlab']:.1f}, ratio "
                  f"{best['quantlab'] / best['llama-bench']:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--qtype", default="q4_k_m")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--only", choices=("fidelity", "speed"), help="run one half only")
    ap.add_argument("--tools", help="folder with llama-perplexity and llama-bench (default: build_llama_tools.sh)")
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args()

    import torch

    from quantlab.evaluate.text import resolve_text
    from quantlab.layouts.gguf import FILE
    from quantlab.recipe import parse_recipe
    from quantlab.sweep.commands import quantize_model

    torch.set_num_threads(args.threads)
    tools = tools_dir(args.tools)
    text_path = Path(resolve_text("wikitext2_raw").origin)
    paths = {name: Path(quantize_model(args.model, parse_recipe(name), device="cpu", threads=args.threads)
                        ["artifact"]) / FILE for name in ("gguf-f32", f"gguf-{args.qtype}")}
    f32, quant = paths.values()
    with tempfile.TemporaryDirectory(prefix="bench_gguf-") as tmp:
        work = Path(tmp)
        fid = fidelity(args, tools, f32, quant, text_path, work) if args.only != "speed" else None
        spd = speed(args, tools, quant, work) if args.only != "fidelity" else None
        buf = io.StringIO()
        with redirect_stdout(buf):
            report(args, tools, paths, text_path, fid, spd)
    print(buf.getvalue(), end="")
    if args.out:
        Path(args.out).write_text(buf.getvalue())


if __name__ == "__main__":
    main()
