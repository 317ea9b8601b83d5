"""Atomic writes: a file or directory appears whole or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from quantlab.errors import UsageError


def safe_name(name: str) -> str:
    """``name`` as one file name: characters outside [A-Za-z0-9_.=+-] (path separators, spaces) become ``-``, a
    leading dot is dropped, and a name that had to change gets a short hash of the original so two names never
    share a file."""
    import hashlib
    import re

    clean = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", name).lstrip(".") or "-"
    if clean == name:
        return name
    return f"{clean}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temp directory beside ``final``; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(final: Path) -> None:
    """Delete temp dirs of ``final`` left by processes that died (a killed job): their names carry the pid."""
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid = tmp.name[len(final.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(prefix: str):
    """A temp directory (``<tmp>/<prefix><pid>.<random>``) removed when the block ends. A process killed with
    SIGKILL cannot remove its own, so each new one first removes those of ``prefix`` whose process has died."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{glob.escape(prefix)}*.scratch"):
        pid = old.name[len(prefix):].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", suffix=".scratch", dir=base))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def file_lock(path: str | Path):
    """An exclusive advisory lock, so two processes never build the same cache entry at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_writable_dir(path: str | Path) -> Path:
    """Prove ``path`` can be created and written, without leaving anything behind, before heavy work."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"Output directory {path} cannot be created: {probe} is not a directory — choose another --out")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".quantlab-write-test.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(f"Output directory {path} is not writable ({exc.strerror}) — choose another --out") from None
    return path


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


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem that holds (or would hold) ``path``: its nearest existing ancestor's."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def dir_bytes(path: str | Path, suffixes=(".safetensors", ".bin", ".pt", ".gguf")) -> int:
    """Bytes of the weight files in a model directory."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and p.suffix in suffixes)


def load_yaml(path: str | Path, what: str, missing_hint: str, error=UsageError):
    """A YAML file's data (safe loader), or ``error`` naming the file, the problem's line and the fix."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist — {missing_hint}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror}) — check its permissions") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}) — save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {path}: {yaml_problem(exc)}") from None


def yaml_problem(exc) -> str:
    """One line for a PyYAML error: where, what, and the fix. A tag the safe loader has no constructor for
    (``!!python/object/apply``) is refused, never run: quantlab reads plain YAML only."""
    import yaml

    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if isinstance(exc, yaml.constructor.ConstructorError):
        return f"{where}{problem} — quantlab reads plain YAML (no Python or custom tags); remove the tag"
    return f"{where}invalid YAML ({problem}) — fix the syntax"
