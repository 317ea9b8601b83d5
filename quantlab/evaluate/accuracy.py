"""Suite accuracy of one model through lm-eval, loaded the way its method says (``evaluate_candidate``)."""

from __future__ import annotations

import gc
import time

from quantlab.engines import EngineModel
from quantlab.evaluate.harness import run_tasks
from quantlab.layouts.loading import load_recipe_model
from quantlab.models.load import load_tokenizer


def evaluate_candidate(path: str, recipe, device: str, settings, prepared, trust_remote_code: bool = False) -> dict:
    """Load one model the way its method says and run the suite on it; adds wall/CPU seconds and dtype."""
    model = load_recipe_model(path, recipe, device, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    started, cpu = time.perf_counter(), time.process_time()
    result = run_tasks(model, tokenizer, settings, prepared)
    dtype = f"{model.engine} (its own)" if isinstance(model, EngineModel) else str(next(model.parameters()).dtype)
    result.update(wall_s=time.perf_counter() - started, cpu_s=time.process_time() - cpu,
                  dtype=dtype.removeprefix("torch."))
    del model
    gc.collect()
    return result


def primary_metric(task: dict) -> str | None:
    """The metric a task is usually quoted by: acc_norm where lm-eval has it, else acc, else its perplexity."""
    for name in ("acc_norm", "acc", "word_perplexity", "perplexity"):
        if name in task["metrics"]:
            return name
    return next(iter(task["metrics"]), None)


def split_samples(result: dict) -> dict:
    """Take the per-sample rows out of a run_tasks result: task -> rows."""
    return {name: task.pop("samples") for name, task in result["tasks"].items()}


SUITE_DEFINITIONS = {
    "acc": "lm-eval accuracy: the choice with the highest summed log-likelihood is the gold one",
    "acc_norm": "lm-eval accuracy with each choice's log-likelihood divided by its length in characters",
    "perplexity": "lm-eval's perplexity (lambada_openai): exp(-mean over documents of the target's log-likelihood)",
    "word_perplexity": "lm-eval's exp(-Σ log-likelihood / Σ words) over documents (loglikelihood_rolling tasks)",
    "byte_perplexity": "lm-eval's exp(-Σ log-likelihood / Σ UTF-8 bytes) over documents",
    "bits_per_byte": "lm-eval's -Σ log-likelihood / (Σ UTF-8 bytes · ln 2) over documents",
    "stderr": "lm-eval's standard error: closed form for means, bootstrap for perplexity, none for the weighted "
              "perplexities and bits_per_byte",
    "gold_logprob": "log of the gold choice's share of a softmax over the choices' length-normalised log-likelihoods "
                    "(each choice's log-likelihood divided by its length in characters, as acc_norm divides it): "
                    "acc_norm made soft, in nats; chance is log(1 / choices)",
    "gold_logprob_sum": "log-probability of the gold choice from a softmax over the choices' summed "
                        "log-likelihoods: acc made soft; long choices dominate it",
}
