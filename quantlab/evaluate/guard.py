"""A garbage guard: a quantized model that collapsed is flagged loudly, not stored as a quiet success.

Two signals, both against the fp baseline:
- a short greedy continuation of the reference text (first window's first 32 tokens, 32 new tokens):
  a run of one repeated token that the fp model does not produce (≥ 8 and ≥ 2× the fp's longest run);
- fidelity far outside its peers: top-1 agreement below 0.25, or mean KLD above 3× that of
  round-to-nearest at the same bits in the same comparison (when RTN ran too) and above 0.5 nats.
  The floor matters: at 8 bits RTN's KLD can be ~0.004, and a healthy LLM.int8() at 0.02 is 5× that.

And one rule: NaN or an infinite value is never a result. A model that computes one is refused with its cause
(``nonfinite_message``: float16 overflow, above 65504, is the usual one), and a result holding one is refused
where it is written (``require_finite``), naming the field.
"""

from __future__ import annotations

import math
import numbers

from quantlab.engines import EngineModel
from quantlab.errors import MeasurementError

PROMPT_TOKENS = 32
NEW_TOKENS = 32
MIN_RUN = 8
MIN_TOP1 = 0.25
KLD_VS_RTN = 3.0
KLD_FLOOR = 0.5  # nats/token: below this no ratio makes a model garbage


def greedy_continuation(model, ids) -> list[int]:
    """Greedy tokens after the first ``PROMPT_TOKENS`` tokens of the first reference window. A model run by an
    engine of its own (``quantlab.engines``) generates its way."""
    import torch

    if isinstance(model, EngineModel):
        return model.greedy(ids[0, :PROMPT_TOKENS].tolist(), NEW_TOKENS)
    prompt = ids[:1, :PROMPT_TOKENS].to(model.device)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def repetition(tokens: list[int]) -> dict:
    longest = run = 1 if tokens else 0
    for prev, cur in zip(tokens, tokens[1:]):
        run = run + 1 if cur == prev else 1
        longest = max(longest, run)
    return {"longest_run": longest, "distinct_fraction": len(set(tokens)) / len(tokens) if tokens else 0.0}


def generation_reasons(candidate: list[int], baseline: list[int]) -> list[str]:
    cand, base = repetition(candidate), repetition(baseline)
    if cand["longest_run"] >= max(MIN_RUN, 2 * base["longest_run"]):
        return [f"greedy output repeats one token {cand['longest_run']} times in a row "
                f"(fp baseline at most {base['longest_run']})"]
    return []


def fidelity_reasons(run: dict, peers: list[dict]) -> list[str]:
    """Reasons from fidelity numbers; ``peers`` are the other runs of the same comparison."""
    reasons = []
    fid = run["fidelity"]
    if fid["top1_agreement"] < MIN_TOP1:
        reasons.append(f"top-1 agreement {fid['top1_agreement']:.3f} is below {MIN_TOP1}")
    rtn = [p for p in peers if p["method"] == "rtn" and p["bits"] == run["bits"]]
    if run["method"] not in ("rtn", "fp") and rtn:
        ref = min(p["fidelity"]["kld_mean"] for p in rtn)
        if fid["kld_mean"] > max(KLD_VS_RTN * ref, KLD_FLOOR):
            reasons.append(f"mean KLD {fid['kld_mean']:.4f} is above {KLD_VS_RTN}× round-to-nearest's {ref:.4f} "
                           f"at {run['bits']} bits")
    return reasons


def nonfinite(value, path: str = "") -> tuple[str, float] | None:
    """(path, value) of the first NaN or infinite number in ``value`` (dicts and lists, nested), else None; the
    path reads like ``runs[2].fidelity.kld_mean``."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return None if math.isfinite(value) else (path, float(value))
    if isinstance(value, dict):
        items = [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for sub, v in items:
        found = nonfinite(v, sub)
        if found:
            return found
    return None


def require_finite(value, what: str, fix: str) -> None:
    """Raise (one line, naming the field) when ``value`` holds a NaN or infinite number."""
    found = nonfinite(value)
    if found:
        raise MeasurementError(f"{what}: {found[0]} is {found[1]}, not a number — {fix}")


def nonfinite_positions(model, ids) -> tuple[int, int]:
    """(positions whose logits hold a NaN or inf, positions) of one forward of ``model`` over ``ids`` (batch, seq)."""
    import torch

    with torch.inference_mode():
        logits = model(ids.to(model.device)).logits  # (batch, seq, vocab)
    bad = ~torch.isfinite(logits).all(dim=-1)
    return int(bad.sum()), bad.numel()


def held_dtype(model) -> str:
    """The floating dtype ``model`` computes in (``float16``), or "" when it does not say."""
    return str(getattr(model, "dtype", "")).removeprefix("torch.")


def nonfinite_message(who: str, bad: int, total: int, dtype: str, fix16: str, values: str = "log-probs") -> str:
    """Why ``who`` computed NaN or inf ``values`` at ``bad`` of ``total`` positions, and the fix: ``fix16`` (hold it
    in bfloat16) when it was held in float16, whose range ends at 65504; in a wider dtype the model itself is broken."""
    what = f"{who} computes NaN or inf {values} at {bad} of {total} positions held in {dtype or 'its dtype'}"
    if dtype == "float16":
        return (f"{what} — its activations overflow float16 (above 65504), as Gemma-family models' are known to; "
                f"{fix16}")
    return f"{what} — the model is broken (a failed quantization or a damaged checkpoint); check its recipe and " \
           "source"
