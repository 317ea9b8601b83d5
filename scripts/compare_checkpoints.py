"""Whether two model directories hold the same tensors: names, dtypes, shapes and bytes, shard layout aside.

    .venv/bin/python scripts/compare_checkpoints.py DIR_A DIR_B

Reads one tensor at a time with plain reads (``quantlab.layerwise.weights``), so a 7 GB pair costs a tensor's
memory. Also compares the torchao metadata of each tensor. Exit 1 when anything differs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.layerwise.weights import CheckpointReader  # noqa: E402


def digest(reader: CheckpointReader, name: str) -> str:
    import torch

    return hashlib.sha256(reader.read(name).reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> int:
    a_dir, b_dir = map(Path, sys.argv[1:3])
    a, b = CheckpointReader(a_dir), CheckpointReader(b_dir)
    print(f"$ .venv/bin/python scripts/compare_checkpoints.py {a_dir} {b_dir}")
    for label, r, d in (("A", a, a_dir), ("B", b, b_dir)):
        files = sorted(p.name for p in d.glob("*.safetensors"))
        print(f"{label}: {d} — {len(files)} safetensors file(s), {len(r.entries)} tensors, "
              f"{sum(e.nbytes for e in r.entries.values())} bytes")
    only = sorted(set(a.entries) ^ set(b.entries))
    differ = [n for n in sorted(set(a.entries) & set(b.entries))
              if (a.entry(n).dtype, a.entry(n).shape) != (b.entry(n).dtype, b.entry(n).shape) or digest(a, n) != digest(b, n)]
    meta_keys = (set(a.metadata) | set(b.metadata)) - {"tensor_names"}
    meta = sorted(k for k in meta_keys if a.metadata.get(k) != b.metadata.get(k))
    names = lambda r: sorted(json.loads(r.metadata.get("tensor_names", "[]")))  # noqa: E731
    print(f"tensors in one only: {len(only)} {only[:5]}")
    print(f"tensors whose dtype, shape or bytes differ: {len(differ)} {differ[:5]}")
    print(f"metadata entries that differ: {len(meta)} {meta[:5]}; tensor_names equal as sets: {names(a) == names(b)}")
    same = not only and not differ and not meta and names(a) == names(b)
    print("identical tensors and metadata" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
