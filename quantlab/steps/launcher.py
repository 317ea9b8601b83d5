"""Run one step in a fresh Python process and bring its result (or its error) back.

Every step process started here is listed until it ends, so an interrupt can end them all: ``run_step`` ends
its own when an interrupt reaches the thread that waits on it, and ``steps_stopped`` ends those that other
threads wait on (the local executor's) and starts no new one meanwhile. Ending a step is SIGTERM, which its
handler turns into a quiet unwind that removes its temp dirs (``quantlab.interrupts``), then SIGKILL after
``GRACE_S``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from quantlab import errors
from quantlab.errors import MeasurementError
from quantlab.fsutil import free_bytes, scratch_dir
from quantlab.interrupts import SIGNALS, Interrupted, blocked, stop_requested, stopping
from quantlab.home import quantlab_home

GRACE_S = 2.0  # what an ended step gets to remove its temp dirs before SIGKILL

_live: set[subprocess.Popen] = set()
_guard = threading.Lock()


def run_step(step: str, payload: dict, timeout: float | None = None) -> dict:
    """Run ``python -m quantlab.steps STEP`` on ``payload`` and return its JSON result.

    A QuantlabError raised in the step is raised again here with the same class and message; a step ended
    by SIGINT or SIGTERM (or by ``steps_stopped``) raises ``Interrupted``.
    """
    with scratch_dir("quantlab-step-") as tmp:
        payload_path = Path(tmp) / "payload.json"
        result_path = Path(tmp) / "result.json"
        payload_path.write_text(json.dumps(payload, default=str))
        proc = _start([sys.executable, "-m", "quantlab.steps", step, str(payload_path), str(result_path)])
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"The {step} step ran over {timeout:.0f} s — raise the timeout or use a smaller model") from None
        finally:  # also on an interrupt in this thread: the step ends before its scratch dir goes
            _end([proc])
        if not result_path.is_file():
            raise _ended(step, proc.returncode)
        result = json.loads(result_path.read_text())
    if "error" in result:
        err = result["error"]
        cls = getattr(errors, err.get("class", ""), None)
        if not (isinstance(cls, type) and issubclass(cls, errors.QuantlabError)):
            cls = MeasurementError
        exc = cls(err["message"])
        exc.worker_traceback = err.get("traceback")
        raise exc
    return result


@contextlib.contextmanager
def steps_stopped():
    """End every running step process now, and start no new one until the block ends (while the threads that
    ran them unwind)."""
    with stopping():  # first, so that a step starting meanwhile is either listed below or refused in _start
        with _guard:
            live = list(_live)
        _end(live)
        yield


def _start(cmd: list[str]) -> subprocess.Popen:
    """Start a step process, listed until ``_end``. It inherits SIGINT and SIGTERM blocked and unblocks them
    once its handler is in place (steps/__main__.py)."""
    with _guard:
        if stop_requested():
            raise Interrupted()
        with blocked():
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            _live.add(proc)
    return proc


def _end(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to those of ``procs`` still running, up to GRACE_S for all of them to exit, then SIGKILL."""
    try:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + GRACE_S
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
    finally:  # past the grace, or interrupted while waiting
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with _guard:
            _live.difference_update(procs)


def _ended(step: str, returncode: int) -> BaseException:
    """Why a step process ended without a result: an interrupt (a step's handler exits 128 + the signal) or a
    death (``died``)."""
    for sig in SIGNALS:
        if returncode in (128 + sig, -sig):
            return Interrupted(sig)
    return Interrupted() if stop_requested() else died(step, returncode)


def died(step: str, returncode: int) -> MeasurementError:
    """Why a step process ended without a result, from its exit status. SIGBUS is a memory-mapped file that
    could not be backed (a full disk under QUANTLAB_HOME, or a file truncated while mapped), not memory."""
    if returncode == -signal.SIGBUS:
        home = quantlab_home()
        return MeasurementError(
            f"The {step} subprocess was killed by SIGBUS — probably a full disk or a memory-mapped file truncated "
            f"under it: QUANTLAB_HOME {home} has {free_bytes(home) / 1e9:.2f} GB free; free space there or point "
            "QUANTLAB_HOME at a larger disk")
    names = {s.value: s.name for s in signal.Signals}
    how = f"killed by {names.get(-returncode, f'signal {-returncode}')}" if returncode < 0 else f"exit code {returncode}"
    return MeasurementError(f"The {step} subprocess died ({how}) — likely out of memory; free memory or use a "
                            "smaller model")
