"""Atomic writes (a file or directory appears whole or not at all) and the one helper that builds a content-addressed
cache entry through them (`cached_entry`: hash-named path, lock, temp beside it, rename)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from quantlab.errors import DiskFullError, UsageError
from quantlab.home import quantlab_home
from quantlab.interrupts import Interrupted, stop_requested


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


def ensure_dir(path: str | Path) -> Path:
    """``path`` as a folder, made if missing. A regular file where a folder belongs (QUANTLAB_HOME itself, one of
    its folders, an output's parent) is a one-line error naming that file, not a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        home = os.environ.get("QUANTLAB_HOME")
        what = "QUANTLAB_HOME " if home and Path(home).expanduser().absolute() == blocker.absolute() else ""
        raise UsageError(f"{what}{blocker} is a file where quantlab needs a folder"
                         f"{f' (for {path})' if blocker != path else ''} — move or rename that file"
                         f"{_home_hint(path, ', or point QUANTLAB_HOME at another folder')}") from None
    except PermissionError:
        raise UsageError(f"Cannot create the folder {path} (permission denied) — choose a writable location"
                         f"{_home_hint(path, ', e.g. set QUANTLAB_HOME')}") from None
    except OSError as exc:
        if is_disk_full(exc, path):
            raise full_disk(path, path.name) from None
        raise
    return path


def _home_hint(path: Path, hint: str) -> str:
    inside = Path(path).absolute().is_relative_to(quantlab_home().absolute())
    return hint if inside else ""


#: errno values that mean the filesystem cannot take more bytes (space, quota, file size).
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_disk_full(exc: BaseException, folder: str | Path) -> bool:
    """Whether ``exc`` is a write that failed for want of space. The OS says so with ENOSPC or EDQUOT; numpy's
    short write ("99960 requested and 26592 written") and similar carry no errno, so then the folder's free
    space decides (under 64 MiB left)."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _FULL_ERRNOS:
        return True
    if exc.errno is None:
        with contextlib.suppress(OSError):
            return free_bytes(folder) < 64 * 2**20
    return False


def full_disk(folder: str | Path, what: str) -> DiskFullError:
    """The one error for a write that ran out of space: which folder, what was being written, the space left."""
    free = "unknown"
    with contextlib.suppress(OSError):
        free = f"{free_bytes(folder) / 1e6:.0f} MB"
    where = _home_hint(Path(folder), "free space there or point QUANTLAB_HOME at a larger disk")
    return DiskFullError(f"The disk holding {folder} is full ({free} free) while writing {what} — "
                         f"{where or 'free space there or write to another disk'}; nothing half-written was kept")


@contextlib.contextmanager
def naming_full_disk(folder: str | Path, what: str):
    """Every atomic write runs in this: an OSError for want of space leaves as a DiskFullError naming
    ``folder`` and its free space; any other error passes unchanged."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc, folder):
            raise full_disk(folder, what) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    ensure_dir(path.parent)
    if path.is_dir():
        raise UsageError(f"{path} is a folder where quantlab writes a file — move or rename that folder"
                         f"{_home_hint(path, ', or point QUANTLAB_HOME at another folder')}")
    with naming_full_disk(path.parent, path.name):
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
    """Yield a temp directory beside ``final``; rename it into place only if the block succeeds. A write in the
    block that fails for want of space is a DiskFullError naming the folder."""
    final = Path(final)
    ensure_dir(final.parent)
    remove_stale_temps(final)
    with naming_full_disk(final.parent, final.name):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
        try:
            yield tmp
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | Path):
    """Yield a temp file path beside ``final`` (named with the pid, as ``atomic_dir``'s); rename it into place
    only if the block succeeds. A write that fails for want of space is a DiskFullError naming the folder."""
    final = Path(final)
    ensure_dir(final.parent)
    remove_stale_temps(final)
    with naming_full_disk(final.parent, final.name):
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
        tmp = Path(name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            os.close(fd)
            yield tmp
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def cached_entry(path: str | Path, build, *, is_complete=None, lock: str | Path | bool | None = None,
                 force: bool = False, file: bool = False) -> bool:
    """The content-addressed cache entry at ``path``, built once: True when it was already complete (a hit),
    False when this call built it.

    A complete entry (``is_complete(path)``, default: it exists) returns at once. Otherwise the entry's lock
    (default ``.<name>.lock`` beside it) is taken and completeness checked again, since another process may have
    built it while this one waited; then ``build(tmp)`` writes into a temp dir beside the entry (``atomic_dir``;
    a temp file with ``file=True``, ``atomic_file``) that is renamed into place only if ``build`` returns. A build
    that raises leaves nothing; a killed builder's temp is removed by the next build. ``force`` rebuilds a
    complete entry. ``lock=False`` builds without a lock, for an entry cheap enough that two builders may race
    (the last rename wins, with the same content).
    """
    path = Path(path)
    complete = is_complete or (lambda p: p.exists())
    if not force and complete(path):
        return True
    if lock is False:
        held = contextlib.nullcontext()
    else:
        held = file_lock(path.with_name(f".{path.name}.lock") if lock is None or lock is True else lock)
    with held:
        if not force and complete(path):
            return True
        with (atomic_file if file else atomic_dir)(path) as tmp:
            build(tmp)
    return False


def entry_of(tmp: str | Path) -> Path:
    """The cache entry whose temp (``.<name>.<pid>.<random>.tmp``, from ``atomic_dir`` or ``atomic_file``)
    ``tmp`` is; a path of another form is its own entry."""
    tmp = Path(tmp)
    match = re.fullmatch(r"\.(.+)\.\d+\.[^.]+\.tmp", tmp.name)
    return tmp.with_name(match.group(1)) if match else tmp


def building_entry(tmp: str | Path):
    """``naming_full_disk`` for a step that builds into a cache entry's temp dir in its own process (the parent
    holds the lock and renames): a full disk is named with the entry, not its temp."""
    entry = entry_of(tmp)
    return naming_full_disk(entry.parent, entry.name)


def remove_stale_temps(final: Path) -> None:
    """Delete temp dirs (or files) of ``final`` left by processes that died (a killed job): their names carry
    the pid."""
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid = tmp.name[len(final.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    tmp.unlink()


@contextlib.contextmanager
def scratch_dir(prefix: str):
    """A temp directory (``<tmp>/<prefix><pid>.<random>``) removed when the block ends. A process killed with
    SIGKILL cannot remove its own, so each new one first removes those of ``prefix`` whose process has died."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{glob.escape(prefix)}*.scratch"):
        pid = old.name[len(prefix):].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    with naming_full_disk(base, f"a {prefix.rstrip('-.')} scratch folder"):
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
    ensure_dir(path.parent)
    with naming_full_disk(path.parent, path.name), open(path, "a") as fh:
        _acquire(fh)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _acquire(fh) -> None:
    """flock without blocking, retried: a thread blocked in flock cannot be interrupted (signals reach only the
    main thread), so a waiting thread checks between tries whether the process is stopping its work."""
    delay = 0.005
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if stop_requested():
            raise Interrupted()
        time.sleep(delay)
        delay = min(2 * delay, 0.1)


def check_writable_dir(path: str | Path, option: str = "--out") -> Path:
    """Prove ``path`` can be created and written, without leaving anything behind, before heavy work."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"Output directory {path} cannot be created: {probe} is not a directory — choose another "
                         f"{option}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".quantlab-write-test.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(f"Output directory {path} is not writable ({exc.strerror}) — choose another {option}") from None
    return path


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
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror}) — check its permissions") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}) — save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {path}: {yaml_problem(exc)}") from None


def _unique_key_loader():
    """PyYAML's safe loader, refusing a mapping that gives one key twice (PyYAML keeps the last silently, so
    ``bits: 4`` then ``bits: 8`` would run 8 bits with no word)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden: YAML's rule
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {key!r} is given twice{f' (first on line {seen[key]})' if seen[key] != line else ''}"
                            " — keep one",
                            key_node.start_mark)
                    seen[key] = line
                except TypeError:  # an unhashable key: the base loader names it
                    break
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def yaml_problem(exc) -> str:
    """One line for a PyYAML error: where, what, and the fix. A tag the safe loader has no constructor for
    (``!!python/object/apply``) is refused, never run: quantlab reads plain YAML only."""
    import yaml

    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if "is given twice" in problem:
        return f"{where}{problem}"
    if isinstance(exc, yaml.constructor.ConstructorError):
        return f"{where}{problem} — quantlab reads plain YAML (no Python or custom tags); remove the tag"
    return f"{where}invalid YAML ({problem}) — fix the syntax"
