"""How far a GGUF recipe's file moves each tensor from the source GGUF it was made from, by tensor type.

For a model whose fp baseline is itself a GGUF dequantized (the named models), a recipe re-quantizes values that
already sit on a ggml grid. This prints, for each (source type -> file type) pair, the tensors, their parameters,
and the relative RMS error ||file - source|| / ||source|| over them (both dequantized with gguf-py), for one or
more GGUF artifacts of the same source: where a tensor goes back to its source type, the error says how much of
the grid the quantizer finds again, and how much room an importance matrix has.

    .venv/bin/python scripts/gguf_requant_error.py --source SOURCE.gguf ARTIFACT_DIR [ARTIFACT_DIR ...]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import gguf
    import numpy as np

    from quantlab.gguf_file import gguf_reader

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True)
    ap.add_argument("artifacts", nargs="+")
    args = ap.parse_args()
    print(f"$ .venv/bin/python scripts/gguf_requant_error.py --source {args.source} {' '.join(args.artifacts)}")
    source = {t.name: t for t in gguf_reader(Path(args.source)).tensors}
    for artifact in args.artifacts:
        groups = defaultdict(lambda: [0, 0, 0.0, 0.0])  # tensors, parameters, sum sq error, sum sq source
        for t in gguf_reader(Path(artifact) / "model.gguf").tensors:
            s = source[t.name]
            if len(t.shape) < 2:
                continue
            a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
            b = gguf.quants.dequantize(s.data, s.tensor_type).astype(np.float64)
            g = groups[(s.tensor_type.name, t.tensor_type.name)]
            g[0] += 1
            g[1] += a.size
            g[2] += float(((a - b) ** 2).sum())
            g[3] += float((b ** 2).sum())
        print(f"\n{artifact}")
        print(f"{'source -> file':18s} {'tensors':>8s} {'parameters':>14s} {'rel. RMS error':>15s}")
        for (src, dst), (n, params, err, ref) in sorted(groups.items()):
            print(f"{src + ' -> ' + dst:18s} {n:8d} {params:14,d} {(err / ref) ** 0.5:15.6f}")


if __name__ == "__main__":
    main()
