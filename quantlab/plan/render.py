"""The plan as a terminal table whose arithmetic can be re-derived by hand."""

from __future__ import annotations

from quantlab.plan import GB
from quantlab.plan.steps import PHASES
from quantlab.table import _rows_table

MB = 10**6


def _gb(value: int, unit: int = GB) -> str:
    return f"{value / unit:.2f}"


def render_plan(plan: dict) -> str:
    m, s = plan["model"], plan["settings"]
    ok = [r for r in plan["recipes"] if r["applicable"]]
    unit, name = (GB, "GB") if any(r["total_bytes"] >= GB for r in ok) or s["gpu_mem_bytes"] < GB else (MB, "MB")
    header = ["recipe", "linear data", "scales", "embed+head", "norms etc", "KV cache", "activations",
              "runtime", f"total {name}", "fits", "headroom", "max context", "quantize peak"]
    rows, skipped = [], []
    for r in plan["recipes"]:
        if not r["applicable"]:
            skipped.append(f"{r['recipe']}: not applicable — {r['reason']}")
            continue
        c = r["components"]
        cells = [c["linear_data"], c["linear_scales"], c["embeddings"] + c["lm_head"],
                 c["norms_biases_other"] + c["buffers"], c["kv_cache"], c["activations"], c["runtime"], r["total_bytes"]]
        q = r["quantize"]
        peak = _gb(q["peak_bytes"], unit) + (f" ({_gb(q['layer_by_layer_bytes'], unit)} layered)"
                                             if q["layer_by_layer_bytes"] is not None else "")
        rows.append([r["recipe"], *(_gb(v, unit) for v in cells), "yes" if r["fits"] else "NO",
                     _gb(r["headroom_bytes"], unit), str(r["max_context"]), peak])
    sliding = (f", sliding window {m['sliding_window']} on {m['sliding_layers']} of {m['layers']} layers"
               if m["sliding_window"] else "")
    lines = [
        f"{m['ref']}: {m['model_type']}, {m['params'] / 1e9:.3f} B params ({m['quantized_weights'] / 1e9:.3f} B in "
        f"{m['quantized_layers']} quantizable linear layers), {m['layers']} layers, hidden {m['hidden']}, "
        f"intermediate {m['intermediate']}, {m['heads']} heads / {m['kv_heads']} KV heads x {m['head_dim']}, "
        f"vocab {m['vocab']}, embeddings {'tied' if m['tied'] else 'untied'}{sliding}",
        f"config: {m['config_source']}",
        f"budget {s['gpu_mem_bytes'] / GB:.2f} GB on {s['device']}, context {s['context']}, batch {s['batch']}; "
        f"sizes in {name} = 10^{9 if unit == GB else 6} bytes",
        "",
        _rows_table(header, rows),
        "",
    ]
    lines += _arithmetic(plan, unit, name)
    kv = plan.get("kv_formats") or {}
    if kv:
        lines.append(f"KV cache in llama.cpp at context {s['context']} x batch {s['batch']}, keys and values in one type: "
                     + ", ".join(f"{k} {_gb(v, unit)} {name}" if v is not None else f"{k} n/a" for k, v in kv.items()))
    lines += skipped
    lines += [""] + plan["advice"]
    return "\n".join(lines)


def _arithmetic(plan: dict, unit: int, name: str) -> list[str]:
    """Each term spelled out: the weights per recipe, KV cache and activations for the first recipe."""
    m, s = plan["model"], plan["settings"]
    r = next((r for r in plan["recipes"] if r["applicable"]), None)
    if r is None:
        return []
    e = r["activation_elem_bytes"]
    full = m["layers"] - m["sliding_layers"]
    window = min(s["context"], m["sliding_window"]) if m["sliding_window"] else s["context"]
    tokens = (f"({full} layers x {s['context']} + {m['sliding_layers']} layers x {window}) tokens"
              if m["sliding_layers"] else f"{m['layers']} layers x {s['context']} tokens")
    kv = (f"KV cache = 2 x {m['kv_heads']} kv heads x {m['head_dim']} x {tokens} x batch {s['batch']} x {e} B "
          f"= {_gb(r['components']['kv_cache'], unit)} {name}")
    act = (f"activations = batch {s['batch']} x {s['context']} x (2 x {m['hidden']} + 3 x {m['intermediate']}"
           + (f" x {m['experts_per_token']}" if m["experts_per_token"] > 1 else "")
           + f") x {e} B + {m['vocab']} x 4 B = {_gb(r['components']['activations'], unit)} {name}")
    n = m["quantized_weights"]
    unq = m["unquantized_elements"]
    lines = [f"embed+head = {unq['embeddings'] + unq['lm_head']} elements x {e} B"
             + (" (lm_head tied to the embeddings: counted once)" if m["tied"] else "")
             + f"; norms etc = {unq['norms'] + unq['biases'] + unq['other']} elements x {e} B + {m['buffer_bytes']} B of buffers"]
    for q in plan["recipes"]:
        if q["applicable"]:
            c = q["components"]
            lines.append(f"{q['recipe']}: {n} linear weights -> data {c['linear_data'] * 8 / n:.3f} + scales "
                         f"{c['linear_scales'] * 8 / n:.3f} bits/weight ({q['layout']})")
    for q in plan["recipes"]:
        if q["applicable"] and q["quantize"]["components"]:
            lines.append(f"quantize peak of {q['recipe']} = {_peak_sum(q['quantize']['components'], unit)} {name}")
    return lines + [kv, act, f"runtime = {plan['definitions']['runtime']}"]


def _peak_sum(components: dict, unit: str) -> str:
    """``a + b + max(phase1: (c + d), phase2: (e))``: what is held throughout plus the largest phase."""
    rest = [f"{k} {_gb(v, unit)}" for k, v in components.items() if not k.startswith(tuple(p + ": " for p in PHASES))]
    phases = []
    for p in PHASES:
        inside = [f"{k.removeprefix(p + ': ')} {_gb(v, unit)}" for k, v in components.items() if k.startswith(p + ": ")]
        if inside:
            phases.append(f"{p}: ({' + '.join(inside)})")
    return " + ".join(rest + ([f"max({', '.join(phases)})"] if phases else []))
