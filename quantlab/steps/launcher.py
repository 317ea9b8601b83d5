"""Run one step in a fresh Python process and bring its result (or its error) back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from quantlab import errors
from quantlab.errors import MeasurementError
from quantlab.fsutil import free_bytes, scratch_dir
from quantlab.models import quantlab_home


def run_step(step: str, payload: dict, timeout: float | None = None) -> dict:
    """Run ``python -m quantlab.steps STEP`` on ``payload`` and return its JSON result.

    A QuantlabError raised in the step is raised again here with the same class and message.
    """
    with scratch_dir("quantlab-step-") as tmp:
        payload_path = Path(tmp) / "payload.json"
        result_path = Path(tmp) / "result.json"
        payload_path.write_text(json.dumps(payload, default=str))
        cmd = [sys.executable, "-m", "quantlab.steps", step, str(payload_path), str(result_path)]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"The {step} step ran over {timeout:.0f} s — raise the timeout or use a smaller model") from None
        if not result_path.is_file():
            raise died(step, proc.returncode)
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
