"""fsutil.cached_entry, the one helper every content-addressed cache builds through: a hit returns at once, two
processes build an entry once, a failed build leaves nothing, a killed builder's temp is removed by the next."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quantlab.errors import DiskFullError, QuantlabError
from quantlab.fsutil import building_entry, cached_entry, entry_of

#: One process building ``entry`` (argv[1]): its build signals ``started`` (argv[2]), waits a moment, and writes
#: its own name (argv[3]) into the entry; it prints whether the entry was a hit.
BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from quantlab.fsutil import cached_entry

    entry, started, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def build(tmp):
        started.write_text(name)
        time.sleep(1.5)
        (tmp / "who").write_text(name)

    print("hit" if cached_entry(entry, build) else "built", flush=True)
""")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_process_waits_for_the_first_and_reuses_its_entry(tmp_path):
    entry, started = tmp_path / "cache" / "key", tmp_path / "started"
    first = subprocess.Popen([sys.executable, "-c", BUILDER, str(entry), str(started), "first"],
                             stdout=subprocess.PIPE, text=True)
    for _ in range(600):  # the first holds the lock and is building
        if started.exists():
            break
        first.poll()
        assert first.returncode is None, "the first builder ended before building"
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", BUILDER, str(entry), str(started), "second"],
                            capture_output=True, text=True, timeout=120)
    out_first, _ = first.communicate(timeout=120)
    assert (out_first.strip(), second.stdout.strip()) == ("built", "hit"), second.stderr
    assert (entry / "who").read_text() == "first" and started.read_text() == "first"  # the second never built
    assert sorted(p.name for p in entry.parent.iterdir()) == [".key.lock", "key"]  # no temp left


def test_a_complete_entry_is_returned_without_building_and_force_rebuilds_it(tmp_path):
    entry = tmp_path / "key"
    assert cached_entry(entry, lambda tmp: (tmp / "v").write_text("1")) is False
    assert cached_entry(entry, lambda tmp: pytest.fail("built a complete entry")) is True
    assert cached_entry(entry, lambda tmp: (tmp / "v").write_text("2"), force=True) is False
    assert (entry / "v").read_text() == "2"


def test_an_incomplete_entry_is_built_again(tmp_path):
    entry = tmp_path / "key"
    entry.mkdir()  # e.g. a folder written by hand, without its marker
    complete = lambda d: (d / "marker").is_file()  # noqa: E731
    assert cached_entry(entry, lambda tmp: (tmp / "marker").write_text("ok"), is_complete=complete) is False
    assert (entry / "marker").read_text() == "ok"


@pytest.mark.parametrize("file", [False, True])
def test_a_builder_that_raises_leaves_nothing(tmp_path, file):
    entry = tmp_path / "cache" / "key"

    def build(tmp: Path):
        (tmp if file else tmp / "half").write_text("half-written")
        raise QuantlabError("boom")

    with pytest.raises(QuantlabError, match="boom"):
        cached_entry(entry, build, file=file)
    assert not entry.exists()
    assert [p.name for p in entry.parent.iterdir()] == [".key.lock"]  # the lock only, no temp


@pytest.mark.parametrize("file", [False, True])
def test_a_dead_builders_temp_is_removed_by_the_next_build(tmp_path, file):
    entry = tmp_path / "key"
    stale = tmp_path / f".key.{_dead_pid()}.abc123.tmp"
    if file:
        stale.write_text("half")
    else:
        stale.mkdir()
        (stale / "weights").write_text("half")
    live = tmp_path / f".key.{os.getpid()}.def456.tmp"  # a live builder's temp is left alone
    live.mkdir()
    build = (lambda tmp: tmp.write_text("whole")) if file else (lambda tmp: (tmp / "weights").write_text("whole"))
    assert cached_entry(entry, build, file=file) is False
    assert not stale.exists() and live.exists()
    assert (entry if file else entry / "weights").read_text() == "whole"


def test_a_file_entry_takes_the_lock_it_is_given(tmp_path):
    entry = tmp_path / "self.txt"
    assert cached_entry(entry, lambda tmp: tmp.write_text("text"), lock=entry.with_suffix(".lock"), file=True) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["self.lock", "self.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert entry.stat().st_mode & 0o777 == 0o666 & ~mask  # the usual permissions, not mkstemp's 0600


def test_an_entry_without_a_lock_leaves_no_lock_file(tmp_path):
    entry = tmp_path / "verdict.json"
    assert cached_entry(entry, lambda tmp: tmp.write_text("{}"), file=True, lock=False) is False
    assert [p.name for p in tmp_path.iterdir()] == ["verdict.json"]


def test_a_temp_names_its_entry(tmp_path):
    assert entry_of(tmp_path / ".gptq-w4.g128-abc.4242.x_1y.tmp") == tmp_path / "gptq-w4.g128-abc"
    assert entry_of(tmp_path / "plain") == tmp_path / "plain"


def test_a_step_building_an_entrys_temp_names_the_entry_on_a_full_disk(tmp_path):
    """A step process (quantize, sensitivity) writes into the temp its parent made: a full disk names the entry."""
    with pytest.raises(DiskFullError, match=r"while writing gptq-w4-abc — "):
        with building_entry(tmp_path / f".gptq-w4-abc.{os.getpid()}.x1.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_thread_waiting_on_an_entrys_lock_gives_up_when_the_process_stops(tmp_path):
    """Signals reach only the main thread; a worker thread waiting on another process's lock must still end
    promptly when the process stops its work (the local executor after a Ctrl-C), not when the lock frees."""
    import threading

    from quantlab.fsutil import file_lock
    from quantlab.interrupts import Interrupted, stopping

    lock = tmp_path / ".entry.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        fh = open({str(lock)!r}, "a"); fcntl.flock(fh, fcntl.LOCK_EX); print("held", flush=True); time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        outcome = []

        def wait_for_lock():
            try:
                with file_lock(lock):
                    outcome.append("acquired")
            except Interrupted:
                outcome.append("interrupted")

        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive() and not outcome  # really waiting on the other process
        with stopping():
            start = time.monotonic()
            waiter.join(5)
            assert time.monotonic() - start < 1.0
        assert outcome == ["interrupted"]
    finally:
        holder.kill()
        holder.wait()
