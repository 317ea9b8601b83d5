"""Resolve a gate reference to runs with their per-sample scores.

REF is a results.json (quantize-and-compare's, or ``eval --output``'s), a run id or a run set in the store;
``REF@recipe`` keeps only that recipe's runs (one per model in a run set of several models). Each run comes
back as ``{label, model, recipe, accuracy, samples: {task: [rows]}, per_chunk_kld, per_chunk_nll}`` (per text
window: mean KLD and the model's mean NLL).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from quantlab import store as store_mod
from quantlab.errors import UsageError
from quantlab.fsutil import atomic_write_bytes, safe_name


def load_ref(ref: str, store: str | None = None) -> list[dict]:
    target, _, recipe = ref.partition("@") if "@" in ref and not Path(ref).exists() else (ref, "", "")
    path = Path(target)
    if path.suffix == ".json" or path.is_file() or path.is_dir():
        runs = _from_results(path / "results.json" if path.is_dir() else path)
    else:
        runs = _from_store(target, store)
    if recipe:
        runs = [r for r in runs if r["recipe"] == recipe]
        if not runs:
            raise UsageError(f"{target} has no run of recipe '{recipe}' — check the name after '@'")
    return runs


def read_results_json(path: Path, what: str = "a results.json, a run id or a run set") -> dict:
    """A results.json (or eval --output file) with at least one run, or a one-line UsageError."""
    if not path.is_file():
        raise UsageError(f"{path} does not exist — give {what}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not a readable results.json ({exc.__class__.__name__}) — regenerate it") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise UsageError(f"{path} holds no runs — give quantize-and-compare's results.json or eval --output's file")
    return data


def _from_results(path: Path) -> list[dict]:
    data = read_results_json(path)
    out = []
    for run in data["runs"]:
        acc = run.get("accuracy") or {}
        samples = acc.get("samples")
        if samples is None and acc.get("samples_path"):
            samples = read_samples(path.parent / acc["samples_path"])
        kld = (run.get("fidelity") or {}).get("kld_per_window") or _chunk_kld(
            path.parent / "per_token" / f"{safe_name(run['recipe'])}.npz")
        model = data["model"].get("ref") if isinstance(data.get("model"), dict) else data.get("model")
        out.append({"label": f"{path}@{run['recipe']}", "model": model, "recipe": run["recipe"], "accuracy": acc,
                    "samples": samples or {}, "per_chunk_kld": kld,
                    "per_chunk_nll": (run.get("fidelity") or {}).get("nll_per_window")})
    return out


def _from_store(ref: str, store: str | None) -> list[dict]:
    runs = store_mod.find_runs(store, ref)
    if not runs:
        raise UsageError(f"'{ref}' is not a file, run id or run set in the store {store or store_mod.default_store_path()}"
                         " — list runs with: quantlab runs")
    return [{"label": f"run {r['id'][:12]} {r['model_ref']}@{r['recipe']}", "model": r["model_ref"],
             "recipe": r["recipe"], "accuracy": r.get("accuracy") or {},
             "samples": store_mod.read_samples(store, r["id"]),
             "per_chunk_kld": (r.get("fidelity") or {}).get("kld_per_window"),
             "per_chunk_nll": (r.get("fidelity") or {}).get("nll_per_window")} for r in runs]


def write_samples(path: Path, samples: dict) -> None:
    """Per-sample scores as gzip JSON, atomically."""
    atomic_write_bytes(path, gzip.compress(json.dumps(samples, separators=(",", ":")).encode(), mtime=0))


def read_samples(path: Path) -> dict:
    try:
        return json.loads(gzip.decompress(Path(path).read_bytes()))
    except (OSError, ValueError) as exc:
        raise UsageError(f"Per-sample file {path} is missing or unreadable ({exc.__class__.__name__}) — "
                         "rerun the evaluation") from None


def _chunk_kld(path: Path):
    """Per-window mean KLD from a per-token file, for a results.json written before runs recorded it."""
    import numpy as np

    if not path.is_file():
        return None
    with np.load(path) as data:
        return data["kl"].mean(axis=1).tolist()  # (chunks,) mean KLD per text window
