"""A GGUF fit's file against llama.cpp's own tool: quantlab writes a per-tensor mix with ``llama_model_quantize`` and
one tensor-type override per tensor (``quantlab.methods.fit_gguf``); ``llama-quantize --tensor-type-file --pure``
is given the list quantlab keeps beside the file. Both files' sha256 are printed, and whether they are equal.

    bash scripts/build_llama_tools.sh   # once: llama-quantize from llama-cpp-python's source distribution
    .venv/bin/python scripts/gguf_tensor_type_route.py [--model smollm2-135m]

The mix cycles five formats over the units (the embedding, each linear), so every type and SmolLM2's fallbacks
(Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 on 576-wide rows) occur.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

FORMATS = ("gguf-q4_k", "gguf-q6_k", "gguf-q8_0", "gguf-f16", "gguf-q5_k")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a model loaded from a GGUF (default: the embedded SmolLM2)")
    args = ap.parse_args()

    from quantlab.fit.units import model_units
    from quantlab.methods.fit import FitConfig
    from quantlab.methods.fit_gguf import FILE_TYPE_OF, gguf_fit_layout, tensor_type_list
    from quantlab.methods.gguf import quantize_gguf, unquantized_gguf
    from quantlab.models.load import load_config
    from quantlab.models.source import resolve_model
    from quantlab.plan.shapes import model_shapes

    tools = subprocess.run(["bash", "scripts/build_llama_tools.sh"], capture_output=True, text=True, check=True)
    tool = Path(tools.stdout.strip().splitlines()[-1]) / "llama-quantize"
    source = resolve_model(args.model)
    shapes = model_shapes(load_config(source.path))
    units = model_units(shapes, "linear", embedding=True)
    alloc = tuple((u.name, FORMATS[i % len(FORMATS)]) for i, u in enumerate(units))
    requested = gguf_fit_layout(FitConfig(weights_budget=1, formats=FORMATS, allocation=alloc)).requested(shapes)
    f32 = unquantized_gguf(Path(source.path))
    file_type = next(FILE_TYPE_OF[k] for k, _ in Counter(requested.values()).most_common() if k in FILE_TYPE_OF)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "tensor-types.txt").write_text(tensor_type_list(requested))
        quantize_gguf(f32, out / "quantlab.gguf", file_type, None, overrides=requested)
        subprocess.run([str(tool), "--tensor-type-file", str(out / "tensor-types.txt"), "--pure", str(f32),
                        str(out / "tool.gguf"), file_type.upper(), "1"], capture_output=True, check=True)
        ours, theirs = sha256(out / "quantlab.gguf"), sha256(out / "tool.gguf")
        size = (out / "quantlab.gguf").stat().st_size
    types = Counter(gguf_fit_layout(FitConfig(weights_budget=1, formats=FORMATS, allocation=alloc)).types(shapes).values())
    print(f"model {source.ref}; {len(requested)} tensors listed, written as {dict(types)}; file type {file_type}")
    print(f"quantlab (llama_model_quantize, tt_overrides): {size} bytes, sha256 {ours}")
    print(f"{tool.name} --tensor-type-file --pure {file_type.upper()}: sha256 {theirs}")
    print("the same file, byte for byte" if ours == theirs else "DIFFERENT files")


if __name__ == "__main__":
    main()
