"""Named accuracy suites (experiments/suites.yaml), ``--tasks``/``--suite`` settings and ``--shard I/N``."""

from __future__ import annotations

from pathlib import Path

from quantlab.errors import UsageError
from quantlab.evaluate.harness import HarnessSettings
from quantlab.fsutil import load_yaml

SUITES_FILE = Path(__file__).resolve().parents[2] / "experiments" / "suites.yaml"
_SUITE_KEYS = {"description", "tasks", "limit", "batch_size", "max_length"}


def load_suite(name: str, **overrides) -> HarnessSettings:
    """A suite by name from experiments/suites.yaml, or from a YAML file path; keyword overrides win if not None."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SUITES_FILE
    data = load_yaml(path, "Suite file", "give a suite name from experiments/suites.yaml or a YAML path") or {}
    suite = data if path != SUITES_FILE else data.get(name)
    if not isinstance(suite, dict):
        import difflib

        close = difflib.get_close_matches(name, list(data), n=1)
        hint = f"Did you mean '{close[0]}'? " if close else ""
        raise UsageError(f"Unknown suite '{name}'. {hint}Suites: {', '.join(data)} (or a suite YAML path)")
    unknown = set(suite) - _SUITE_KEYS
    if unknown:
        raise UsageError(f"Suite '{name}' has unknown key(s) {', '.join(sorted(unknown))} — allowed: "
                         f"{', '.join(sorted(_SUITE_KEYS))}")
    fields = {k: v for k, v in suite.items() if k != "description"}
    fields["tasks"] = tuple(fields.get("tasks") or ())
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return HarnessSettings(**fields)


def task_settings(tasks: str | None, suite: str | None, **overrides) -> HarnessSettings | None:
    """--tasks a,b,c or --suite NAME (not both) plus per-run options; None when neither is given."""
    if tasks and suite:
        raise UsageError("Give --tasks or --suite, not both")
    if suite:
        return load_suite(suite, **overrides)
    if tasks:
        names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        return HarnessSettings(tasks=names, **{k: v for k, v in overrides.items() if v is not None})
    return None


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'0/2' -> (0, 2)."""
    if not text:
        return None
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--shard '{text}' is not I/N — e.g. --shard 0/2 and --shard 1/2, then quantlab merge-shards")
    index, count = int(parts[0]), int(parts[1])
    if count < 1 or index >= count:
        raise UsageError(f"--shard {text}: shard I of N counts from 0 to N-1 — e.g. --shard 0/2 and --shard 1/2")
    return index, count
