"""The sha256 that names a model's weights (its fingerprint), and a cache of large files' sha256."""

from __future__ import annotations

import json
from pathlib import Path

from quantlab.fsutil import atomic_write_json, file_lock
from quantlab.home import quantlab_home
from quantlab.provenance import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def fingerprint_dir(path: str | Path) -> str:
    """sha256 over config.json and each weight file's sha256: changes when any weight byte does."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    h.update(sha256_file(path / "config.json").encode())
    for p in sorted(path.iterdir()):
        if p.suffix in WEIGHT_SUFFIXES:
            h.update(p.name.encode())
            h.update(cached_sha256(p).encode())
    return h.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a large file, remembered under QUANTLAB_HOME by (path, size, mtime_ns) as git's index does.

    Hashing SmolLM2's 540 MB of weights takes ~2 s; every command resolves its model, so it is done once.
    """
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = quantlab_home() / "sha256-cache.json"
    with file_lock(cache_file.with_suffix(".lock")):
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        if key not in cache:
            cache[key] = sha256_file(path)
            atomic_write_json(cache_file, cache)
    return cache[key]
