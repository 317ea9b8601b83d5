"""Suite accuracy of one or more models: the lm-eval step of ``eval --tasks`` and ``quantize-and-compare --suite``.

quantize-and-compare runs every candidate in one fresh process (``accuracy_job``), like fidelity: accuracy
measures no memory or time, and lm-eval's imports and the converted data are then loaded once.
"""

from __future__ import annotations

import gc
import time


def accuracy_job(payload: dict) -> dict:
    """Worker entry: ``{settings, prepared, device, candidates: [{recipe, artifact}], trust_remote_code}``."""
    from tqdm import tqdm

    from quantlab.evaluate.harness import HarnessSettings, PreparedTasks
    from quantlab.recipe import Recipe

    settings = HarnessSettings.from_dict(payload["settings"])
    prepared = PreparedTasks(**payload["prepared"])
    return {"results": [evaluate_candidate(c["artifact"], Recipe.from_dict(c["recipe"]), payload["device"], settings,
                                           prepared, payload.get("trust_remote_code", False))
                        for c in tqdm(payload["candidates"], desc="accuracy", unit="model", leave=False)]}


def evaluate_candidate(path: str, recipe, device: str, settings, prepared, trust_remote_code: bool = False) -> dict:
    """Load one model the way its method says and run the suite on it; adds wall/CPU seconds and dtype."""
    from quantlab.evaluate.fidelity_job import load_recipe_model
    from quantlab.evaluate.harness import run_tasks
    from quantlab.models import load_tokenizer

    model = load_recipe_model(path, recipe, device, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    started, cpu = time.perf_counter(), time.process_time()
    result = run_tasks(model, tokenizer, settings, prepared)
    result.update(wall_s=time.perf_counter() - started, cpu_s=time.process_time() - cpu,
                  dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    del model
    gc.collect()
    return result


def split_samples(result: dict) -> dict:
    """Take the per-sample rows out of a run_tasks result: task -> rows."""
    return {name: task.pop("samples") for name, task in result["tasks"].items()}


SUITE_DEFINITIONS = {
    "acc": "lm-eval accuracy: the choice with the highest summed log-likelihood is the gold one",
    "acc_norm": "lm-eval accuracy with each choice's log-likelihood divided by its length in characters",
    "stderr": "lm-eval's standard error: closed form for means, bootstrap for perplexity",
    "gold_logprob": "log-probability of the gold choice among the choices, log softmax over choice log-likelihoods",
}
