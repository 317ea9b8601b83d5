"""The KV cache in a GGUF fit's GPU plan: what each cache type pair costs, measured in llama.cpp at the plan's
context, and the allocation's KV unit.

With ``--gpu-mem`` a GGUF fit chooses the cache's types for keys and values beside the weights' formats: one unit
(``KV_UNIT``) whose options are the pairs of ``kv_formats`` (``q8_0/q4_0``: keys q8_0, values q4_0), each with its
bytes at the context and batch (``engines.llamacpp.kv_bytes``, llama.cpp's allocation exactly) and its KLD against
the F16 cache (``engines.kv.caches_kld``). That KLD is measured on the uniform file of the fit's most precise format
(the weights the cache is measured with, stated with the table), on ``kv_windows`` windows of ``context`` tokens of
the fit's calibration text (the reference text stays out of the choice), one cache pair after another; the table is
cached by content. The pairs are measured, not summed from keys and values alone: on SmolLM2 keys and values in
q8_0 cost 0.0038 together, and 0.0037 and 0.0034 one at a time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from quantlab import __version__
from quantlab.artifacts import artifact_path
from quantlab.engines.kv import caches_kld
from quantlab.engines.llamacpp import kv_bytes
from quantlab.errors import DataError
from quantlab.evaluate.text import TextSource
from quantlab.fit.allocate import Option, Unit
from quantlab.fsutil import building_entry, cached_entry
from quantlab.home import quantlab_home
from quantlab.layouts.gguf import FILE
from quantlab.measure.cost import measure_cost
from quantlab.methods.calibration import resolve_calibration
from quantlab.models.load import load_tokenizer
from quantlab.models.source import ModelSource
from quantlab.provenance import library_version, versions
from quantlab.steps.launcher import run_step
from quantlab.steps.quantize import ensure_artifact

KV_UNIT = "kv_cache"


def kv_pairs(config) -> list[tuple[str, str]]:
    """Every (keys, values) pair of the fit's cache types; the F16 cache alone when it names none."""
    kinds = config.kv_formats or ("f16",)
    return [(k, v) for k in kinds for v in kinds]


def pair_name(type_k: str, type_v: str) -> str:
    return f"{type_k}/{type_v}"


def kv_unit(config, shapes, table: dict | None) -> Unit:
    """The allocation's KV unit: each pair's bytes at the plan's context and batch, and its measured KLD (0 for the
    F16 cache; every one 0 without a table, to check a budget can be met)."""
    klds = (table or {}).get("kld", {})
    return Unit(KV_UNIT, tuple(Option(pair_name(k, v), kv_bytes(shapes, config.context, config.batch, k, v),
                                      klds.get(pair_name(k, v), 0.0)) for k, v in kv_pairs(config)))


def ensure_kv_costs(source: ModelSource, config, reference, device: str, threads: int | None,
                    data_dir: str | None) -> dict:
    """The KLD of every cache pair of ``config`` against the F16 cache, measured with the weights of ``reference``
    (a recipe: the most precise format's uniform file), from its cache or a fresh step."""
    text = resolve_calibration(config, Path(source.path), data_dir, source.trust_remote_code)
    pairs = [p for p in kv_pairs(config) if p != ("f16", "f16")]
    key = hashlib.sha256(json.dumps({
        "model": source.fingerprint, "weights": artifact_path(source, reference, device, data_dir).name,
        "text": text.sha256, "context": config.context, "windows": config.kv_windows, "pairs": pairs,
        "quantlab": __version__, "llama_cpp": library_version("llama_cpp")}, sort_keys=True).encode()).hexdigest()[:24]
    target = quantlab_home() / "sensitivity" / "kv" / key

    def build(tmp: Path) -> None:
        weights = ensure_artifact(source, reference, device, threads, data_dir=data_dir)["artifact"]
        run_step("kv-sensitivity", {"source": source.to_dict(), "weights": weights, "weights_recipe": reference.name,
                                    "text": text.to_dict(), "context": config.context, "windows": config.kv_windows,
                                    "pairs": pairs, "threads": threads, "target": str(tmp)})

    cached_entry(target, build, is_complete=lambda entry: (entry / "table.json").is_file())
    return {**json.loads((target / "table.json").read_text()), "path": str(target / "table.json")}


def kv_sensitivity_step(payload: dict) -> dict:
    """Measure each pair's KLD against the F16 cache (``caches_kld``: one F16 forward for all pairs) into
    ``payload["target"]``."""
    source = ModelSource.from_dict(payload["source"])
    text = TextSource(**payload["text"])
    context, count = payload["context"], payload["windows"]
    ids = load_tokenizer(source.path, source.trust_remote_code)(text.read(), add_special_tokens=False)["input_ids"]
    if len(ids) < context * count:
        raise DataError(f"The calibration text {text.name} has {len(ids)} tokens, fewer than {count} windows of the "
                        f"plan's context {context} — give a longer calibration text or fewer kv_windows")
    windows = [ids[i * context:(i + 1) * context] for i in range(count)]
    path = Path(payload["weights"]) / FILE
    with measure_cost(source.path, "cpu") as cost:
        pairs = [tuple(pair) for pair in payload["pairs"]]
        rows = dict(zip((pair_name(k, v) for k, v in pairs),
                        caches_kld(path, windows, pairs, int(payload.get("threads") or 1))))
    out = {"kld": {"f16/f16": 0.0, **{name: r["kld_mean"] for name, r in rows.items()}}, "pairs": rows,
           "weights": payload["weights_recipe"], "text": {**text.to_dict(), "windows": count, "window_tokens": context},
           "cost": {k: cost[k] for k in ("quantize_wall_s", "quantize_cpu_s", "quantize_peak_rss_bytes")},
           "versions": versions()}
    with building_entry(payload["target"]):
        (Path(payload["target"]) / "table.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return {"path": payload["target"]}
