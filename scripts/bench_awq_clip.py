"""AWQ's clip search, GPTQModel 7.6's own against quantlab's (``quantlab.methods.awq.clip_search``), side by side on one
linear of a real model's shape: wall time, peak RSS above the start, and whether both choose the same clips.

    .venv/bin/python scripts/bench_awq_clip.py [--model qwen2.5-coder-1.5b] [--linear down_proj] [--threads 1]

GPTQModel's runs in the dtype AWQ loads the model in on CPU (fp16), as a quantize does; quantlab's takes the same
fp16 weight and tokens and computes in fp32. The weight and tokens are random (seeded) of the linear's shape, the
tokens 32 windows of 256 (sampled to 512, as both searches do), group size 64, zero point. The clips are compared
as chosen: GPTQModel's fp16 arithmetic rounds the candidates and errors differently, so "same choice" is the share of
(channel, group) pairs where both chose the same ratio, not a bit-for-bit check (tests/test_awq.py checks that in
fp32).
"""

from __future__ import annotations

import argparse
import os
import threading
import time


def peak_rss_during(fn):
    """(result, seconds, peak RSS above the RSS at the start, bytes), RSS sampled every 5 ms."""
    import psutil

    proc = psutil.Process(os.getpid())
    start, peak, done = proc.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    return out, seconds, max(peak[0], proc.memory_info().rss) - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--linear", default="down_proj", help="a linear of the first decoder layer, by its leaf name")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from gptqmodel.looper.awq_processor import AWQProcessor

    from quantlab.methods.awq import clip_search
    from quantlab.plan import resolve_config
    from quantlab.plan.shapes import model_shapes

    torch.set_num_threads(args.threads)
    config, source = resolve_config(args.model)
    shapes = model_shapes(config)
    lin = next(x for x in shapes.linears if x.name.endswith(f"layers.0.mlp.{args.linear}")
               or x.name.endswith(f"layers.0.self_attn.{args.linear}"))
    processor = AWQProcessor.__new__(AWQProcessor)  # the searches read only the quantize config
    processor.qcfg = type("Q", (), {"group_size": 64, "bits": 4, "sym": False})()
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(lin.out_features, lin.in_features, generator=g) * 0.02).half()
    x = torch.randn(32, 256, lin.in_features, generator=g).half()

    theirs, t_theirs, m_theirs = peak_rss_during(lambda: AWQProcessor._compute_best_clip(processor, w, x))
    ours, t_ours, m_ours = peak_rss_during(lambda: clip_search(processor, w, x))
    same = (theirs == ours).float().mean().item()
    print(f"model {args.model} ({source}); linear {lin.name} ({lin.out_features} x {lin.in_features}), random "
          f"fp16 weight and 32 x 256 tokens (seed 0), group size 64, zero point, {args.threads} thread(s)")
    print(f"GPTQModel {AWQProcessor.__module__.split('.')[0]} _compute_best_clip (fp16): {t_theirs:.1f} s, "
          f"peak RSS +{m_theirs / 1e9:.2f} GB")
    print(f"quantlab clip_search (fp32 matrix products): {t_ours:.1f} s, peak RSS +{m_ours / 1e9:.2f} GB")
    print(f"speed-up {t_theirs / t_ours:.1f}x; memory {m_theirs / max(m_ours, 1):.1f}x less; the same clip chosen for "
          f"{same:.2%} of {ours.numel()} (channel, group) pairs")


if __name__ == "__main__":
    main()
