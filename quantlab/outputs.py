"""What quantlab may replace: in a folder it writes into (an --out), the manifest of the files it wrote there.

Every path quantlab writes for a user follows one rule: it replaces or removes only files its manifest lists. An
--out folder holding anyone else's files is refused (check_own_dir); a single output file (report --out, eval
--output, gate --summary) that exists and is not listed is refused (check_output_file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from quantlab.errors import UsageError
from quantlab.fsutil import atomic_write_bytes, atomic_write_json, check_writable_dir

#: In a folder quantlab writes into (an --out), the files it wrote there: the only ones it replaces or removes.
MANIFEST = ".quantlab-manifest.json"


def listed_files(folder: Path) -> set[str]:
    """The paths (relative, '/'-separated) ``folder``'s manifest says quantlab wrote; none without one."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    files = data.get("files") if isinstance(data, dict) else None
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def foreign_files(folder: str | Path) -> list[str]:
    """Files under ``folder`` that no manifest in it (or in a subfolder above them) lists: not quantlab's. Its
    temporary files (a publication's staging folder, an atomic write's temp file) are quantlab's too."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found, manifests = [], {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not _STAGING.fullmatch(d)]
        for name in filenames:
            if not _written_here(here / name, folder, manifests):
                found.append((here / name).relative_to(folder).as_posix())
    return sorted(found)


_STAGING = re.compile(r"\.publish\.\d+\..+\.tmp")
_ATOMIC_TEMP = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp")  # atomic_write_bytes's mkstemp name for <name>


def _written_here(path: Path, top: Path, manifests: dict) -> bool:
    """Whether a manifest in ``path``'s folder or one above it (up to ``top``) lists it."""
    temp = _ATOMIC_TEMP.fullmatch(path.name)
    names = [path.name] + ([temp.group(1)] if temp else [])
    owner = path.parent
    while True:
        if owner not in manifests:
            manifests[owner] = listed_files(owner)
        rel = path.parent.relative_to(owner)
        for name in names:
            if (rel / name).as_posix() in manifests[owner] or (owner == path.parent and name == MANIFEST):
                return True
        if owner == top:
            return False
        owner = owner.parent


def check_own_dir(folder: str | Path, option: str = "--out") -> None:
    """Refuse, before any work, a folder holding files quantlab did not write: it never modifies those."""
    foreign = foreign_files(folder)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UsageError(f"{option} {folder} holds files quantlab did not write ({shown}) — choose a new or empty "
                         f"{option}, or move them; nothing was written")


def claim_files(folder: Path, names: Iterable[str]) -> set[str]:
    """Before writing ``names`` into ``folder``: refuse it if it holds files quantlab did not write, then list
    ``names`` in its manifest beside what it already listed (a write cut short leaves nothing unlisted).
    Returns the previous listing, for ``settle_files``."""
    check_own_dir(folder)
    previous = listed_files(folder)
    _write_manifest(folder, previous | set(names))
    return previous


def settle_files(folder: Path, written: Iterable[str], previous: Iterable[str]) -> None:
    """After a publication: remove the files of the previous one it did not write again (quantlab's, listed),
    and the folders they leave empty; the manifest then lists exactly ``written``."""
    written = set(written)
    for name in sorted(set(previous) - written):
        path = folder / name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):  # only if empty
            if path.parent != folder:
                path.parent.rmdir()
    _write_manifest(folder, written)


def _write_manifest(folder: Path, names: set[str]) -> None:
    atomic_write_json(folder / MANIFEST, {"written_by": "quantlab", "files": sorted(names)})


def check_output_file(path: str | Path, option: str) -> Path:
    """Before any work: ``path`` is a file quantlab may write. A new file, or one it wrote before (listed in the
    manifest of its folder, as in an --out folder); a user's own file is never replaced."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder — give a file path, e.g. {path / 'out'}{path.suffix}")
    check_writable_dir(path.parent, option)
    if (path.exists() or path.is_symlink()) and path.name not in listed_files(path.parent):
        raise UsageError(f"{option} {path} exists and quantlab did not write it — choose another path, or move the "
                         "file; nothing was written")
    return path


def claim_output_file(path: str | Path, option: str) -> Path:
    """Check ``path`` (check_output_file), then list it in its folder's manifest before it is written, so the
    next run may replace it, and only it."""
    path = check_output_file(path, option)
    listed = listed_files(path.parent)
    if path.name not in listed:
        _write_manifest(path.parent, listed | {path.name})
    return path


def write_output_file(path: str | Path, data: bytes, option: str) -> Path:
    """Write a user-named output atomically, claimed first (claim_output_file)."""
    path = claim_output_file(path, option)
    atomic_write_bytes(path, data)
    return path
