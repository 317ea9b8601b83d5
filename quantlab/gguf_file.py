"""A llama.cpp GGUF file's header: read safely (a damaged file is one error naming it), its file type and the
parameter-weighted mix of its tensor types (the baseline note of a dequantized GGUF)."""

from __future__ import annotations

import mmap
from pathlib import Path

from quantlab.errors import ModelLoadError

BLOCK_BYTES = 32 * 2**20  # F32 rows dequantized at a time by write_unquantized


def gguf_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, KeyError, IndexError ... on a damaged file
        raise damaged_gguf(path, exc) from None


def damaged_gguf(path: Path, exc: Exception) -> ModelLoadError:
    """A GGUF the reader cannot parse: not a GGUF at all (its magic), or one cut short or corrupted."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        return ModelLoadError(f"Cannot read {path} ({err.strerror}) — check the path and its permissions")
    if magic != b"GGUF":
        return ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF') — pass a llama.cpp .gguf "
                              "file or a model directory")
    return ModelLoadError(f"GGUF file {path} is truncated or corrupt ({path.stat().st_size} bytes the GGUF reader "
                          "cannot parse) — download it again")


def gguf_weights(path: Path) -> tuple[str | None, list[tuple[str, float]]]:
    """(the file type from ``general.file_type``, e.g. Q4_K_M, or None when the file does not record it; each
    tensor type's share of the parameters, largest first), read from a GGUF's header.

    A file type names a mix: a Q4_K_M file holds Q4_K and Q6_K weights (some Q5_0, Q8_0) beside F32 norms,
    which are the most frequent tensors and a sliver of the parameters."""
    from gguf import LlamaFileType

    reader = gguf_reader(path)
    field = reader.fields.get("general.file_type")
    file_type = None
    if field is not None:
        value = int(field.contents())
        known = value in LlamaFileType._value2member_map_
        file_type = LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_") if known \
            else f"file type {value}"
    params: dict[str, int] = {}
    for t in reader.tensors:
        params[t.tensor_type.name] = params.get(t.tensor_type.name, 0) + int(t.n_elements)
    total = sum(params.values()) or 1
    return file_type, sorted(((k, 100 * v / total) for k, v in params.items()), key=lambda kv: -kv[1])


def gguf_note(path: Path, file_type: str | None, mix: list[tuple[str, float]]) -> str:
    """The baseline note of a dequantized GGUF: its file type and the parameter-weighted mix of tensor types."""
    shares = ", ".join(f"{name} {_percent(share)} %" for name, share in mix) or "no tensors"
    what = f"GGUF {file_type}" if file_type else "a GGUF that does not record its file type (general.file_type)"
    return (f"weights dequantized from {what} ({path.name}: {shares} of parameters); the fp baseline is this GGUF "
            "dequantized, not the original bf16 checkpoint")


def _percent(share: float) -> str:
    return f"{share:.0f}" if share >= 10 else f"{share:.2g}"


def write_unquantized(source: Path, target: Path) -> None:
    """Write ``source``'s tensors dequantized to F32 into ``target``, a GGUF with ``source``'s metadata (its
    architecture, hyperparameters, tokenizer, chat template) and ``general.file_type`` ALL_F32: the unquantized
    GGUF that llama.cpp quantizes from, and runs as the engine's own fp floor. It holds the same values as the
    dequantized model transformers loads (both dequantize with gguf-py), in llama.cpp's own tensor layout. Tensors
    are dequantized and written ``BLOCK_BYTES`` of F32 rows at a time, and the source pages read are released as
    they are used: the write holds a few blocks, whatever the model's size."""
    import gguf
    import numpy as np

    reader = gguf_reader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), arch)
    for field in reader.fields.values():
        if field.name in ("general.architecture", "general.file_type") or field.name.startswith("GGUF."):
            continue  # the writer writes the architecture and its own header fields
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:  # gguf-py's numpy shapes are ggml's dims reversed: (rows, row length)
        shape = tuple(int(d) for d in reversed(t.shape))
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), 4 * int(t.n_elements),
                               raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    pages = getattr(reader.data, "_mmap", None)  # the source file's mapping (np.memmap keeps its mmap here)
    (out,) = writer.fout  # one file: the writer's own tensor-data step, done a block of rows at a time
    for t in reader.tensors:
        writer.write_padding(out, out.tell())
        rows = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)
        step = max(1, BLOCK_BYTES // (4 * max(int(t.n_elements) // rows.shape[0], 1)))
        for start in range(0, rows.shape[0], step):
            gguf.quants.dequantize(rows[start:start + step], t.tensor_type).astype(np.float32, copy=False).tofile(out)
            if pages is not None:  # drop the source pages read from this process's resident set (not from the cache)
                pages.madvise(mmap.MADV_DONTNEED)
        writer.write_padding(out, 4 * int(t.n_elements))
    writer.close()
