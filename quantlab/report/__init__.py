"""The trade-off report: one self-contained HTML page from a results.json or a stored run set.

``write_report(load_results(results="DIR/results.json"), "reports/x.html", ReportSettings())`` builds a
view of every run (quality with intervals, memory predicted beside measured, latency, cost, accuracy),
asks the planner whether each recipe fits the chosen GPU, picks the verdict and renders ``html.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantlab import store as store_mod
from quantlab.errors import UsageError
from quantlab.outputs import check_output_file, write_output_file
from quantlab.gate.refs import read_results_json
from quantlab.plan import GB
from quantlab.report import view
from quantlab.report.html import render
from quantlab.report.schema import check_report_results


@dataclass(frozen=True)
class ReportSettings:
    gpu_mem: int = 32 * GB
    context: int = 4096
    batch: int = 1
    max_kld: float = 0.05  # nats/token: the quality tolerance of the verdict

    def __post_init__(self):
        if self.max_kld <= 0:
            raise UsageError(f"--max-kld must be positive (got {self.max_kld}) — e.g. 0.05 nats/token")


def load_results(results: str | None = None, run_set: str | None = None, store: str | None = None,
                 model: str | None = None) -> dict:
    """A results.json's data, or a stored run set shaped like one."""
    if bool(results) == bool(run_set):
        raise UsageError("Give exactly one of --results results.json and --run-set ID — list run sets with: quantlab runs")
    if results:
        path = Path(results)
        path = path / "results.json" if path.is_dir() else path
        data = read_results_json(path, "quantize-and-compare's results.json")
        if "fidelity" not in data["runs"][0] or not isinstance(data.get("model") or {}, dict):
            raise UsageError(f"{path} is not a quantize-and-compare results.json — `quantlab eval` output has no "
                             "memory or latency to report")
        check_report_results(data, path)
        return {**data, "source": str(path)}
    return _from_store(run_set, store, model)


def _from_store(run_set: str, store: str | None, model: str | None = None) -> dict:
    """One model's runs of a stored run set shaped like its results.json; a run set of several models needs
    ``model`` (its runs are never drawn together: recipe names repeat across models)."""
    runs = store_mod.find_runs(store, run_set)
    if not runs:
        raise UsageError(f"No runs in run set '{run_set}' of {store or store_mod.default_store_path()} — "
                         "list run sets with: quantlab runs")
    models = list(dict.fromkeys(r["model_ref"] for r in runs))
    if model is not None and model not in models:
        raise UsageError(f"Run set '{run_set}' has no runs of model '{model}' — its models: {', '.join(models)}")
    if model is None and len(models) > 1:
        raise UsageError(f"Run set '{run_set}' holds {len(models)} models ({', '.join(models)}) — pick one with --model")
    runs = [r for r in runs if r["model_ref"] == (model or models[0])]
    first, prov = runs[0], runs[0]["provenance"] or {}
    fp = next((r for r in runs if r["method"] == "fp"), None)
    return {
        "model": {"ref": first["model_ref"], "fingerprint": first["model_fingerprint"],
                  "path": fp["artifact"] if fp else None, "note": "", "params": None},
        "run_set": run_set, "device": (prov.get("device") or {}).get("device", "cpu"),
        "text": prov.get("text") or {}, "definitions": {}, "source": f"store run set {run_set}",
        "runs": [{**r, "params": r["params"], "guard": (r["fidelity"] or {}).get("guard")} for r in runs],
    }


def build_view(data: dict, settings: ReportSettings) -> dict:
    """Everything the page shows, computed once, so the HTML only formats."""
    return view.build(data, settings)


def render_report(data: dict, settings: ReportSettings) -> str:
    return render(build_view(data, settings))


def write_report(data: dict, out: str | Path, settings: ReportSettings | None = None) -> Path:
    """Render and write atomically; returns the path. A file at ``out`` that quantlab did not write is refused
    before rendering (outputs.check_output_file)."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {out} must be an .html file — e.g. reports/smollm2.html")
    check_output_file(out, "--out")
    page = render_report(data, settings or ReportSettings())
    return write_output_file(out, page.encode(), "--out")
