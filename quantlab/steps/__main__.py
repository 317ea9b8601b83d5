"""Entry point of an isolated step: ``python -m quantlab.steps STEP PAYLOAD.json RESULT.json``.

Each step runs in its own fresh process; its result (or its error) is written as JSON. A step sent SIGINT or
SIGTERM (the launcher ends steps with SIGTERM) unwinds quietly, its temp dirs removed on the way, writes no
result and exits 128 + the signal (``quantlab.interrupts``).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback

from quantlab.errors import QuantlabError
from quantlab.fsutil import atomic_write_json
from quantlab.interrupts import Interrupted, on_signals
from quantlab.measure.memory import return_freed_memory
from quantlab.quiet import quiet_libraries
from quantlab.steps import STEPS


def _resolve(target: str):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str]) -> int:
    try:
        with on_signals():  # the launcher started this process with the signals blocked: this unblocks them
            return _run(argv)
    except Interrupted as exc:
        return exc.exit_code


def _run(argv: list[str]) -> int:
    step, payload_path, result_path = argv
    started = time.perf_counter()
    try:
        quiet_libraries()
        payload = json.loads(open(payload_path).read())
        if payload.get("budgeted"):
            return_freed_memory()
        import torch

        torch.set_num_threads(int(payload.get("threads") or torch.get_num_threads()))
        result = _resolve(STEPS[step])(payload)
        result["step_wall_s"] = time.perf_counter() - started
        atomic_write_json(result_path, result)
        return 0
    except QuantlabError as exc:
        error = {"class": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # an unexpected failure in a library: report it as a measurement error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        error = {"class": "MeasurementError", "message": f"The {step} step failed: {type(exc).__name__}: {first} — rerun with --debug for the traceback"}
    error["traceback"] = traceback.format_exc()
    atomic_write_json(result_path, {"error": error})
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
