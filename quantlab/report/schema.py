"""What the report reads of a results.json, checked on load (``quantlab.resultfile``): a field of the wrong type
is a one-line error naming it (``runs[2].fidelity.kld_mean``), not a traceback from deep in the page."""

from __future__ import annotations

from quantlab import resultfile as rf
from quantlab.errors import QuantlabError, UsageError
from quantlab.recipe import Recipe

NUM = rf.Opt(rf.NUMBER)
INTERVAL = rf.Opt(rf.Each(rf.NUMBER, size=2))  # formatted as [low, high]: both numbers
# llama.cpp's --kl-divergence statistics: a run with the first has them all (the page's distribution table)
DISTRIBUTION = ("kld_median", "kld_p90", "kld_p99", "kld_p999", "kld_max", "dp_mean", "dp_rms", "dp_p999", "dp_p99",
                "dp_p1", "dp_p01", "ln_ppl_ratio")
_FIDELITY = {**rf.FIDELITY.fields, "kld_mean": NUM, "top1_agreement": NUM, "ppl": NUM, "ppl_baseline": NUM,
             "ci95": rf.Values(INTERVAL), **{k: rf.NUMBER for k in DISTRIBUTION}}
FIDELITY = rf.Fields(_FIDELITY)
FIDELITY_DISTRIBUTION = rf.Fields(_FIDELITY, required=DISTRIBUTION)
IQR = rf.Opt(rf.Fields({"iqr": NUM}))
LATENCY = rf.Fields({"prefill_ms": NUM, "decode_tok_s": rf.Values(NUM), "skipped": rf.Opt(rf.TEXT),
                     "detail": rf.Opt(rf.Fields({"prefill_ms": IQR, "decode_tok_s": rf.Values(IQR)})),
                     "roofline_b1": rf.Opt(rf.Fields({"percent_of_roofline": NUM}))})
TASK = rf.Fields({**rf.TASK.fields, "metrics": rf.Values(rf.NUMBER)}, required=("metrics", "stderr", "n", "n_total"))
FLIPS = rf.Fields({"documents": rf.Opt(rf.INT), "flips": NUM, "right_to_wrong": NUM, "wrong_to_right": NUM,
                   "ci95": rf.Opt(rf.Fields({"flips": INTERVAL}))})
ACCURACY = rf.Fields({**rf.ACCURACY.fields, "tasks": rf.Values(TASK), "flips": rf.Values(FLIPS)})
UNIT = rf.AnyOf((rf.TEXT, rf.Fields({"name": rf.TEXT}, required=("name",))), "a unit name or {name: ...}")
FIT = rf.Fields({"sensitivity": rf.Opt(rf.Fields({"units": rf.Each(UNIT), "formats": rf.Each(rf.TEXT),
                                                  "kld": rf.Values(rf.Opt(rf.Values(NUM))),
                                                  "text": rf.Opt(rf.MAPPING)})),
                 "unit_formats": rf.Values(rf.TEXT), "units_per_format": rf.MAPPING, "budget_bytes": NUM,
                 "predicted_bytes": NUM, "predicted_kld": NUM})
RUN = rf.Fields({**rf.RUN.fields, "method": rf.TEXT, "bits": NUM, "params": rf.MAPPING, "engine": rf.Opt(rf.TEXT),
                 "fidelity": rf.Opt(FIDELITY),
                 "memory": rf.Opt(rf.Fields({"weights_bytes": NUM, "disk_bytes": NUM, "peak_bytes": NUM})),
                 "latency": rf.Opt(LATENCY), "cost": rf.Opt(rf.Fields({"quantize_wall_s": NUM, "quantize_cpu_s": NUM})),
                 "guard": rf.Opt(rf.Fields({"ok": rf.FLAG, "reasons": rf.Each(rf.TEXT)})),
                 "accuracy": rf.Opt(ACCURACY), "fit": rf.Opt(FIT)},
                required=("recipe", "method", "bits", "params"))
MODEL = rf.Fields({"ref": rf.Opt(rf.TEXT), "fingerprint": rf.Opt(rf.TEXT), "path": rf.Opt(rf.TEXT),
                   "note": rf.Opt(rf.TEXT), "trust_remote_code": rf.Opt(rf.FLAG)})
RESULTS = rf.Fields({"model": rf.Opt(MODEL), "runs": rf.Each(RUN), "definitions": rf.Opt(rf.MAPPING)},
                    required=("runs",))


def check_report_results(data: dict, path) -> None:
    """Everything the page reads has its type, each run's recipe rebuilds (its method known, its parameters the
    method's), or a one-line UsageError naming ``path`` and the field."""
    rf.check(data, RESULTS, path)
    for i, run in enumerate(data["runs"]):
        if "kld_median" in (run.get("fidelity") or {}):
            rf.check(run["fidelity"], FIDELITY_DISTRIBUTION, path, f"runs[{i}].fidelity")
        _recipe(run, f"{path}: runs[{i}] ({run['recipe']})")


def _recipe(run: dict, where: str) -> None:
    try:
        Recipe.from_dict({"name": run["recipe"], "method": run["method"], "params": run["params"]})
    except QuantlabError as exc:
        raise UsageError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: params do not fit method '{run['method']}' ({' '.join(str(exc).split())}) — "
                         f"{rf.FIX}") from None
