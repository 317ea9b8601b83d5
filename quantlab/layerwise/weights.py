"""Tensors of a safetensors checkpoint, read one at a time with plain reads into memory the caller owns.

``safe_open`` memory-maps the file, and every page it touches stays in the process's resident set while the file
is open; reading a 7 GB checkpoint that way makes the process look 7 GB larger than the tensors it holds. Here
each tensor (or a block of its rows) is read with ``readinto`` straight into a tensor's storage, so a process
holds exactly what it asked for. The format: 8 bytes little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}}``, then the data, offsets relative to its start.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import ModelLoadError

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn"}


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


class CheckpointReader:
    """Every tensor of a model directory's ``*.safetensors`` (sharded or not), by name."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{model_dir} has no *.safetensors weights — layer-by-layer execution reads "
                                 "safetensors; save the model with save_pretrained")
        self.entries: dict[str, Entry] = {}
        self.metadata: dict[str, str] = {}  # merged __metadata__ (torchao's describes its tensor subclasses)
        for path in files:
            entries, metadata = _header(path)
            self.entries.update(entries)
            self.metadata.update(metadata)

    def is_subclass(self, name: str) -> bool:
        """Whether ``name`` is a torchao tensor subclass stored flattened (``<module>._<leaf>_<part>``)."""
        meta = self.metadata.get(name)
        return bool(meta) and json.loads(meta).get("_type") not in (None, "Tensor")

    def read_subclass(self, name: str):
        """A torchao tensor subclass (e.g. IntxUnpackedToInt8Tensor) rebuilt from its flattened parts."""
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        module, _, leaf = name.rpartition(".")
        prefix = f"{module}._{leaf}_"
        parts = {k: self.read(k) for k in self.entries if k.startswith(prefix)}
        tensors, _ = unflatten_tensor_state_dict(parts, {name: self.metadata[name], "tensor_names": json.dumps([name])})
        return tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> Entry:
        return self.entries[name]

    def read(self, name: str, rows: tuple[int, int] | None = None):
        """The tensor (or rows ``[start, stop)`` of its first dimension) in its stored dtype, on CPU."""
        import torch

        e = self.entries[name]
        start, stop = rows or (0, e.shape[0] if e.shape else 1)
        shape = (stop - start, *e.shape[1:]) if e.shape else ()
        out = torch.empty(shape, dtype=getattr(torch, e.dtype))
        self._read_bytes(e, e.begin + start * e.row_bytes, out)
        return out

    def read_into(self, name: str, target) -> None:
        """Fill ``target`` (a CPU tensor of the entry's shape) with the tensor, converting dtype if it differs."""
        e = self.entries[name]
        if tuple(target.shape) != e.shape:
            raise ModelLoadError(f"{name} is {list(e.shape)} in the checkpoint but {list(target.shape)} in the model "
                                 "— the config does not match the weights")
        if str(target.dtype).removeprefix("torch.") == e.dtype and target.is_contiguous() and target.device.type == "cpu":
            self._read_bytes(e, e.begin, target)
        else:
            target.copy_(self.read(name))

    def read_rows(self, name: str, index):
        """Rows ``index`` (a 1-D LongTensor) of a 2-D tensor, e.g. the embedding rows of a text's tokens."""
        import torch

        e = self.entries[name]
        unique, inverse = torch.unique(index, return_inverse=True)
        rows = torch.empty((unique.numel(), *e.shape[1:]), dtype=getattr(torch, e.dtype))
        with open(e.file, "rb", buffering=0) as fh:
            for i, row in enumerate(unique.tolist()):
                _readinto(fh, e.begin + row * e.row_bytes, rows[i])
        return rows[inverse]

    def _read_bytes(self, e: Entry, offset: int, out) -> None:
        with open(e.file, "rb", buffering=0) as fh:
            _readinto(fh, offset, out)


def _readinto(fh, offset: int, out) -> None:
    import torch

    view = memoryview(out.view(torch.uint8).reshape(-1).numpy()) if out.numel() else memoryview(b"")
    fh.seek(offset)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise ModelLoadError(f"{fh.name} ends before its header says — the file is truncated; re-save the model")
        done += n


def stored_dtypes(model_dir: str | Path) -> dict[str, str]:
    """The dtype of every tensor of a model directory's ``*.safetensors`` as the headers name it (``F32``, ``I8``,
    ``U8``, ``I32``, ``F8_E4M3``...), read from the headers alone."""
    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        header, _ = _raw_header(path)
        out.update({name: meta["dtype"] for name, meta in header.items() if name != "__metadata__"})
    return out


def _raw_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset its data starts at."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(f"Unreadable safetensors header in {path} ({exc}) — re-save the model") from None
    return header, 8 + length


def _header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    header, base = _raw_header(path)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor {name} has dtype {meta['dtype']}, which layer-by-layer execution "
                                 "does not read — raise --max-memory so the model loads whole")
        begin, end = meta["data_offsets"]
        out[name] = Entry(path, _DTYPES[meta["dtype"]], tuple(meta["shape"]), base + begin, end - begin)
    return out, header.get("__metadata__") or {}
