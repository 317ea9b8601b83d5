"""Matrix-multiply throughput of this CPU in fp32, bf16 and fp16, side by side: why a fit measured on a CPU is
held in bf16 (``--dtype bfloat16``) although fp16 is the default (as vLLM runs GPTQ on GPUs).

One Qwen2.5-Coder-1.5B MLP projection's shape, (tokens, 1536) @ (1536, 8960), a warm-up, then ``--reps`` timed
repetitions per dtype (median), each dtype's GFLOP/s and its time as a multiple of fp32's.

    .venv/bin/python scripts/bench_dtype.py [--threads 1] [--tokens 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    import torch

    from quantlab.provenance import provenance

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    isa = sorted({f for f in flags if f.startswith(("avx512", "amx", "avx2", "f16c"))})
    prov = provenance("cpu")
    print(f"# bench_dtype: (tokens {args.tokens}, 1536) @ (1536, 8960), {args.threads} thread(s), median of "
          f"{args.reps}; torch {torch.__version__}; git {prov.get('git_sha')}, {time.strftime('%Y-%m-%d')}")
    print(f"# CPU flags: {' '.join(isa) or 'unknown'}")
    flop = 2 * args.tokens * 1536 * 8960
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(args.tokens, 1536, generator=gen).to(dtype)
        b = torch.randn(1536, 8960, generator=gen).to(dtype)
        a @ b  # warm-up
        samples = []
        for _ in range(args.reps):
            start = time.perf_counter()
            a @ b
            samples.append(time.perf_counter() - start)
        seconds[dtype] = statistics.median(samples)
    base = seconds[torch.float32]
    print(f"{'dtype':<16} {'median s':>10} {'GFLOP/s':>9} {'x fp32 time':>12}")
    for dtype, s in seconds.items():
        print(f"{str(dtype):<16} {s:>10.4f} {flop / s / 1e9:>9.1f} {s / base:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
