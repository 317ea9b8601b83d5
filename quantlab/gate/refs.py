"""Resolve a gate reference to runs with their per-sample scores.

REF is a results.json (quantize-and-compare's, or ``eval --output``'s), a run id or a run set in the store;
``REF@recipe`` keeps only that recipe's runs (one per model in a run set of several models). Each run comes
back as ``{label, model, fingerprint, recipe, accuracy, samples: {task: [rows]}, per_window, per_token, text,
windows}``: ``per_window`` the gated fidelity metrics' values per text window by their key (``kld_per_window``: the
mean KLD, ``nll_per_window``: the model's mean NLL; ``quantlab.metrics``), and an older results.json's per-token
file, read only when a fidelity rule needs it (``chunk_kld``); ``fingerprint`` the model's where the record names
it (None for an ``eval --output`` file without --baseline); ``text`` and ``windows`` what the fidelity was measured
on (``quantlab.gate.comparable`` checks both sides agree). A file is validated as it is read
(``quantlab.resultfile``): a wrong type is a one-line error naming the field.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from quantlab import metrics, resultfile
from quantlab import store as store_mod
from quantlab.errors import UsageError
from quantlab.fsutil import atomic_write_bytes, safe_name


def load_ref(ref: str, store: str | None = None) -> list[dict]:
    target, recipe = _split(ref)
    path = ref_file(ref)
    runs = _from_results(path) if path is not None else _from_store(target, store)
    if recipe:
        runs = [r for r in runs if r["recipe"] == recipe]
        if not runs:
            raise UsageError(f"{target} has no run of recipe '{recipe}' — check the name after '@'")
    return runs


def _split(ref: str) -> tuple[str, str]:
    """REF@recipe -> (REF, recipe); a file whose name holds '@' is itself."""
    target, _, recipe = ref.partition("@") if "@" in ref and not Path(ref).exists() else (ref, "", "")
    return target, recipe


def ref_file(ref: str) -> Path | None:
    """The results file a reference names (a directory's results.json), or None for a run id or run set."""
    path = Path(_split(ref)[0])
    if path.suffix == ".json" or path.is_file() or path.is_dir():
        return path / "results.json" if path.is_dir() else path
    return None


def read_results_json(path: Path, what: str = "a results.json, a run id or a run set") -> dict:
    """A results.json (or eval --output file) with at least one run whose fields the gate reads have the right
    types, or a one-line UsageError naming the file and the field (``quantlab.resultfile``)."""
    if not Path(path).is_file():
        raise UsageError(f"{path} does not exist — give {what}")
    data = resultfile.read_json(path, "a results.json")
    if data.get("runs") in (None, []):
        raise UsageError(f"{path} holds no runs — give quantize-and-compare's results.json or eval --output's file")
    resultfile.check(data, resultfile.RESULTS, path)
    return data


def _from_results(path: Path) -> list[dict]:
    data = read_results_json(path)
    model = data.get("model")
    ref, fingerprint = (model.get("ref"), model.get("fingerprint")) if isinstance(model, dict) else (model, None)
    # an eval --output file names its model's (or its source model's) fingerprint; an older one only the model its
    # --baseline fidelity is against
    fingerprint = fingerprint or data.get("model_fingerprint") or (data.get("fidelity_baseline") or {}).get("fingerprint")
    out = []
    for i, run in enumerate(data["runs"]):
        acc, fid, prov = run.get("accuracy") or {}, run.get("fidelity") or {}, run.get("provenance") or {}
        samples = acc.get("samples")
        if samples is None and acc.get("samples_path"):
            samples = read_samples(path.parent / acc["samples_path"])
        per_token = path.parent / "per_token" / f"{safe_name(run['recipe'])}.npz"  # read only if a rule needs it
        out.append({"label": f"{path}@{run['recipe']}", "model": ref, "fingerprint": fingerprint,
                    "recipe": run["recipe"], "accuracy": acc, "samples": samples or {},
                    "per_window": _per_window(fid), "per_token": per_token if per_token.is_file() else None,
                    "text": prov.get("text") or data.get("text"),
                    "windows": _windows(fid, prov)})
    return out


def _per_window(fidelity: dict) -> dict:
    """Each gated metric's per-window values (``quantlab.metrics``), by window key: None where the run has none."""
    return {m.windows.key: fidelity.get(m.windows.key) for m in metrics.gated()}


def _windows(fidelity: dict, provenance: dict) -> dict | None:
    """The text windows a run's fidelity was measured on: how many, their tokens, tokens scored in all."""
    if not fidelity:
        return None
    return {"chunks": fidelity.get("chunks"), "tokens": fidelity.get("tokens"),
            "chunk_tokens": (provenance.get("fidelity_settings") or {}).get("chunk_tokens")}


def _from_store(ref: str, store: str | None) -> list[dict]:
    runs = store_mod.find_runs(store, ref)
    if not runs:
        raise UsageError(f"'{ref}' is not a file, run id or run set in the store {store or store_mod.default_store_path()}"
                         " — list runs with: quantlab runs")
    out = []
    for r in runs:
        fid, prov = r.get("fidelity") or {}, r.get("provenance") or {}
        out.append({"label": f"run {r['id'][:12]} {r['model_ref']}@{r['recipe']}", "model": r["model_ref"],
                    "fingerprint": r.get("model_fingerprint"), "recipe": r["recipe"],
                    "accuracy": r.get("accuracy") or {}, "samples": _stored_samples(store, r["id"]),
                    "per_window": _per_window(fid), "text": prov.get("text"), "windows": _windows(fid, prov)})
    return out


def _stored_samples(store: str | None, run_id: str) -> dict:
    """A stored run's per-sample scores, held to the same schema as a file's (a run stored with NaN scores, or
    by an older quantlab, is named, not tested)."""
    samples = store_mod.read_samples(store, run_id)
    where = f"Stored run {run_id[:12]}'s per-sample scores"
    bad = resultfile.first_non_finite(samples)
    if bad is not None:
        raise UsageError(f"{where}: {bad[0]} is {bad[1]}, not a number — rerun that run")
    resultfile.check(samples, resultfile.SAMPLES, where, fix="rerun that run")
    return samples


def write_samples(path: Path, samples: dict) -> None:
    """Per-sample scores as gzip JSON, atomically."""
    atomic_write_bytes(path, gzip.compress(json.dumps(samples, separators=(",", ":")).encode(), mtime=0))


def read_samples(path: Path) -> dict:
    """A per-sample file (task -> rows), or a one-line UsageError naming it and the first bad field."""
    try:
        samples = json.loads(gzip.decompress(Path(path).read_bytes()))
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"Per-sample file {path} is missing or unreadable ({exc.__class__.__name__}) — "
                         "rerun the evaluation") from None
    bad = resultfile.first_non_finite(samples)
    if bad is not None:
        raise UsageError(f"Per-sample file {path}: {bad[0]} is {bad[1]}, not a number — rerun the evaluation")
    resultfile.check(samples, resultfile.SAMPLES, f"Per-sample file {path}", fix="rerun the evaluation")
    return samples


def chunk_kld(path: Path):
    """Per-window mean KLD from a per-token file, for a results.json written before runs recorded it."""
    import zipfile

    import numpy as np

    try:
        with np.load(path) as data:
            kl = np.asarray(data["kl"], float)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"Per-token file {path} is unreadable ({exc.__class__.__name__}) — rerun the comparison, "
                         "or gate without fidelity metrics") from None
    if kl.ndim != 2 or not kl.size or not np.isfinite(kl).all():
        raise UsageError(f"Per-token file {path} holds no finite (windows, tokens) KLD — rerun the comparison")
    return kl.mean(axis=1).tolist()  # (chunks,) mean KLD per text window
