"""Ctrl-C and SIGTERM, handled the same way in the CLI and in every step process.

By default Python turns SIGINT into KeyboardInterrupt (click then prints "Aborted!" and exits 1) and lets
SIGTERM end the process on the spot without running any ``finally``: temp dirs stay, and the step processes
of a driver that was sent the signal alone keep running. Inside ``on_signals`` (the CLI's ``main``, each step
process's ``main``) both raise ``Interrupted`` instead (once: a second one while it unwinds is ignored), so
every ``finally`` and ``with`` on the way out runs: temp and scratch dirs go, a store transaction rolls back,
and the step launcher ends the step processes it started (``quantlab.steps.launcher``). The CLI then says
one line and exits 128 + the signal's number, as a shell reports a process that signal ended: 130 for
Ctrl-C, 143 for SIGTERM, so a script or a supervisor can tell a user's Ctrl-C from a stop sent by the system
(a CI cancel, a scheduler, ``kill``).

A step process starts with both signals blocked (``blocked``: the mask is inherited across fork and exec)
and unblocks them once its handler is in place, so a signal that arrives while it starts is handled the
same way, not a KeyboardInterrupt traceback from an import nor a death before it could clean up.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
CLEANUP_S = 5.0  # what the cleanup after an interrupt takes at most: the launcher's grace for its steps, and more

_stops = 0  # > 0 while this process is stopping its work (``stopping``)
_stops_guard = threading.Lock()


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException like KeyboardInterrupt, so that ``except Exception`` (a
    library's, or a step reporting its failure) never swallows it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        what = "Interrupted" if self.signum == signal.SIGINT else "Terminated"
        return (f"{what} ({signal.Signals(self.signum).name}) — nothing half-written; run the same command again "
                "to continue: finished work is reused")


@contextlib.contextmanager
def on_signals():
    """While the block runs, SIGINT and SIGTERM raise ``Interrupted`` in the main thread. A second one within
    CLEANUP_S of the first is ignored (a Ctrl-C pressed twice, or a step sent both Ctrl-C and the launcher's
    SIGTERM), so that the cleanup the first one started is not cut short; one after that raises again, in
    case a library swallowed the first; after the block, once one was raised, they are ignored (the process
    is on its way out). A signal the parent set to be ignored (``nohup``, a background job) stays ignored.
    Off the main thread (where Python cannot set handlers) it does nothing. Catch ``Interrupted`` around the
    ``with``, not inside: one held back while a step process started comes out of entering it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first = []

    def handler(signum, frame):
        if not first or time.monotonic() - first[0] > CLEANUP_S:
            first[:] = [time.monotonic()]
            raise Interrupted(signum)

    previous, mask = {}, None
    try:  # a signal may come while the handlers go in: the ``finally`` puts back what was changed
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
        mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # a step process starts with them blocked
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, old in previous.items():
            if first:  # on its way out after an interrupt: a later signal must not change how it ends
                signal.signal(sig, signal.SIG_IGN)
            elif old is not None:
                signal.signal(sig, old)


@contextlib.contextmanager
def stopping():
    """While the block runs, this process is stopping its work: the threads that wait for something (a cache
    entry's lock in ``fsutil.file_lock``, a step process about to start) raise ``Interrupted`` instead. Signals
    reach only the main thread, so this is how an interrupt reaches the others (the local executor's)."""
    global _stops
    with _stops_guard:
        _stops += 1
    try:
        yield
    finally:
        with _stops_guard:
            _stops -= 1


def stop_requested() -> bool:
    """True inside ``stopping``: a waiting thread should give up with ``Interrupted``."""
    return _stops > 0


@contextlib.contextmanager
def blocked():
    """SIGINT and SIGTERM held back in this thread for the block (one that arrives meanwhile is delivered when
    it ends); a process started inside inherits them blocked until its ``on_signals``."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
