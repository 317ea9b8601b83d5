"""Two runs' per-token fidelity values (per_token.npz of one recipe) side by side, and their summaries.

    .venv/bin/python scripts/compare_per_token.py A.npz B.npz

Prints the largest per-token difference of each array (KL, top-1 agreement, NLL of the candidate and of the fp
baseline) and each run's summary (``quantlab.evaluate.fidelity.summarize``, default settings): e.g. a recipe
measured without a budget and under one, where the reference and the candidate ran layer by layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.evaluate import fidelity as fid  # noqa: E402


def main() -> None:
    import numpy as np

    a, b = (dict(np.load(p)) for p in sys.argv[1:3])
    print(f"$ .venv/bin/python scripts/compare_per_token.py {sys.argv[1]} {sys.argv[2]}")
    for key in a:
        print(f"{key}: max |A - B| {float(np.abs(a[key].astype(np.float64) - b[key].astype(np.float64)).max()):.3g}")
    for name, data in (("A", a), ("B", b)):
        r = fid.summarize({k: v.astype(np.float64) for k, v in data.items()}, fid.FidelitySettings())
        lo, hi = r["ci95"]["kld_mean"]
        print(f"{name}: kld_mean {r['kld_mean']:.6f} [{lo:.6f}, {hi:.6f}], kld_p99 {r['kld_p99']:.5f}, "
              f"top1 {r['top1_agreement']:.4f}, ppl {r['ppl']:.4f}, fp ppl {r['ppl_baseline']:.4f} ({r['tokens']} tokens)")


if __name__ == "__main__":
    main()
