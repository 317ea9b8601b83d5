"""A sharded safetensors checkpoint written shard by shard, tensors streamed, with the index transformers reads.

Each shard is written as its tensors arrive (``add``), so no more than one shard's tensors need be held; a large
tensor can be streamed in row blocks (``add_streamed``). Every shard carries the same ``__metadata__`` (as
``save_pretrained`` writes it for torchao checkpoints, whose loader merges the shards' metadata). Files are
named ``model-00001-of-0000N.safetensors`` once the count is known, with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
                "float8_e5m2": "F8_E5M2"}


def _dtype_name(dtype) -> str:
    return _DTYPE_NAMES[str(dtype).removeprefix("torch.")]


def _nbytes(shape, dtype) -> int:
    import torch

    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class ShardWriter:
    def __init__(self, out_dir: Path, metadata: dict[str, str] | None = None):
        self.out_dir, self.metadata = Path(out_dir), {"format": "pt", **(metadata or {})}  # as save_pretrained writes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict) -> None:
        """One shard holding ``tensors`` (name -> CPU tensor)."""
        self.add_streamed({name: (t.dtype, tuple(t.shape), [t]) for name, t in tensors.items()})

    def add_streamed(self, entries: dict) -> None:
        """One shard of ``name -> (dtype, shape, blocks)``, where ``blocks`` yields tensors whose bytes, in order,
        are the tensor's (e.g. row blocks read from another checkpoint)."""
        import torch

        header, offset = {}, 0
        for name, (dtype, shape, _) in entries.items():
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": _dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = self.out_dir / f".shard-{len(self.shards):05d}.safetensors"
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for name, (dtype, shape, blocks) in entries.items():
                written = 0
                for block in blocks:
                    data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
                    fh.write(memoryview(data))
                    written += data.nbytes
                if written != _nbytes(shape, dtype):
                    raise ValueError(f"{name}: wrote {written} bytes for a {list(shape)} {dtype} tensor")
        self.shards.append((path, list(entries)))
        self.total += offset

    def finish(self) -> None:
        """Name the shards and write the index."""
        n = len(self.shards)
        weight_map = {}
        for i, (path, names) in enumerate(self.shards, 1):
            final = self.out_dir / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
