"""Steps: quantize, fidelity, accuracy, bench (and weights, the planner's check), each runnable in a fresh
process so no model freed earlier skews its memory or time.

A step is a function from a JSON payload to a JSON result, named here; ``launcher.run_step`` runs one in a
fresh interpreter (``python -m quantlab.steps STEP PAYLOAD.json RESULT.json``). Payloads exist only at that
boundary: each step module turns its payload into typed objects first.
"""

STEPS = {
    "quantize": "quantlab.steps.quantize:quantize_step",
    "fidelity": "quantlab.steps.fidelity:fidelity_step",
    "accuracy": "quantlab.steps.accuracy:accuracy_step",
    "bench": "quantlab.steps.bench:bench_step",
    "weights": "quantlab.steps.bench:weights_step",
    "sensitivity": "quantlab.steps.fit:sensitivity_step",
    "kv-sensitivity": "quantlab.steps.fit_kv:kv_sensitivity_step",
    "overflow": "quantlab.steps.overflow:overflow_step",
}
